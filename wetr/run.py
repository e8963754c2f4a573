"""A training run's bookkeeping around the loop (wetr/engine.py): its folder, the checks before it
starts, the checkpoint it resumes from, training-state checkpoints, metrics and error records.

    <work_dir>/<tag>/  config.yaml  train.log  metrics.jsonl  checkpoints/{last,best,iter_N}.pth
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from datasets.layout import LayoutError, check_layout
from utils import dist as dist_utils
from utils.checkpoint import load_file, remove_stale_tmp, rng_state, save_atomic, set_rng_state
from utils.config import ConfigError, to_container
from utils.dist import DistInfo
from utils.errors import first_line
from utils.io import write_text_atomic

from .factory import check_resume_checkpoint, load_weights, model_from_config, spec_dict
from .step import LOSS_TERMS, Training


class RunError(RuntimeError):
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
    return resume


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


def write_config(cfg: DictConfig, out_dir: Path) -> None:
    write_text_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, t: Training, step: int, cfg: DictConfig, extra: dict,
                    ranks: dict | None = None) -> None:
    """Weights-only (ranks None: iter_N.pth, best.pth) or training checkpoint (last.pth: with
    t's optimizer and scaler, and ranks = {"rng": per-rank RNG states, "sums": per-rank loss
    sums, "count": steps in the sums})."""
    obj = {"model": t.model.state_dict(), "step": step, "config": to_container(cfg),
           "spec": spec_dict(t.model), "meta": extra}
    if ranks is not None:
        obj["optimizer"] = t.optimizer.state_dict()
        obj["scaler"] = t.scaler.state_dict() if t.scaler is not None else {}
        obj["rng"] = ranks["rng"]
        obj["log"] = {"count": ranks["count"], "sums": ranks["sums"]}
    save_atomic(obj, path)


def gather_rank_state(dist: DistInfo, loss_sum: torch.Tensor, loss_count: int) -> dict:
    """RNG states and loss sums of every rank, gathered on all ranks (saved by rank 0)."""
    state = (rng_state(dist.device), loss_sum.cpu())
    out = [state]
    if dist.distributed:
        out = [None] * dist.world_size
        torch.distributed.all_gather_object(out, state)
    return {"rng": [o[0] for o in out], "sums": [o[1] for o in out], "count": loss_count}


def new_loss_sums(device: torch.device) -> torch.Tensor:
    """Running sums of (total, *LOSS_TERMS) since the last log line."""
    return torch.zeros(len(LOSS_TERMS) + 1, device=device)


def restore(resume: ResumePoint, t: Training, dist: DistInfo, loss_sum: torch.Tensor, logger
            ) -> tuple[int, float, int]:
    """Load a training checkpoint into `t` (weights, optimizer, scaler) and, when it was saved by
    as many processes as now run, this rank's RNG streams and loss sums (into `loss_sum`).
    Returns (step, best validation mIoU, steps in the restored loss sums)."""
    ckpt = resume.ckpt
    load_weights(t.model, ckpt)
    t.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    step = int(ckpt["step"])
    best = float(ckpt.get("meta", {}).get("best_miou", -1.0))
    rngs, log = ckpt.get("rng") or [], ckpt.get("log") or {}
    count = 0
    if len(rngs) == dist.world_size:
        # Last thing before the loop that may draw random numbers: the data loader has its own
        # generator, so the restored streams continue exactly.
        set_rng_state(rngs[dist.rank], dist.device)
        if len(log.get("sums", [])) == dist.world_size:
            loss_sum.copy_(log["sums"][dist.rank])
            count = int(log["count"])
    elif dist.is_main:
        logger.warning(f"resuming on {dist.world_size} processes from a run on {len(rngs)}: "
                       f"data order and random streams differ from an uninterrupted run")
    logger.info(f"resumed from {resume.path} at step {step}")
    return step, best, count


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


def log_error(log_file: Path, message: str, rank: int | None) -> None:
    """Record why the run stopped in train.log (the console gets the line once, from `main`).
    Any rank may call it: one short O_APPEND write does not interleave with rank 0's lines."""
    who = "" if rank is None else f"[rank {rank}] "
    with open(log_file, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who}error: {message}\n")
