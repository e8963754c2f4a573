"""A training run's bookkeeping around the loop (wetr/engine.py): its folder, the checks before it
starts, the checkpoint it resumes from, the loop's state (`TrainState`: made fresh or restored
here), training-state checkpoints, metrics and error records.

    <work_dir>/<tag>/  config.yaml  train.log  metrics.jsonl  checkpoints/{last,best,iter_N}.pth
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from datasets.layout import LayoutError, check_layout
from utils import dist as dist_utils
from utils.checkpoint import load_file, remove_stale_tmp, rng_state, save_atomic, set_rng_state
from utils.config import ConfigError, to_container
from utils.dist import DistInfo
from utils.errors import UserError, first_line, is_user_error, rank, reports
from utils.io import write_text_atomic

from .factory import check_resume_checkpoint, load_weights, model_from_config, spec_dict
from .step import LOSS_TERMS, Training


class RunError(UserError, RuntimeError):
    """A run that must not start (existing log folder, bad resume target); one-line message.
    `all_ranks`: every rank raised it, so only rank 0 prints it."""

    def __init__(self, message: str, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


class NonFiniteLossError(RunError):
    """A loss term became NaN/inf (nan_policy=stop)."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, read once: its path and its contents."""
    path: Path
    ckpt: dict


@dataclass
class TrainState:
    """What the training loop changes: where it stands, the best validation so far and the loss
    sums since the last log line (`restore` makes it; last.pth keeps it)."""
    loss_sums: torch.Tensor                 # (1 + len(LOSS_TERMS),): total, then each term
    loss_steps: int = 0                     # optimizer steps in loss_sums
    step: int = 0                           # optimizer steps done
    best_miou: float = -1.0                 # best Seg mIoU (best.pth)
    best_f1: float = -1.0                   # best classifier F1: best.pth without val masks
    saved_step: int | None = None           # step of the last.pth written or resumed from
    log_time: float = 0.0                   # time and step of the last log line (throughput)
    log_step: int = 0

    def record_best(self, result: dict) -> bool:
        """Record a validation `result` if it is the run's best: by Seg mIoU, or by the
        classifier's F1 when no val image has a mask (a tag dataset without masks: its mIoUs are
        NaN). Returns whether it was."""
        if result["masked_images"] == 0:
            if not result["f1"] > self.best_f1:
                return False
            self.best_f1 = result["f1"]
        else:
            if not result["seg"]["miou"] > self.best_miou:
                return False
            self.best_miou = result["seg"]["miou"]
        return True

    def best_meta(self) -> dict:
        """The checkpoints' record of the best so far ("best_f1" only in runs without val masks)."""
        return {"best_miou": self.best_miou, **({"best_f1": self.best_f1} if self.best_f1 >= 0 else {})}


# ----------------------------------------------------------------------------- folder & checks
def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.work_dir) / cfg.tag


def find_resume(cfg: DictConfig) -> Path | None:
    """Checkpoint to resume from, or None for a fresh start (resume=auto with no last.pth yet)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = run_dir(cfg) / "checkpoints" / "last.pth"
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise RunError(f"resume checkpoint not found: {path}")
    return path


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse to start over an existing run unless resume= or overwrite=true."""
    d = run_dir(cfg)
    used = d.is_dir() and any((d / n).exists() for n in ("train.log", "checkpoints", "metrics.jsonl"))
    if used and not cfg.resume and not cfg.overwrite:
        raise RunError(f"log folder {d} already holds a run; pass resume=auto to continue it, "
                       f"overwrite=true to replace it, or another tag")


def accumulation(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step that reach `global_batch` images with `batch_size` per
    process on `world_size` processes (1 for global_batch=0, today's batch_size x processes)."""
    per_pass = cfg.batch_size * world_size
    if cfg.global_batch == 0:
        return 1
    if cfg.global_batch < 0 or cfg.global_batch % per_pass:
        raise ConfigError(f"global_batch={cfg.global_batch} is not a positive multiple of batch_size "
                          f"{cfg.batch_size} x {world_size} process(es) = {per_pass}; change "
                          f"batch_size or the process count so that it divides global_batch")
    return cfg.global_batch // per_pass


def preflight(cfg: DictConfig, world_size: int) -> ResumePoint | None:
    """Every check that needs no process group: run folder, model shape, global batch, dataset
    layout, resume checkpoint. Returns the checkpoint to resume from (read here, once), or None."""
    check_run_dir(cfg)
    with torch.device("meta"):  # builds no weights: only the configuration is checked
        model_from_config(cfg, pretrained=False)
    weights = cfg.model.pretrained
    if isinstance(weights, str) and not Path(weights).is_file():
        raise FileNotFoundError(f"pretrained weight file not found: {weights} (model.pretrained)")
    accumulation(cfg, world_size)
    if cfg.data.check_layout:
        try:
            check_layout(cfg.data, [cfg.data.train_split, cfg.data.val_split])
        except OSError as exc:  # e.g. an image header PIL cannot read (not always naming it)
            raise LayoutError(f"{first_line(exc)} (while checking the dataset in "
                              f"{cfg.data.root})") from None
    resume = read_resume(cfg)
    if resume is not None:
        check_resume_checkpoint(resume.ckpt, cfg, resume.path)
        check_resume_batch(resume, cfg, world_size)
    return resume


def _batch_words(global_batch: int, batch_size: int, world_size: int) -> str:
    return (f"global_batch={global_batch}" if global_batch else
            f"global_batch=0: batch_size {batch_size} x {world_size} process(es)")


def check_resume_batch(resume: ResumePoint, cfg: DictConfig, world_size: int) -> None:
    """Refuse to resume with another global batch (images per optimizer step) than the
    checkpoint's run: the loader would start at the wrong image and the steps would not be the
    run's. (With global_batch=0 on both sides, another process count is allowed: `restore` warns
    that the data order differs.)"""
    saved = resume.ckpt.get("config") or {}
    saved_global = int(saved.get("global_batch") or 0)
    if saved_global == 0 and cfg.global_batch == 0:
        return
    saved_world = len(resume.ckpt.get("rng") or [])
    saved_images = saved_global or int(saved.get("batch_size") or 0) * saved_world
    images = cfg.global_batch or cfg.batch_size * world_size
    if saved_images and saved_images != images:
        raise RunError(
            f"resume checkpoint {resume.path} was trained with {saved_images} images per "
            f"optimizer step ({_batch_words(saved_global, saved.get('batch_size'), saved_world)}) "
            f"but this run takes {images} ({_batch_words(cfg.global_batch, cfg.batch_size, world_size)}); "
            f"pass global_batch={saved_images} to continue it")


def read_resume(cfg: DictConfig) -> ResumePoint | None:
    path = find_resume(cfg)
    return None if path is None else ResumePoint(path, load_file(path))


def open_run_dir(cfg: DictConfig, dist: DistInfo) -> Path:
    """Rank 0 replaces the folder (overwrite=true, no resume), makes checkpoints/ and removes
    temp files a killed save left; every rank returns the run folder once it is ready."""
    out_dir = run_dir(cfg)
    ckpt_dir = out_dir / "checkpoints"
    if dist.is_main:
        if cfg.overwrite and not cfg.resume and out_dir.exists():
            shutil.rmtree(out_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(ckpt_dir)
    dist_utils.barrier()
    return out_dir


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, training: Training, step: int, cfg: DictConfig, extra: dict,
                    ranks: dict | None = None) -> None:
    """Weights-only (ranks None: iter_N.pth, best.pth) or training checkpoint (last.pth: with
    the optimizer and scaler, and ranks = {"rng": per-rank RNG states, "sums": per-rank loss
    sums, "count": steps in the sums})."""
    obj = {"model": training.model.state_dict(), "step": step, "config": to_container(cfg),
           "spec": spec_dict(training.model), "meta": extra}
    if ranks is not None:
        obj["optimizer"] = training.optimizer.state_dict()
        obj["scaler"] = training.scaler.state_dict() if training.scaler is not None else {}
        obj["rng"] = ranks["rng"]
        obj["log"] = {"count": ranks["count"], "sums": ranks["sums"]}
    save_atomic(obj, path)


def gather_rank_state(dist: DistInfo, state: TrainState) -> dict:
    """RNG states and loss sums of every rank, gathered on all ranks (saved by rank 0)."""
    mine = (rng_state(dist.device), state.loss_sums.cpu())
    out = [mine]
    if dist.distributed:
        out = [None] * dist.world_size
        torch.distributed.all_gather_object(out, mine)
    return {"rng": [o[0] for o in out], "sums": [o[1] for o in out], "count": state.loss_steps}


def new_loss_sums(device: torch.device) -> torch.Tensor:
    """Running sums of (total, *LOSS_TERMS) since the last log line."""
    return torch.zeros(len(LOSS_TERMS) + 1, device=device)


def restore(resume: ResumePoint | None, training: Training, dist: DistInfo, logger,
            ckpt_dir: Path) -> TrainState:
    """The loop's state at its start: fresh, or (resuming) the checkpoint's step, best scores
    and, when it was saved by as many processes as now run, this rank's loss sums. Resuming also
    loads the weights, optimizer and scaler into `training` and this rank's RNG streams."""
    state = TrainState(new_loss_sums(dist.device))
    if resume is None:
        return state
    ckpt = resume.ckpt
    load_weights(training.model, ckpt)
    training.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        training.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    meta = ckpt.get("meta", {})
    state.best_miou = float(meta.get("best_miou", -1.0))
    state.best_f1 = float(meta.get("best_f1", -1.0))
    if resume.path.resolve() == (ckpt_dir / "last.pth").resolve():
        state.saved_step = state.step   # the run's own last.pth (see TrainState.saved_step)
    rngs, log = ckpt.get("rng") or [], ckpt.get("log") or {}
    if len(rngs) == dist.world_size:
        # Last thing before the loop that may draw random numbers: the data loader has its own
        # generator, so the restored streams continue exactly.
        set_rng_state(rngs[dist.rank], dist.device)
        if len(log.get("sums", [])) == dist.world_size:
            state.loss_sums.copy_(log["sums"][dist.rank])
            state.loss_steps = int(log["count"])
    elif dist.is_main:
        logger.warning(f"resuming on {dist.world_size} processes from a run on {len(rngs)}: "
                       f"data order and random streams differ from an uninterrupted run")
    logger.info(f"resumed from {resume.path} at step {state.step}")
    return state


def last_good(ckpt_dir: Path, saved_step: int | None) -> str:
    """The checkpoint a failed run can resume from, for its error message; saved_step: the step
    of the last.pth this run wrote or resumed from (None: not known, the file is not read)."""
    last = ckpt_dir / "last.pth"
    if not last.is_file():
        return "none"
    return f"{last}" if saved_step is None else f"{last} (step {saved_step})"


# ----------------------------------------------------------------------------- logs
def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (by the run being resumed), so metrics.jsonl holds each
    step once."""
    if not path.is_file():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line cut short by the kill
            return False
    keep = [ln if ln.endswith("\n") else ln + "\n"
            for ln in path.read_text().splitlines(keepends=True) if ln.strip() and kept(ln)]
    write_text_atomic(path, "".join(keep))


@contextmanager
def errors_recorded(log_file: Path) -> Iterator[None]:
    """A user error that stops the run is also recorded in train.log, by the process that
    reports it (utils.errors.reports; another rank's line names it), then goes on to the entry,
    which prints it. One short O_APPEND write does not interleave with rank 0's lines."""
    try:
        yield
    except Exception as exc:
        if is_user_error(exc) and reports(exc):
            who = f"[rank {rank()}] " if rank() else ""
            with open(log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who}error: {first_line(exc)}\n")
        raise
