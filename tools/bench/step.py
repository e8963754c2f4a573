"""The training step, timed stage by stage: `wetr.step.train_step` itself runs under
torch.profiler, and each stage is the time of its labelled range (wetr/step.py STAGES; forward
hooks label the model's CAM passes), so the breakdown cannot drift from the engine.

Network time = the model calls (CAM passes and the training forward) + backward; the share outside
it covers CAM resizing/normalisation, PAR, labels, losses, the finite check and AdamW.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from datasets.synthetic import MAX_CLASSES, render
from utils.dist import DistInfo
from torch.profiler import record_function
from utils.metrics import IGNORE_INDEX

from utils.profiling import PeakMemory, medians, profiled, range_times, sync
from wetr.cam import IMAGENET_MEAN_255, IMAGENET_STD_255
from wetr.step import (LOSS_LABELS, LOSS_TERMS, STAGES, Batch, Training, build_training,
                       to_device, train_step)

CAM_PASSES = "network passes (CAM)"
NETWORK_STAGES = (CAM_PASSES, "forward", "backward")
# The labelled ranges inside compute_losses; what they leave out of it is its glue.
COMPUTE_LOSSES_PARTS = ("multi-scale CAM", "refined labels (PAR)", "forward", "token labels",
                        *dict.fromkeys(LOSS_LABELS.values()))


def synthetic_batch(batch: int, size: int, num_fg: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (B, 3, S, S) ImageNet-normalised, cls_label (B, K) 0/1, from datasets.synthetic.

    The renderer knows 16 classes; with K > 16 the rendered class c is used as class c
    (the remaining classes are simply absent), which keeps the labels' statistics VOC-like.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], torch.zeros(batch, num_fg)
    for i in range(batch):
        img, mask = render(rng, min(num_fg, MAX_CLASSES), size)
        images.append(torch.from_numpy(img).permute(2, 0, 1).float())
        present = [int(c) - 1 for c in np.unique(mask) if 0 < c < IGNORE_INDEX]
        labels[i, present] = 1.0
    x = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return (x - mean) / std, labels


def label_cam_passes(model: torch.nn.Module, name: str) -> list:
    """Forward hooks on `model` (the bare model's encoder) that put each of its no-grad calls (the
    CAM passes of the step, `model.cams`; the training forward runs with grad) in a profiler
    range labelled `name`; returns their handles."""
    open_ranges = []

    def before(module, args, kwargs):
        if not torch.is_grad_enabled():
            open_ranges.append(record_function(name))
            open_ranges[-1].__enter__()

    def after(module, args, kwargs, output):
        if not torch.is_grad_enabled():
            open_ranges.pop().__exit__(None, None, None)

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]


def _step(training: Training, batch: Batch, step: int, cfg: DictConfig) -> torch.Tensor:
    _, values, nonfinite = train_step(training, [batch], step, cfg)
    if any(nonfinite):
        raise FloatingPointError(f"non-finite loss in the benchmark step: {values.tolist()}")
    return values


def _derive(st: dict) -> None:
    """Rows computed from the timed stages of one step (then the median like every stage)."""
    st["other (compute_losses glue)"] = st["compute_losses"] - sum(st.get(k, 0.0) for k in COMPUTE_LOSSES_PARTS)
    st["network"] = sum(st.get(k, 0.0) for k in NETWORK_STAGES)
    st["outside network"] = st["step"] - st["network"]
    st["outside network, without optimizer"] = st["outside network"] - st["optimizer"]


def _count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_step(cfg: DictConfig, device: torch.device) -> tuple[dict, Training]:
    b = cfg.bench
    # As the training loop: the bound on present classes comes from the loader's CPU labels.
    batch = to_device(*synthetic_batch(cfg.batch_size, cfg.data.crop_size, cfg.data.num_classes - 1,
                                       b.seed), device, cfg.channels_last)
    step = b.step if b.step >= 0 else max(cfg.loss.after.values()) + 1
    mem = PeakMemory(device)
    mem_before = mem.current()
    # What `wetr.engine.main` builds before its loop (one process: no DDP), the CAM passes labelled.
    training = build_training(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=device))
    hooks = label_cam_passes(training.model.encoder, CAM_PASSES)
    training.model.train()
    params = sum(p.numel() for p in training.model.parameters())
    run = lambda: _step(training, batch, step, cfg)  # noqa: E731

    for _ in range(b.warmup):
        run()
    plain = []   # without the profiler: the throughput and the peak memory
    mem.reset()
    for _ in range(b.steps):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        plain.append(time.perf_counter() - t0)
    peak = mem.peak()

    steps = []
    for _ in range(b.steps):
        with profiled(device) as prof:
            sync(device)
            t0 = time.perf_counter()
            values = run()
            sync(device)
            wall = time.perf_counter() - t0
        st = range_times(prof, (*STAGES, CAM_PASSES), device)
        st["step"] = wall
        _derive(st)
        steps.append(st)
    stages = medians(steps)

    flops = _count_flops(run) if b.flops and not cfg.compile else None
    for h in hooks:
        h.remove()

    step_s = stages["step"]
    # Throughput figures use the step without the profiler.
    wall_s = statistics.median(plain)
    outside = stages["outside network"]
    # Medians are taken per stage, so the rows need not add up exactly to the median step.
    return {
        "iteration": step,
        "compute_losses_extra": {"num_present": batch.num_present},
        "params_M": params / 1e6,
        "step_s": step_s,
        "step_s_all": [st["step"] for st in steps],
        "step_s_unsynced": wall_s,
        "images_per_s": cfg.batch_size / wall_s,
        "stages_s": stages,
        "network_s": stages["network"],
        "outside_network_s": outside,
        "outside_network_share": outside / step_s,
        "outside_network_share_without_optimizer": stages["outside network, without optimizer"] / step_s,
        "cam_passes_share": stages.get("network passes (CAM)", 0.0) / step_s,
        "peak_memory_bytes": peak,
        "memory_before_model_bytes": mem_before,
        "peak_memory_kind": ("cuda max_memory_allocated" if device.type == "cuda" else
                             "process peak RSS (VmHWM)" + ("" if mem.resettable else ", lifetime")),
        "flops_per_step": flops,
        "achieved_tflops": flops / wall_s / 1e12 if flops else None,
        "loss_values": dict(zip(("total",) + LOSS_TERMS, values.tolist())),
    }, training
