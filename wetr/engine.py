"""The one training loop shared by VOC and COCO (SPEC 4-7).

Entry points are thin: `scripts/train_voc.py` and `scripts/train_coco.py` hold a config dict and
call `tools.cli.train_entry(CONFIG)`, which parses the command line and calls `main(cfg)`.
Launch through torchrun (see run_train.sh):

    torchrun --nproc_per_node=2 --master_port=29500 -m scripts.train_voc data.root=... max_iters=200

`train(cfg)`: rank 0's checks (wetr/run.py `preflight`, which reads the resume checkpoint) ->
`wetr.step.build_training` -> resume -> the loop, one optimizer step a turn: micro-batches ->
`wetr.step.train_step` -> loss log -> validation (wetr/validate.py) and checkpoints. The run
folder, checkpoints and metrics are wetr/run.py's; the step itself is wetr/step.py's.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from datasets import build_dataset, build_train_loader, resolve_classes
from datasets.layout import LayoutError
from datasets.sampler import SampleError
from utils import dist as dist_utils
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.dist import DeviceError, DistInfo
from utils.errors import first_line, not_rank_0, one_line, user_errors
from utils.logger import JsonlWriter, format_eta, git_revision, setup_logger
from utils.tensorboard_log import ScalarLog, TBWriter

from . import run
from .run import NonFiniteLossError, ResumePoint, RunError
from .step import LOSS_TERMS, Batch, Training, build_training, to_device, train_step
from .validate import build_val_loader, val_overlays, val_scalars, validate

USER_ERRORS = (ConfigError, RunError, LayoutError, CheckpointError, DeviceError,
               NonFiniteLossError, SampleError, FileNotFoundError)
EXIT_PEER_FAILED = 3  # a collective failed because another rank died first


@dataclass
class TrainState:
    """The training loop's state: what it works with, and where it stands."""
    cfg: DictConfig
    dist: DistInfo
    t: Training
    logger: logging.Logger
    metrics: ScalarLog
    val_loader: DataLoader
    accum: int                              # micro-batches per optimizer step
    progress: Any = None                    # tqdm bar (rank 0 on a terminal) or None
    step: int = 0                           # optimizer steps done
    loss_sum: torch.Tensor | None = None    # (1 + len(LOSS_TERMS),) since the last log line
    loss_count: int = 0
    best: float = -1.0                      # best Seg mIoU (best.pth)
    best_f1: float = -1.0                   # best classifier F1: best.pth without val masks
    saved_step: int | None = None           # step of the last.pth written or resumed from
    last_result: dict = field(default_factory=dict)
    t0: float = 0.0                         # start time and step (ETA)
    step0: int = 0
    t_log: float = 0.0                      # time and step of the last log line (throughput)
    step_log: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return run.run_dir(self.cfg) / "checkpoints"


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; `deterministic` also asks for deterministic kernels (cuDNN
    autotuning off, deterministic algorithms where PyTorch has them; see docs/TROUBLESHOOTING.md)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def should_eval(step: int, cfg: DictConfig) -> bool:
    if step % cfg.eval_every == 0:
        return True
    return cfg.eval_late_from >= 0 and step >= cfg.eval_late_from and step % cfg.eval_every_late == 0


# ----------------------------------------------------------------------------- the run
def train(cfg: DictConfig) -> dict:
    """Run training; returns the last validation result (rank 0 and others alike)."""
    dist = dist_utils.init_distributed(cfg.device)
    resume = _preflight(cfg, dist)
    out_dir = run.open_run_dir(cfg, dist)
    logger = setup_logger(out_dir / "train.log", dist.is_main)
    try:
        return _train(cfg, dist, logger, resume)
    except USER_ERRORS as exc:
        if dist.is_main or not getattr(exc, "all_ranks", False):
            run.log_error(out_dir / "train.log", str(exc), None if dist.is_main else dist.rank)
        raise


def _preflight(cfg: DictConfig, dist: DistInfo) -> ResumePoint | None:
    """Rank 0 runs the checks (`wetr.run.preflight`); every rank fails together and only rank 0
    prints the line. Returns the resume checkpoint, read once by each process."""
    err = resume = None
    if dist.is_main:
        try:
            resume = run.preflight(cfg, dist.world_size)
        except (*USER_ERRORS, ValueError) as exc:
            if not isinstance(exc, USER_ERRORS) and not one_line(exc):
                raise
            err = first_line(exc)
    err = dist_utils.broadcast_object(err)
    if err is not None:
        raise RunError(err, all_ranks=True)
    return resume if dist.is_main else run.read_resume(cfg)


def _train(cfg: DictConfig, dist: DistInfo, logger, resume: ResumePoint | None) -> dict:
    out_dir = run.run_dir(cfg)
    if dist.is_main:
        run.write_config(cfg, out_dir)
        device = (torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                  else "cpu")
        logger.info(f"MoRe-py {git_revision()} | torch {torch.__version__} | device "
                    f"{dist.device} x {dist.world_size} | {device}")
        logger.info("config:\n" + OmegaConf.to_yaml(cfg))

    seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    t = build_training(cfg, dist)
    loss_sum = run.new_loss_sums(dist.device)
    step, best, count = (0, -1.0, 0) if resume is None else run.restore(resume, t, dist, loss_sum,
                                                                        logger)
    if dist.is_main:
        run.truncate_metrics(out_dir / "metrics.jsonl", step)
    # TensorBoard purges what an interrupted run wrote after the resumed step, as metrics.jsonl
    tb = TBWriter(out_dir, cfg.log.tensorboard and dist.is_main, start_step=step + 1)
    metrics = ScalarLog(JsonlWriter(out_dir / "metrics.jsonl" if dist.is_main else None), tb)
    accum = run.accumulation(cfg, dist.world_size)
    # The loader counts micro-batches: optimizer step s starts at micro-batch s * accum.
    train_loader = build_train_loader(cfg, dist, step * accum)
    val_set = build_dataset(cfg.data, cfg.data.val_split, "val")
    best_f1 = -1.0 if resume is None else float(resume.ckpt.get("meta", {}).get("best_f1", -1.0))
    val_loader = build_val_loader(val_set, dist, cfg.data.num_workers, cfg.val.max_images)
    st = TrainState(cfg, dist, t, logger, metrics, val_loader, accum, step=step, loss_sum=loss_sum,
            loss_count=count, best=best, best_f1=best_f1,
            saved_step=_resumed_last(resume, out_dir, step))
    if dist.is_main:
        _log_start(st, train_loader)
        if sys.stderr.isatty():
            from tqdm import tqdm
            st.progress = tqdm(total=cfg.max_iters, initial=step, desc=cfg.tag, dynamic_ncols=True)
    st.t0 = st.t_log = time.time()
    st.step0 = st.step_log = step
    t.model.train()
    try:
        _loop(st, iter(train_loader))
    finally:
        tb.close()
    if st.progress is not None:
        st.progress.close()
    if dist.is_main:
        logger.info(f"done: {cfg.max_iters} steps in {format_eta(time.time() - st.t0)}; "
                    f"checkpoints in {st.ckpt_dir}")
    dist_utils.barrier()
    return st.last_result


def _resumed_last(resume: ResumePoint | None, out_dir: Path, step: int) -> int | None:
    """`step` when the run resumed from its own last.pth, else None (see TrainState.saved_step)."""
    last = out_dir / "checkpoints" / "last.pth"
    return step if resume is not None and resume.path.resolve() == last.resolve() else None


def _log_start(st: TrainState, train_loader: DataLoader) -> None:
    n_params = sum(p.numel() for p in st.t.model.parameters()) / 1e6
    micro = train_loader.sampler.batch_size
    st.logger.info(f"effective batch {micro * st.dist.world_size * st.accum} = {micro} image(s) x "
                  f"{st.dist.world_size} process(es) x {st.accum} micro-batch(es) per optimizer "
                  f"step")
    st.logger.info(f"model {n_params:.1f}M params | train {len(train_loader.dataset)} images, "
                  f"{train_loader.sampler.steps_per_epoch // st.accum} steps/epoch | val "
                  f"{len(st.val_loader.dataset.dataset)} images")  # the whole split, not the shard


# ----------------------------------------------------------------------------- the loop
def _loop(st: TrainState, batches) -> None:
    """One optimizer step a turn, until cfg.max_iters: its micro-batches, the step, the loss
    sums, the log line, validation and checkpoints on their schedules."""
    cfg = st.cfg
    while st.step < cfg.max_iters:
        micro = [_next_batch(st, batches) for _ in range(st.accum)]
        lr, values, nonfinite = train_step(st.t, micro, st.step, cfg)
        if any(nonfinite):
            _on_nonfinite(st, nonfinite)
        else:
            st.loss_sum += values
            st.loss_count += 1
        st.step += 1
        if st.progress is not None:
            st.progress.update(1)
        if st.step % cfg.log_every == 0 or st.step == cfg.max_iters:
            _log_losses(st, lr)
        _evaluate_and_save(st)


def _next_batch(st: TrainState, batches) -> Batch:
    """The next (micro-)batch from the loader, on the device."""
    try:
        _, images, cls_label = next(batches)
    except SampleError as exc:
        raise SampleError(f"{exc}; stopped at step {st.step}, last checkpoint: "
                          f"{run.last_good(st.ckpt_dir, st.saved_step)}; replace the file or "
                          f"remove it from the split list, then resume=auto") from None
    return to_device(images, cls_label, st.dist.device, st.cfg.channels_last)


def _on_nonfinite(st: TrainState, nonfinite: list[bool]) -> None:
    """nan_policy=stop: raise, naming the terms; skip: warn (the step made no update)."""
    names = [k for k, b in zip(("total",) + LOSS_TERMS, nonfinite) if b]
    names = ", ".join(n for n in names if n != "total" or len(names) == 1)
    if st.cfg.nan_policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss ({names}) at step {st.step}; last good checkpoint: "
            f"{run.last_good(st.ckpt_dir, st.saved_step)}; lower optim.lr or check the data, then "
            f"resume=auto (or nan_policy=skip)", all_ranks=True)
    if st.dist.is_main:
        st.logger.warning(f"step {st.step}: non-finite loss ({names}); step skipped on all "
                         f"{st.dist.world_size} process(es) (nan_policy=skip)")


def _log_losses(st: TrainState, lr: float) -> None:
    """Mean losses over every rank's steps since the last line, and the images per second over
    all ranks -> train.log, metrics.jsonl and TensorBoard."""
    cfg, dist = st.cfg, st.dist
    avg = dist_utils.all_reduce_sum(st.loss_sum.clone()) / (max(st.loss_count, 1) * dist.world_size)
    avg = dict(zip(("total",) + LOSS_TERMS, avg.tolist()))
    st.loss_sum.zero_()
    st.loss_count = 0
    now = time.time()
    elapsed = now - st.t0
    eta = elapsed / max(st.step - st.step0, 1) * (cfg.max_iters - st.step)
    speed = ((st.step - st.step_log) * cfg.batch_size * dist.world_size * st.accum
             / max(now - st.t_log, 1e-9))
    st.t_log, st.step_log = now, st.step
    if dist.is_main:
        msg = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
        st.logger.info(f"step {st.step}/{cfg.max_iters} lr {lr:.3e} | {msg} | "
                      f"{speed:.1f} img/s | elapsed {format_eta(elapsed)} eta {format_eta(eta)}")
        st.metrics.write(step=st.step, lr=lr, **{f"loss/{k}": v for k, v in avg.items()},
                        **{"speed/images_per_s": speed})
        if st.progress is not None:
            st.progress.set_postfix(loss=f"{avg['total']:.3f}")


def _evaluate_and_save(st: TrainState) -> None:
    """Validation on its schedule (best.pth: Seg mIoU, or F1 without val masks), then checkpoints."""
    cfg, step = st.cfg, st.step
    evaluate = should_eval(step, cfg) or step == cfg.max_iters
    save = step % cfg.save_every == 0 or step == cfg.max_iters or evaluate
    if evaluate:
        result = st.last_result = _validate(st)
        if _new_best(st, result) and st.dist.is_main:
            run.save_checkpoint(st.ckpt_dir / "best.pth", st.t, step, cfg,
                                {**_best_meta(st), "val": result})
    extra = _best_meta(st)
    if save:
        ranks = run.gather_rank_state(st.dist, st.loss_sum, st.loss_count)
        if st.dist.is_main:
            run.save_checkpoint(st.ckpt_dir / "last.pth", st.t, step, cfg, extra, ranks)
            if step % cfg.save_every == 0:
                run.save_checkpoint(st.ckpt_dir / f"iter_{step}.pth", st.t, step, cfg, extra)
        st.saved_step = step
        dist_utils.barrier()


def _new_best(st: TrainState, result: dict) -> bool:
    """Record `result` if it is the run's best: by Seg mIoU, or by the classifier's F1 when no
    val image has a mask (a tag dataset without masks: its mIoUs are NaN)."""
    key, score = (("best_f1", result["f1"]) if result["masked_images"] == 0
                  else ("best", result["seg"]["miou"]))
    if not score > getattr(st, key):
        return False
    setattr(st, key, score)
    return True


def _best_meta(st: TrainState) -> dict:
    """The checkpoints' record of the best so far ("best_f1" only in runs without val masks)."""
    return {"best_miou": st.best, **({"best_f1": st.best_f1} if st.best_f1 >= 0 else {})}


def _validate(st: TrainState) -> dict:
    """wetr.validate.validate -> train.log, metrics.jsonl and TensorBoard (scores; overlays of
    rank 0's first val images)."""
    cfg, step = st.cfg, st.step
    result = validate(st.t.model, st.val_loader, cfg, st.dist, progress=st.progress is not None)
    if st.dist.is_main:
        line = " ".join(f"{k}={result[k]['miou'] * 100:.2f}" for k in ("cam", "lam", "fused", "seg"))
        f1 = f"cls F1 {result['f1'] * 100:.2f} ({result['images']} images"
        st.logger.info(f"val step {step}: mIoU {line} | {f1})" if result["masked_images"] else
                       f"val step {step}: {f1}, none with a mask: no mIoU; best.pth by F1)")
        st.metrics.write(step=step, **{f"val/{k}_miou": result[k]["miou"]
                                      for k in ("cam", "lam", "fused", "seg")},
                        **{"val/f1": result["f1"]}, **val_scalars(result, cfg))
        if st.metrics.tb.enabled and cfg.log.images > 0:
            st.metrics.tb.images(step, "val", val_overlays(st.t.model, st.val_loader.dataset, cfg,
                                                          st.dist.device, cfg.log.images))
    return result


# ----------------------------------------------------------------------------- entry point
def _printed_by_rank_0(exc: BaseException) -> bool:
    """Whether rank 0 prints this error for every rank: it said so (`all_ranks`), or it is a
    config error, which every rank finds alike in the same arguments."""
    return not_rank_0() and (getattr(exc, "all_ranks", False) or isinstance(exc, ConfigError))


def main(cfg: DictConfig) -> None:
    """Entry point of the training scripts, given their parsed config (tools.cli.train_entry).

    A bad input exits with code 2 after one `error: ...` line on stderr (printed once, by rank 0,
    when every rank hit it).
    """
    try:
        with user_errors(USER_ERRORS, if_one_line=(ValueError,), silent=_printed_by_rank_0,
                         cleanup=dist_utils.cleanup):
            resolve_classes(cfg.data)   # data.name=tags: K + 1 from the dataset's class_names.txt
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and not cfg.resume:
                cfg.resume = "auto"  # a worker restarted by torchrun continues its run
            train(cfg)
    except RuntimeError as exc:
        if not dist_utils.peer_failed(exc):
            raise
        # Another rank stopped (its own message says why; torchrun stops this one anyway):
        # exit quietly instead of adding a traceback per surviving rank.
        sys.exit(EXIT_PEER_FAILED)
    dist_utils.cleanup()
