"""The one training loop shared by VOC and COCO (METHOD.md §4-7).

Entry points are thin: `scripts/train_voc.py` and `scripts/train_coco.py` hold a config dict and
call `tools.cli.train_entry(CONFIG)`, which parses the command line and calls `main(cfg)`.
Launch through torchrun (see run_train.sh):

    torchrun --nproc_per_node=2 --master_port=29500 -m scripts.train_voc data.root=... max_iters=200

`main(cfg)`: rank 0's checks (wetr/run.py `preflight`, which reads the resume checkpoint) ->
`wetr.step.build_training` -> the loop's state, fresh or restored (`wetr.run.restore`) ->
`train_loop`, one optimizer step a turn: micro-batches -> `wetr.step.train_step` (->
`compute_losses`) -> loss log -> validation (wetr/validate.py) and checkpoints. The run folder,
checkpoints and metrics are wetr/run.py's; the step itself is wetr/step.py's. A user error
reaches the entry (tools.cli.train_entry), which prints its one line.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from datasets import build_dataset, build_train_loader, resolve_classes
from datasets.sampler import SampleError
from utils import dist as dist_utils
from utils.dist import DistInfo
from utils.io import write_text_atomic
from utils.logger import JsonlWriter, format_eta, git_revision, setup_logger
from utils.tensorboard_log import ScalarLog, TBWriter

from . import run
from .run import NonFiniteLossError, TrainState
from .step import LOSS_TERMS, Batch, Training, build_training, to_device, train_step
from .validate import build_val_loader, val_overlays, val_scalars, validate


@dataclass(frozen=True)
class TrainContext:
    """What the training loop works with, fixed before it starts (what it changes: TrainState)."""
    cfg: DictConfig
    dist: DistInfo
    training: Training
    val_loader: DataLoader
    logger: logging.Logger
    metrics: ScalarLog
    accum: int                              # micro-batches per optimizer step
    progress: Any = None                    # tqdm bar (rank 0 on a terminal) or None
    started: float = 0.0                    # start time and step (ETA)
    start_step: int = 0

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
def main(cfg: DictConfig) -> None:
    """Train with `cfg` (the training scripts' parsed config, from tools.cli.train_entry):
    rank 0's checks, then the run folder, the model and its optimizer, the loop's state (fresh or
    restored), the loaders and logs, and the loop."""
    resolve_classes(cfg.data)   # data.name=tags: K + 1 from the dataset's class_names.txt
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and not cfg.resume:
        cfg.resume = "auto"  # a worker restarted by torchrun continues its run
    dist = dist_utils.init_distributed(cfg.device)
    with dist_utils.group_errors():  # rank 0 checks; on an error every rank stops together
        resume = run.preflight(cfg, dist.world_size) if dist.is_main else None
    if not dist.is_main:
        resume = run.read_resume(cfg)   # each process reads the checkpoint once
    out_dir = run.open_run_dir(cfg, dist)
    logger = setup_logger(out_dir / "train.log", dist.is_main)
    with run.errors_recorded(out_dir / "train.log"):
        if dist.is_main:
            write_text_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            device = (torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                      else "cpu")
            logger.info(f"MoRe-py {git_revision()} | torch {torch.__version__} | device "
                        f"{dist.device} x {dist.world_size} | {device}")
            logger.info("config:\n" + OmegaConf.to_yaml(cfg))

        seed_everything(cfg.seed + dist.rank, cfg.deterministic)
        training = build_training(cfg, dist)
        state = run.restore(resume, training, dist, logger, out_dir / "checkpoints")
        if dist.is_main:
            run.truncate_metrics(out_dir / "metrics.jsonl", state.step)
        # TensorBoard purges what an interrupted run wrote after the resumed step, as metrics.jsonl
        tb = TBWriter(out_dir, cfg.log.tensorboard and dist.is_main, start_step=state.step + 1)
        metrics = ScalarLog(JsonlWriter(out_dir / "metrics.jsonl" if dist.is_main else None), tb)
        accum = run.accumulation(cfg, dist.world_size)
        # The loader counts micro-batches: optimizer step s starts at micro-batch s * accum.
        train_loader = build_train_loader(cfg, dist, state.step * accum)
        val_set = build_dataset(cfg.data, cfg.data.val_split, "val")
        val_loader = build_val_loader(val_set, dist, cfg.data.num_workers, cfg.val.max_images)
        progress = None
        if dist.is_main:
            _log_start(logger, training, train_loader, val_loader, dist, accum)
            if sys.stderr.isatty():
                from tqdm import tqdm
                progress = tqdm(total=cfg.max_iters, initial=state.step, desc=cfg.tag,
                                dynamic_ncols=True)
        state.log_time, state.log_step = time.time(), state.step
        ctx = TrainContext(cfg, dist, training, val_loader, logger, metrics, accum, progress,
                           started=state.log_time, start_step=state.step)
        training.model.train()
        try:
            train_loop(ctx, state, iter(train_loader))
        finally:
            tb.close()
        if progress is not None:
            progress.close()
        if dist.is_main:
            logger.info(f"done: {cfg.max_iters} steps in {format_eta(time.time() - ctx.started)}; "
                        f"checkpoints in {ctx.ckpt_dir}")
    dist_utils.barrier()
    dist_utils.cleanup()


def _log_start(logger: logging.Logger, training: Training, train_loader: DataLoader,
               val_loader: DataLoader, dist: DistInfo, accum: int) -> None:
    n_params = sum(p.numel() for p in training.model.parameters()) / 1e6
    micro = train_loader.sampler.batch_size
    logger.info(f"effective batch {micro * dist.world_size * accum} = {micro} image(s) x "
                f"{dist.world_size} process(es) x {accum} micro-batch(es) per optimizer step")
    logger.info(f"model {n_params:.1f}M params | train {len(train_loader.dataset)} images, "
                f"{train_loader.sampler.steps_per_epoch // accum} steps/epoch | val "
                f"{len(val_loader.dataset.dataset)} images")  # the whole split, not the shard


# ----------------------------------------------------------------------------- the loop
def train_loop(ctx: TrainContext, state: TrainState, batches: Iterator) -> None:
    """One optimizer step a turn, until cfg.max_iters: its micro-batches, the step, the loss
    sums, the log line, validation and checkpoints on their schedules."""
    cfg = ctx.cfg
    while state.step < cfg.max_iters:
        micro = [_next_batch(ctx, state, batches) for _ in range(ctx.accum)]
        lr, values, nonfinite = train_step(ctx.training, micro, state.step, cfg)
        if any(nonfinite):
            _on_nonfinite(ctx, state, nonfinite)
        else:
            state.loss_sums += values
            state.loss_steps += 1
        state.step += 1
        if ctx.progress is not None:
            ctx.progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_iters:
            _log_losses(ctx, state, lr)
        _evaluate_and_save(ctx, state)


def _next_batch(ctx: TrainContext, state: TrainState, batches: Iterator) -> Batch:
    """The next (micro-)batch from the loader, on the device."""
    try:
        _, images, cls_label = next(batches)
    except SampleError as exc:
        raise SampleError(f"{exc}; stopped at step {state.step}, last checkpoint: "
                          f"{run.last_good(ctx.ckpt_dir, state.saved_step)}; replace the file or "
                          f"remove it from the split list, then resume=auto") from None
    return to_device(images, cls_label, ctx.dist.device, ctx.cfg.channels_last)


def _on_nonfinite(ctx: TrainContext, state: TrainState, nonfinite: list[bool]) -> None:
    """nan_policy=stop: raise, naming the terms; skip: warn (the step made no update)."""
    names = [k for k, b in zip(("total",) + LOSS_TERMS, nonfinite) if b]
    names = ", ".join(n for n in names if n != "total" or len(names) == 1)
    if ctx.cfg.nan_policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss ({names}) at step {state.step}; last good checkpoint: "
            f"{run.last_good(ctx.ckpt_dir, state.saved_step)}; lower optim.lr or check the data, "
            f"then resume=auto (or nan_policy=skip)", all_ranks=True)
    if ctx.dist.is_main:
        ctx.logger.warning(f"step {state.step}: non-finite loss ({names}); step skipped on all "
                           f"{ctx.dist.world_size} process(es) (nan_policy=skip)")


def _log_losses(ctx: TrainContext, state: TrainState, lr: float) -> None:
    """Mean losses over every rank's steps since the last line, and the images per second over
    all ranks -> train.log, metrics.jsonl and TensorBoard."""
    cfg, dist = ctx.cfg, ctx.dist
    avg = (dist_utils.all_reduce_sum(state.loss_sums.clone())
           / (max(state.loss_steps, 1) * dist.world_size))
    avg = dict(zip(("total",) + LOSS_TERMS, avg.tolist()))
    state.loss_sums.zero_()
    state.loss_steps = 0
    now = time.time()
    elapsed = now - ctx.started
    eta = elapsed / max(state.step - ctx.start_step, 1) * (cfg.max_iters - state.step)
    speed = ((state.step - state.log_step) * cfg.batch_size * dist.world_size * ctx.accum
             / max(now - state.log_time, 1e-9))
    state.log_time, state.log_step = now, state.step
    if dist.is_main:
        msg = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
        ctx.logger.info(f"step {state.step}/{cfg.max_iters} lr {lr:.3e} | {msg} | "
                        f"{speed:.1f} img/s | elapsed {format_eta(elapsed)} eta {format_eta(eta)}")
        ctx.metrics.write(step=state.step, lr=lr, **{f"loss/{k}": v for k, v in avg.items()},
                          **{"speed/images_per_s": speed})
        if ctx.progress is not None:
            ctx.progress.set_postfix(loss=f"{avg['total']:.3f}")


def _evaluate_and_save(ctx: TrainContext, state: TrainState) -> None:
    """Validation on its schedule (best.pth: Seg mIoU, or F1 without val masks), then checkpoints."""
    cfg, step, is_main = ctx.cfg, state.step, ctx.dist.is_main
    evaluate = should_eval(step, cfg) or step == cfg.max_iters
    save = step % cfg.save_every == 0 or step == cfg.max_iters or evaluate
    if evaluate:
        result = _validate(ctx, step)
        if state.record_best(result) and is_main:
            run.save_checkpoint(ctx.ckpt_dir / "best.pth", ctx.training, step, cfg,
                                {**state.best_meta(), "val": result})
    if save:
        ranks = run.gather_rank_state(ctx.dist, state)
        if is_main:
            run.save_checkpoint(ctx.ckpt_dir / "last.pth", ctx.training, step, cfg,
                                state.best_meta(), ranks)
            if step % cfg.save_every == 0:
                run.save_checkpoint(ctx.ckpt_dir / f"iter_{step}.pth", ctx.training, step, cfg,
                                    state.best_meta())
        state.saved_step = step
        dist_utils.barrier()


def _validate(ctx: TrainContext, step: int) -> dict:
    """wetr.validate.validate -> train.log, metrics.jsonl and TensorBoard (scores; overlays of
    rank 0's first val images)."""
    cfg, model = ctx.cfg, ctx.training.model
    result = validate(model, ctx.val_loader, cfg, ctx.dist, progress=ctx.progress is not None)
    if ctx.dist.is_main:
        line = " ".join(f"{k}={result[k]['miou'] * 100:.2f}" for k in ("cam", "lam", "fused", "seg"))
        f1 = f"cls F1 {result['f1'] * 100:.2f} ({result['images']} images"
        ctx.logger.info(f"val step {step}: mIoU {line} | {f1})" if result["masked_images"] else
                        f"val step {step}: {f1}, none with a mask: no mIoU; best.pth by F1)")
        ctx.metrics.write(step=step, **{f"val/{k}_miou": result[k]["miou"]
                                       for k in ("cam", "lam", "fused", "seg")},
                          **{"val/f1": result["f1"]}, **val_scalars(result, cfg))
        if ctx.metrics.tb.enabled and cfg.log.images > 0:
            ctx.metrics.tb.images(step, "val", val_overlays(model, ctx.val_loader.dataset, cfg,
                                                           ctx.dist.device, cfg.log.images))
    return result
