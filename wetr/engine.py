"""The one training loop shared by VOC and COCO (SPEC 4-7).

Entry points are thin: `scripts/train_voc.py` and `scripts/train_coco.py` hold a config dict and
call `main(CONFIG)`. Launch through torchrun (see run_train.sh):

    torchrun --nproc_per_node=2 --master_port=29500 -m scripts.train_voc data.root=... max_iters=200

`train(cfg)`: checks (wetr/run.py) -> model, optimizer, PAR (wetr/step.py) -> resume -> the loop:
batch -> `wetr.step.train_step` -> loss log -> validation (wetr/validate.py) and checkpoints.
The run folder, checkpoints and metrics are wetr/run.py's; the step itself is wetr/step.py's.
"""
from __future__ import annotations

import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets import build_dataset, build_train_loader, resolve_classes
from datasets.layout import LayoutError
from datasets.sampler import CheckedDataset, SampleError
from utils import dist as dist_utils
from utils.checkpoint import CheckpointError
from utils.config import ConfigError, TrainConfig, parse_cli
from utils.dist import DeviceError, DistInfo
from utils.errors import user_errors
from utils.logger import JsonlWriter, format_eta, git_revision, setup_logger
from utils.tensorboard_log import ScalarLog, TBWriter

from . import run
from .compile import compile_regions
from .run import NonFiniteLossError, RunError
from .step import LOSS_TERMS, Training, build_training, train_step
from .validate import build_val_loader, val_overlays, val_scalars, validate

USER_ERRORS = (ConfigError, RunError, LayoutError, CheckpointError, DeviceError,
               NonFiniteLossError, SampleError, FileNotFoundError)
EXIT_PEER_FAILED = 3  # a collective failed because another rank died first


@dataclass(frozen=True)
class Hooks:
    """Callbacks into the loop for tests that inject faults; training scripts pass none.

    batch(step, dist): called once the batch of `step` is loaded, before it goes to the device.
    losses(step, dist, total, terms) -> (total, terms): may change the losses of `step` before
    their finite check.
    """
    batch: Callable[[int, DistInfo], None] | None = None
    losses: Callable[[int, DistInfo, torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None


@dataclass
class _Progress:
    """What the loop carries from step to step."""
    step: int
    loss_sum: torch.Tensor                  # (1 + len(LOSS_TERMS),) since the last log line
    loss_count: int = 0
    best: float = -1.0
    last_result: dict = field(default_factory=dict)
    t0: float = 0.0
    step0: int = 0
    t_log: float = 0.0                      # time and step of the last log line (throughput)
    step_log: int = 0


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
def train(cfg: DictConfig, hooks: Hooks | None = None) -> dict:
    """Run training; returns the last validation result (rank 0 and others alike)."""
    dist = dist_utils.init_distributed(cfg.device)
    # Rank 0 runs the checks; everyone fails together, and only rank 0 prints the line.
    err = None
    if dist.is_main:
        try:
            run.preflight(cfg)
        except USER_ERRORS as exc:
            err = str(exc)
    err = dist_utils.broadcast_object(err)
    if err is not None:
        raise RunError(err, all_ranks=True)

    resume_path = run.find_resume(cfg)
    out_dir = run.open_run_dir(cfg, dist)
    logger = setup_logger(out_dir / "train.log", dist.is_main)
    try:
        return _train(cfg, dist, logger, resume_path, hooks or Hooks())
    except USER_ERRORS as exc:
        if dist.is_main or not getattr(exc, "all_ranks", False):
            run.log_error(out_dir / "train.log", str(exc), None if dist.is_main else dist.rank)
        raise


def _train(cfg: DictConfig, dist: DistInfo, logger, resume_path, hooks: Hooks) -> dict:
    out_dir = run.run_dir(cfg)
    if dist.is_main:
        run.write_config(cfg, out_dir)
        device = (torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                  else "cpu")
        logger.info(f"MoRe-py {git_revision()} | torch {torch.__version__} | device "
                    f"{dist.device} x {dist.world_size} | {device}")
        logger.info("config:\n" + OmegaConf.to_yaml(cfg))

    seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    t = build_training(cfg, dist.device)
    state = _Progress(step=0, loss_sum=run.new_loss_sums(dist.device))
    if resume_path is not None:
        state.step, state.best, state.loss_count = run.restore(resume_path, t, dist,
                                                               state.loss_sum, logger)
    if dist.is_main:
        run.truncate_metrics(out_dir / "metrics.jsonl", state.step)
    # TensorBoard purges what an interrupted run wrote after the resumed step, as metrics.jsonl
    tb = TBWriter(out_dir, cfg.log.tensorboard and dist.is_main, start_step=state.step + 1)
    metrics = ScalarLog(JsonlWriter(out_dir / "metrics.jsonl" if dist.is_main else None), tb)
    t.train_model = _wrap_for_training(t.model, cfg, dist)

    train_loader = build_train_loader(cfg, dist, state.step)
    val_set = CheckedDataset(build_dataset(cfg.data, cfg.data.val_split, "val"))
    val_loader = build_val_loader(val_set, dist, cfg.data.num_workers, cfg.val.max_images)
    if dist.is_main:
        n_params = sum(p.numel() for p in t.model.parameters()) / 1e6
        logger.info(f"model {n_params:.1f}M params | train {len(train_loader.dataset)} images, "
                    f"{train_loader.sampler.steps_per_epoch} steps/epoch | val {len(val_set)} images")
    progress = None
    if dist.is_main and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_iters, initial=state.step, desc=cfg.tag, dynamic_ncols=True)

    state.t0, state.step0 = time.time(), state.step
    state.t_log, state.step_log = state.t0, state.step
    t.model.train()
    try:
        _loop(cfg, dist, logger, t, state, iter(train_loader), val_loader, metrics, progress, hooks)
    finally:
        tb.close()
    if progress is not None:
        progress.close()
    if dist.is_main:
        logger.info(f"done: {cfg.max_iters} steps in {format_eta(time.time() - state.t0)}; "
                    f"checkpoints in {out_dir / 'checkpoints'}")
    dist_utils.barrier()
    return state.last_result


def _wrap_for_training(model: torch.nn.Module, cfg: DictConfig, dist: DistInfo) -> torch.nn.Module:
    """The module the training forward runs through: DDP over several processes. cfg.compile
    compiles the encoder blocks and the decoder in place (`wetr.compile.compile_regions`), so the
    no-grad CAM passes, which call the bare model, run compiled too."""
    if cfg.compile:
        compile_regions(model)
    train_model = model
    if dist.distributed:
        # oneDNN returns 1x1-conv weight grads in a channels-last layout; DDP copies them into
        # its buckets correctly but warns once per run. Harmless, so keep the log readable.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return train_model


# ----------------------------------------------------------------------------- the loop
def _loop(cfg: DictConfig, dist: DistInfo, logger, t: Training, state: _Progress, batches,
          val_loader: DataLoader, metrics: ScalarLog, progress, hooks: Hooks) -> None:
    ckpt_dir = run.run_dir(cfg) / "checkpoints"
    while state.step < cfg.max_iters:
        images, cls_label, num_present = _next_batch(batches, state.step, cfg, dist, ckpt_dir, hooks)
        on_losses = None if hooks.losses is None else partial(hooks.losses, state.step, dist)
        lr, values, nonfinite = train_step(t, images, cls_label, state.step, cfg, num_present,
                                           on_losses=on_losses)
        if any(nonfinite):
            _on_nonfinite(nonfinite, state.step, cfg, dist, logger, ckpt_dir)
        else:
            state.loss_sum += values
            state.loss_count += 1
        state.step += 1
        if progress is not None:
            progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_iters:
            _log_losses(state, lr, cfg, dist, logger, metrics, progress)
        _evaluate_and_save(state, t, cfg, dist, logger, val_loader, metrics, progress, ckpt_dir)


def _next_batch(batches, step: int, cfg: DictConfig, dist: DistInfo, ckpt_dir, hooks: Hooks):
    """-> images (B,3,H,W), cls_label (B,K) float, both on the device, and the largest number of
    classes in one image (read on the host, so PAR needs no device sync)."""
    try:
        _, images, cls_label = next(batches)
    except SampleError as exc:
        raise SampleError(f"{exc}; stopped at step {step}, last checkpoint: "
                          f"{run.last_good(ckpt_dir)}; replace the file or remove it from the "
                          f"split list, then resume=auto") from None
    if hooks.batch is not None:
        hooks.batch(step, dist)
    num_present = int(cls_label.sum(1).max())  # CPU tensor from the loader: no device sync
    images = images.to(dist.device, non_blocking=True)
    cls_label = cls_label.to(dist.device, non_blocking=True).float()
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, cls_label, num_present


def _on_nonfinite(nonfinite: list[bool], step: int, cfg: DictConfig, dist: DistInfo, logger,
                  ckpt_dir) -> None:
    """nan_policy=stop: raise, naming the terms; skip: warn (the step made no update)."""
    names = [k for k, b in zip(("total",) + LOSS_TERMS, nonfinite) if b]
    names = ", ".join(n for n in names if n != "total" or len(names) == 1)
    if cfg.nan_policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss ({names}) at step {step}; last good checkpoint: "
            f"{run.last_good(ckpt_dir)}; lower optim.lr or check the data, then resume=auto (or "
            f"nan_policy=skip)", all_ranks=True)
    if dist.is_main:
        logger.warning(f"step {step}: non-finite loss ({names}); step skipped on all "
                       f"{dist.world_size} process(es) (nan_policy=skip)")


def _log_losses(state: _Progress, lr: float, cfg: DictConfig, dist: DistInfo, logger,
                metrics: ScalarLog, progress) -> None:
    """Mean losses over every rank's steps since the last line, and the images per second over
    all ranks -> train.log, metrics.jsonl and TensorBoard."""
    avg = dist_utils.all_reduce_sum(state.loss_sum.clone()) / (
        max(state.loss_count, 1) * dist.world_size)
    avg = dict(zip(("total",) + LOSS_TERMS, avg.tolist()))
    state.loss_sum.zero_()
    state.loss_count = 0
    now = time.time()
    elapsed = now - state.t0
    eta = elapsed / max(state.step - state.step0, 1) * (cfg.max_iters - state.step)
    speed = ((state.step - state.step_log) * cfg.batch_size * dist.world_size
             / max(now - state.t_log, 1e-9))
    state.t_log, state.step_log = now, state.step
    if dist.is_main:
        msg = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
        logger.info(f"step {state.step}/{cfg.max_iters} lr {lr:.3e} | {msg} | "
                    f"{speed:.1f} img/s | elapsed {format_eta(elapsed)} eta {format_eta(eta)}")
        metrics.write(step=state.step, lr=lr, **{f"loss/{k}": v for k, v in avg.items()},
                      **{"speed/images_per_s": speed})
        if progress is not None:
            progress.set_postfix(loss=f"{avg['total']:.3f}")


def _evaluate_and_save(state: _Progress, t: Training, cfg: DictConfig, dist: DistInfo, logger,
                       val_loader: DataLoader, metrics: ScalarLog, progress, ckpt_dir) -> None:
    """Validation on its schedule (best.pth when Seg mIoU improves; overlays of rank 0's first
    val images to TensorBoard), then the checkpoints due."""
    step = state.step
    evaluate = should_eval(step, cfg) or step == cfg.max_iters
    save = step % cfg.save_every == 0 or step == cfg.max_iters or evaluate
    extra = {"best_miou": state.best}
    if evaluate:
        result = state.last_result = validate(t.model, val_loader, cfg, dist,
                                              progress=progress is not None)
        if dist.is_main:
            line = " ".join(f"{k}={result[k]['miou'] * 100:.2f}" for k in ("cam", "lam", "fused", "seg"))
            logger.info(f"val step {step}: mIoU {line} | cls F1 {result['f1'] * 100:.2f} "
                        f"({result['images']} images)")
            metrics.write(step=step, **{f"val/{k}_miou": result[k]["miou"]
                                        for k in ("cam", "lam", "fused", "seg")},
                          **{"val/f1": result["f1"]}, **val_scalars(result, cfg))
            if metrics.tb.enabled and cfg.log.images > 0:
                metrics.tb.images(step, "val", val_overlays(t.model, val_loader.dataset, cfg,
                                                            dist.device, cfg.log.images))
        if result["seg"]["miou"] > state.best:
            state.best = extra["best_miou"] = result["seg"]["miou"]
            if dist.is_main:
                run.save_checkpoint(ckpt_dir / "best.pth", t.model, None, None, step, cfg,
                                    {**extra, "val": result}, None)
    if save:
        ranks = run.gather_rank_state(dist, state.loss_sum, state.loss_count)
        if dist.is_main:
            run.save_checkpoint(ckpt_dir / "last.pth", t.model, t.optimizer, t.scaler, step, cfg,
                                extra, ranks)
            if step % cfg.save_every == 0:
                run.save_checkpoint(ckpt_dir / f"iter_{step}.pth", t.model, None, None, step, cfg,
                                    extra, None)
        dist_utils.barrier()


# ----------------------------------------------------------------------------- entry point
def _printed_by_rank_0(exc: BaseException) -> bool:
    return int(os.environ.get("RANK", 0)) != 0 and getattr(exc, "all_ranks", False)


def main(overrides: dict, argv: list[str] | None = None, hooks: Hooks | None = None) -> None:
    """Entry point of the training scripts: defaults <- overrides <- `key=value` arguments.

    With MORE_PREFLIGHT=1 only the checks run (used by run_train.sh before torchrun starts, so a
    bad input is one line instead of one traceback per process). A bad input exits with code 2
    after one `error: ...` line on stderr (printed once, by rank 0, when every rank hit it).
    hooks: see `Hooks` (tests only).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        with user_errors(USER_ERRORS, if_one_line=(ValueError,), silent=_printed_by_rank_0,
                         cleanup=dist_utils.cleanup):
            cfg = parse_cli(argv, TrainConfig, overrides)
            resolve_classes(cfg.data)   # data.name=tags: K + 1 from the dataset's class_names.txt
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and not cfg.resume:
                cfg.resume = "auto"  # a worker restarted by torchrun continues its run
            if os.environ.get("MORE_PREFLIGHT") == "1":
                run.preflight(cfg)
                return
            train(cfg, hooks)
    except RuntimeError as exc:
        if not dist_utils.peer_failed(exc):
            raise
        # Another rank stopped (its own message says why; torchrun stops this one anyway):
        # exit quietly instead of adding a traceback per surviving rank.
        sys.exit(EXIT_PEER_FAILED)
    dist_utils.cleanup()
