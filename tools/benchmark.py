"""Training-step, inference and dense-energy benchmark (issue 6).

    # tiny, seconds on a CPU; bench.threads=1 keeps timings steady on a shared machine
    python -m tools.benchmark model.embed_dim=64 model.depth=4 model.num_heads=4 data.crop_size=64 \
        batch_size=2 data.num_classes=5 bench.energy_sizes=[32,64] bench.threads=1
    python -m tools.benchmark data.crop_size=224 batch_size=2 bench.threads=1   # ViT-B on a CPU
    # the paper's setting on a GPU (ViT-B/16, crop 448, batch 4, K=20), fp32 then bf16
    python -m tools.benchmark device=cuda data.crop_size=448 batch_size=4 data.num_classes=21 \
        amp=none bench.naive_max_gib=20        # then amp=bf16

Arguments are the training config's `key=value` overrides (utils.config.TrainConfig: model.*,
data.crop_size, data.num_classes, batch_size, amp, compile, channels_last, device, ...) plus
`bench.*` (BenchOptions below). Weights are random (model.pretrained=false by default); the batch
is rendered by datasets.synthetic so that the lattice and the labels see natural-looking images.

The training step is the engine's: `wetr.engine.compute_losses` itself is called, with the
functions it looks up at call time (multi_scale_cam, refine_label, token_labels, the losses) and
the two model handles wrapped in timers, so the breakdown cannot drift from the engine. On CUDA
every stage boundary synchronises; the un-instrumented step time (one sync per step) is reported
too. Network time = the model calls (CAM passes and the training forward) + backward; the share
outside it covers CAM resizing/normalisation, PAR, labels, losses, the finite check and AdamW.

Peak memory: CUDA max_memory_allocated; CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs where the kernel allows it, else the lifetime peak). Results go to
`<bench.out_dir>/<name>.json` and `<name>.md`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import wetr.engine as engine
import wetr.losses as wetr_losses
from datasets.synthetic import MAX_CLASSES, render
from utils.config import ConfigError, TrainConfig, parse_cli, to_container
from utils.dist import resolve_device
from utils.logger import git_revision
from wetr.cam import IMAGENET_MEAN_255, IMAGENET_STD_255, multi_scale_cam
from wetr.energy import bilateral_features, dense_energy_loss, exact_gaussian_filter
from wetr.optim import set_lr
from wetr.par import PAR
from wetr.permutohedral import permutohedral_filter


@dataclass
class BenchOptions:
    warmup: int = 2                     # un-timed steps first (allocator, autotuning; >= 3 with compile)
    steps: int = 5                      # timed steps; medians are reported
    step: int = -1                      # iteration given to compute_losses; -1: every term on
    seed: int = 0                       # seed of the random weights and batch
    flops: bool = True                  # count FLOPs of one step (torch.utils.flop_counter)
    infer: bool = True                  # inference throughput, single- and multi-scale
    infer_size: int = 0                 # 0: data.crop_size
    infer_images: int = 4               # images per inference pass
    energy: bool = True                 # dense energy filters: lattice, exact, naive N x N
    energy_sizes: list[int] = field(default_factory=lambda: [112, 224])  # filter grid (crop / 2)
    energy_repeats: int = 3             # timed runs of each filter (median)
    naive_max_gib: float = 4.0          # naive N x N only where B*N*N float32 x 2 fits in this
    out_dir: str = "logs/benchmarks"    # where <name>.json and <name>.md go
    name: str = ""                      # file stem; default from device and config
    threads: int = 0                    # CPU threads (torch.set_num_threads); 0: torch's default.
    # On a loaded machine 1 thread is far steadier: OpenMP regions stall on descheduled threads.


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchOptions = field(default_factory=BenchOptions)


DEFAULTS = {"model": {"pretrained": False}, "data": {"num_classes": 21}, "batch_size": 4}
NETWORK_STAGES = ("network passes (CAM)", "forward", "backward")


# ----------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory since `reset()`: CUDA allocated bytes, or CPU resident set (VmHWM)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _rss_bytes()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _read_hwm_bytes()


class StageTimer:
    """Wall time per named stage, summed within a step; synchronises the device at each edge."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.enabled = True

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.steps[-1][name] += time.perf_counter() - t0

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        timed.__wrapped__ = fn
        return timed

    def medians(self) -> dict[str, float]:
        names = list(dict.fromkeys(k for s in self.steps for k in s))
        return {k: statistics.median(s.get(k, 0.0) for s in self.steps) for k in names}


# Functions compute_losses looks up at call time, by module attribute, and their stage names.
ENGINE_STAGES = {"multi_scale_cam": "multi-scale CAM", "refine_label": "refined labels (PAR)",
                 "token_labels": "token labels"}
LOSS_STAGES = {"class_token_loss": "loss tokens", "cle_loss": "loss CLE", "une_loss": "loss UNE",
               "ptc_loss": "loss PTC", "seg_loss": "loss seg", "dense_energy_loss": "loss reg (dense energy)"}


@contextmanager
def instrumented(timer: StageTimer) -> Iterator[None]:
    """Wrap the engine's stage functions and losses in timers for the duration of the block."""
    with ExitStack() as stack:
        for attr, name in ENGINE_STAGES.items():
            stack.enter_context(mock.patch.object(engine, attr, timer.wrap(getattr(engine, attr), name)))
        for attr, name in LOSS_STAGES.items():
            stack.enter_context(mock.patch.object(wetr_losses, attr,
                                                  timer.wrap(getattr(wetr_losses, attr), name)))
        stack.enter_context(mock.patch.object(
            F, "multilabel_soft_margin_loss", timer.wrap(F.multilabel_soft_margin_loss, "loss cls + cls_aux")))
        yield


# ----------------------------------------------------------------------------- setup
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
        present = [int(c) - 1 for c in np.unique(mask) if 0 < c < 255]
        labels[i, present] = 1.0
    x = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return (x - mean) / std, labels


@dataclass
class Trainer:
    """What `wetr.engine.train` builds before its loop (same calls, same order)."""
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    par: PAR
    amp_dtype: torch.dtype | None


def build_trainer(cfg: DictConfig, device: torch.device) -> Trainer:
    model, optimizer, scaler, par, amp_dtype = engine.build_training(cfg, device)
    train_model = torch.compile(model) if cfg.compile else model
    model.train()
    return Trainer(model, train_model, optimizer, scaler, par, amp_dtype)


def train_step(t: Trainer, images: torch.Tensor, cls_label: torch.Tensor, step: int, cfg: DictConfig,
               timer: StageTimer, extra: dict | None = None) -> torch.Tensor:
    """One iteration of the engine's loop body, each part in a timed stage.
    `extra`: keyword arguments for compute_losses (e.g. num_present, where the engine has it)."""
    with timer.stage("optimizer"):
        set_lr(t.optimizer, step, cfg)
    with timer.stage("compute_losses"):
        total, terms = engine.compute_losses(
            timer.wrap(t.train_model, "forward"), timer.wrap(t.model, "network passes (CAM)"), t.par,
            images, cls_label, step, cfg, t.amp_dtype, **(extra or {}))
    with timer.stage("finite check (1 sync)"):
        values = torch.stack([total.detach()] + [terms[k].detach().float() for k in engine.LOSS_TERMS])
        if (~torch.isfinite(values)).any().item():
            raise FloatingPointError(f"non-finite loss in the benchmark step: {values.tolist()}")
    with timer.stage("backward"):
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(total).backward()
    with timer.stage("optimizer"):
        t.scaler.step(t.optimizer)
        t.scaler.update()
    return values


# ----------------------------------------------------------------------------- parts
def bench_step(cfg: DictConfig, device: torch.device) -> tuple[dict, Trainer]:
    b = cfg.bench
    images, cls_label = synthetic_batch(cfg.batch_size, cfg.data.crop_size, cfg.data.num_classes - 1, b.seed)
    # As a training loop would: the bound on present classes comes from the loader's CPU labels.
    extra = {"num_present": int(cls_label.sum(dim=1).max())}
    images, cls_label = images.to(device), cls_label.to(device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    step = b.step if b.step >= 0 else max(cfg.loss.after.values()) + 1
    mem = PeakMemory(device)
    mem_before = mem.current()
    t = build_trainer(cfg, device)
    params = sum(p.numel() for p in t.model.parameters())

    timer = StageTimer(device)
    timer.enabled = False
    timer.new_step()
    for _ in range(b.warmup):
        train_step(t, images, cls_label, step, cfg, timer, extra)

    plain = []
    if device.type == "cuda":  # one sync per step, as in training
        for _ in range(b.steps):
            _sync(device)
            t0 = time.perf_counter()
            train_step(t, images, cls_label, step, cfg, timer, extra)
            _sync(device)
            plain.append(time.perf_counter() - t0)

    timer.enabled = True
    timer.steps.clear()
    mem.reset()
    with instrumented(timer):
        for _ in range(b.steps):
            timer.new_step()
            _sync(device)
            t0 = time.perf_counter()
            values = train_step(t, images, cls_label, step, cfg, timer, extra)
            _sync(device)
            timer.steps[-1]["step"] = time.perf_counter() - t0
    peak = mem.peak()
    top = ("multi-scale CAM", "refined labels (PAR)", "forward", "token labels",
           *LOSS_STAGES.values(), "loss cls + cls_aux")
    for st in timer.steps:  # derived per step, then the median like every stage
        st["other (compute_losses glue)"] = st["compute_losses"] - sum(st.get(k, 0.0) for k in top)
        st["network"] = sum(st.get(k, 0.0) for k in NETWORK_STAGES)
        st["outside network"] = st["step"] - st["network"]
        st["outside network, without optimizer"] = st["outside network"] - st["optimizer"]
    steps = list(timer.steps)
    stages = timer.medians()

    flops = None
    if b.flops and not cfg.compile:
        from torch.utils.flop_counter import FlopCounterMode
        quiet = StageTimer(device)
        quiet.enabled = False
        with FlopCounterMode(display=False) as counter:
            train_step(t, images, cls_label, step, cfg, quiet, extra)
        flops = counter.get_total_flops()

    step_s = stages["step"]
    # Throughput figures use the un-instrumented step where there is one (CUDA).
    wall_s = statistics.median(plain) if plain else step_s
    network = stages["network"]
    outside = stages["outside network"]
    # Medians are taken per stage, so the rows need not add up exactly to the median step.
    return {
        "iteration": step,
        "compute_losses_extra": extra,
        "params_M": params / 1e6,
        "step_s": step_s,
        "step_s_all": [st["step"] for st in steps],
        "step_s_unsynced": statistics.median(plain) if plain else None,
        "images_per_s": cfg.batch_size / wall_s,
        "stages_s": stages,
        "network_s": network,
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
        "loss_values": dict(zip(("total",) + engine.LOSS_TERMS, values.tolist())),
    }, t


def _timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_infer(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict:
    """Images/s: segmentation (SPEC 8, one image at a time as tools.infer_seg_voc, 1 and 3 scales)
    and batched multi-scale CAMs at the training scales (validation, pseudo labels)."""
    from tools.config import SEG_SCALES
    from wetr.infer import multi_scale_seg

    b = cfg.bench
    size = b.infer_size or cfg.data.crop_size
    n = max(b.infer_images, 1)
    images, _ = synthetic_batch(n, size, cfg.data.num_classes - 1, b.seed + 1)
    images = images.to(device)
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp),
               enabled=cfg.amp != "none")
    model.eval()
    out = {"size": size, "images": n}
    with torch.no_grad(), torch.autocast(**amp):
        for key, scales in (("seg_single_scale", (1.0,)), ("seg_multi_scale", SEG_SCALES)):
            def run():
                for i in range(n):
                    multi_scale_seg(model, images[i:i + 1], size, scales, (size, size))
            out[key] = {"scales": list(scales), "images_per_s": n / _timeit(run, device, 1)}
        cam_scales = list(cfg.cam.scales)
        for key, scales in (("cam_single_scale", [1.0]), ("cam_multi_scale", cam_scales)):
            sec = _timeit(lambda: multi_scale_cam(model, images, scales), device, 1)
            out[key] = {"scales": scales, "batch": n, "images_per_s": n / sec}
    model.train()
    return out


def naive_gaussian_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The N x N reference: features (B, N, d), values (B, N, C) -> (B, N, C)."""
    return torch.exp(-0.5 * torch.cdist(features, features).square()) @ values


def bench_energy(cfg: DictConfig, device: torch.device) -> list[dict]:
    """Bilateral filter AS (SPEC 5) on an S x S grid (the loss filters at crop/2): lattice,
    exact (fused attention), naive N x N; and the whole loss, forward + backward, at crop 2S."""
    b, r = cfg.bench, cfg.reg
    B, C = cfg.batch_size, cfg.data.num_classes
    mem = PeakMemory(device)
    rows = []
    for size in b.energy_sizes:
        x, _ = synthetic_batch(B, size, C - 1, b.seed + 2)
        img255 = (x * torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
                  + torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)).to(device)
        gen = torch.Generator().manual_seed(b.seed)
        logits = F.interpolate(torch.randn(B, C, size // 8, size // 8, generator=gen) * 4, size=(size, size),
                               mode="bilinear", align_corners=False).to(device)
        values = logits.softmax(1).flatten(2).transpose(1, 2).contiguous()
        feats = bilateral_features(img255, r.sigma_rgb, r.sigma_xy * r.scale)
        n = size * size
        row = {"grid": f"{size}x{size}", "crop": 2 * size, "N": n, "batch": B, "channels": C}
        results = {}
        methods = {"permutohedral": lambda: permutohedral_filter(feats, values),
                   "exact (fused attention)": lambda: exact_gaussian_filter(feats, values)}
        naive_bytes = 2 * B * n * n * 4
        if naive_bytes <= b.naive_max_gib * 2**30:
            methods["naive N x N"] = lambda: naive_gaussian_filter(feats, values)
        for name, fn in methods.items():
            with torch.no_grad():
                results[name] = fn()
                base = mem.current()
                mem.reset()
                sec = _timeit(fn, device, b.energy_repeats, warmup=0)
                peak = mem.peak()
            row[name] = {"ms": sec * 1e3, "peak_extra_MiB": None if peak is None or base is None
                         else max(peak - base, 0) / 2**20}
        if "naive N x N" not in methods:
            row["naive N x N"] = {"skipped": f"needs ~{naive_bytes / 2**30:.1f} GiB > "
                                             f"bench.naive_max_gib={b.naive_max_gib}"}
        exact = results["exact (fused attention)"]
        row["lattice_over_exact_sum"] = float(results["permutohedral"].sum() / exact.sum())
        if "naive N x N" in results:
            naive = results["naive N x N"]
            row["exact_vs_naive_max_rel_err"] = float(((exact - naive).abs().max() / naive.abs().max()))
        label = torch.zeros(B, 2 * size, 2 * size, dtype=torch.long, device=device)
        big = F.interpolate(img255, scale_factor=2, mode="nearest")
        seg = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        for method in ("permutohedral", "exact"):
            def loss_fwd_bwd():
                s = seg.detach().requires_grad_(True)
                dense_energy_loss(big, s, label, weight=r.weight, sigma_rgb=r.sigma_rgb, sigma_xy=r.sigma_xy,
                                  scale=r.scale, filter=method, exact_scale=r.exact_scale).backward()
            row[f"loss fwd+bwd {method} ms"] = _timeit(loss_fwd_bwd, device, b.energy_repeats) * 1e3
        rows.append(row)
    # Naive time where it was skipped: O(N^2) from the largest measured grid, marked as such.
    measured = [rw for rw in rows if "ms" in rw["naive N x N"]]
    for rw in rows:
        if "skipped" in rw["naive N x N"] and measured:
            ref = measured[-1]
            rw["naive N x N"]["ms_extrapolated"] = ref["naive N x N"]["ms"] * (rw["N"] / ref["N"]) ** 2
    return rows


# ----------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def default_name(cfg: DictConfig, device: torch.device) -> str:
    m = cfg.model
    enc = f"d{m.embed_dim}x{m.depth}" if m.embed_dim else cfg.model.backbone.split("_")[1]
    if m.patch_size not in (None, 16):
        enc += f"p{m.patch_size}"
    if m.decoder_dim != 512:
        enc += f"dec{m.decoder_dim}"
    if m.decoder_dilation != 5:
        enc += f"dil{m.decoder_dilation}"
    parts = [device.type, enc, f"c{cfg.data.crop_size}", f"b{cfg.batch_size}", f"k{cfg.data.num_classes - 1}",
             "fp32" if cfg.amp == "none" else cfg.amp]
    if cfg.compile:
        parts.append("compile")
    if cfg.channels_last:
        parts.append("cl")
    return "_".join(str(p) for p in parts)


def _fmt_ms(sec: float | None) -> str:
    return "-" if sec is None else f"{sec * 1e3:.1f}"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(res: dict) -> str:
    lines = [f"# Benchmark {res['name']}", "",
             f"{res['device']} | torch {res['torch']} | git {res['git']} | {res['time']} | "
             f"load avg before/after {res['load_before']} / {res['load_after']}", "",
             f"Config: {res['summary']}", ""]
    s = res.get("step")
    if s:
        st = s["stages_s"]
        lines += [f"## Training step (iteration {s['iteration']}, all loss terms on), median of "
                  f"{len(s['step_s_all'])} after {res['config']['bench']['warmup']} warm-up", "",
                  "| stage | ms | share |", "|---|---:|---:|"]
        order = ["multi-scale CAM", "network passes (CAM)", "refined labels (PAR)", "forward", "token labels",
                 "loss cls + cls_aux", *LOSS_STAGES.values(), "other (compute_losses glue)",
                 "finite check (1 sync)", "backward", "optimizer"]
        for k in order:
            if k in st:
                indent = "&nbsp;&nbsp;of which " if k == "network passes (CAM)" else ""
                lines.append(f"| {indent}{k} | {_fmt_ms(st[k])} | {st[k] / s['step_s'] * 100:.1f} % |")
        lines.append(f"| **step** | **{_fmt_ms(s['step_s'])}** | 100 % |")
        lines += ["",
                  f"- steps (s): {', '.join(f'{v:.3f}' for v in s['step_s_all'])}"
                  + (f"; un-instrumented {s['step_s_unsynced']:.3f} s" if s["step_s_unsynced"] else ""),
                  f"- {s['images_per_s']:.2f} images/s; {s['params_M']:.1f} M parameters",
                  f"- outside encoder/decoder passes (CAM passes + forward + backward): "
                  f"**{s['outside_network_share'] * 100:.1f} %** of the step "
                  f"({s['outside_network_share_without_optimizer'] * 100:.1f} % without AdamW)",
                  f"- peak memory {_fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']}; "
                  f"{_fmt_bytes(s['memory_before_model_bytes'])} before the model was built)"]
        if s["flops_per_step"]:
            lines.append(f"- {s['flops_per_step'] / 1e12:.3f} TFLOP per step -> achieved "
                         f"{s['achieved_tflops']:.3f} TFLOP/s")
    inf = res.get("infer")
    if inf:
        lines += ["", f"## Inference ({inf['size']} px, {inf['images']} images)", "",
                  "| mode | scales | images/s |", "|---|---|---:|"]
        for k in ("seg_single_scale", "seg_multi_scale", "cam_single_scale", "cam_multi_scale"):
            v = inf[k]
            lines.append(f"| {k.replace('_', ' ')} | {v['scales']} | {v['images_per_s']:.2f} |")
    en = res.get("energy")
    if en:
        lines += ["", "## Dense energy filter AS (batch x K+1 channels; the loss filters at crop/2)", "",
                  "| grid | N | lattice ms | exact ms | naive N x N ms | naive / lattice | naive / exact "
                  "| extra peak MiB (lattice / exact / naive) | loss fwd+bwd ms (lattice / exact) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for rw in en:
            lat, ex, nv = rw["permutohedral"], rw["exact (fused attention)"], rw["naive N x N"]
            nv_ms = nv.get("ms", nv.get("ms_extrapolated"))
            star = "" if "ms" in nv else " (extrapolated, not run)"
            mib = " / ".join("-" if v.get("peak_extra_MiB") is None else f"{v['peak_extra_MiB']:.0f}"
                             for v in (lat, ex, nv))
            ratio = ("-", "-") if nv_ms is None else (f"{nv_ms / lat['ms']:.1f}x", f"{nv_ms / ex['ms']:.1f}x")
            naive_txt = "-" if nv_ms is None else f"{nv_ms:.1f}{star}"
            losses = f"{rw['loss fwd+bwd permutohedral ms']:.1f} / {rw['loss fwd+bwd exact ms']:.1f}"
            lines.append(f"| {rw['grid']} | {rw['N']} | {lat['ms']:.1f} | {ex['ms']:.1f} | {naive_txt} | "
                         f"{ratio[0]} | {ratio[1]} | {mib} | {losses} |")
        lines += ["", "Extra peak: growth of the peak memory during the call (CPU: process RSS; 0 = no "
                  "memory beyond what the process already held). Extrapolated naive times scale the "
                  "largest measured one by N^2.", ""]
        lines.append("lattice / exact sum(AS): " + ", ".join(
            f"{rw['grid']} {rw['lattice_over_exact_sum']:.3f}" for rw in en))
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> dict:
    cfg = parse_cli(argv, BenchConfig, DEFAULTS)
    b = cfg.bench
    if b.steps < 1:
        raise ConfigError("bench.steps must be >= 1")
    try:  # a model the config cannot build is one line, as in training (no weights made here)
        with torch.device("meta"):
            engine.model_from_config(cfg, pretrained=False)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    device = resolve_device(cfg.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if b.threads > 0:
        torch.set_num_threads(b.threads)
    torch.manual_seed(b.seed)
    m = cfg.model
    summary = (f"{m.backbone} D={m.embed_dim or 'default'} depth={m.depth or 'default'} "
               f"heads={m.num_heads or 'default'} patch={m.patch_size or 16} "
               f"decoder={m.decoder_dim} dilation={m.decoder_dilation} | crop {cfg.data.crop_size} | "
               f"batch {cfg.batch_size} | "
               f"K={cfg.data.num_classes - 1} | amp {cfg.amp} | compile {cfg.compile} | "
               f"channels_last {cfg.channels_last} | CAM scales {list(cfg.cam.scales)} | "
               f"reg.filter {cfg.reg.filter}")
    name = b.name or default_name(cfg, device)
    res: dict[str, Any] = {"name": name, "device": device_name(device), "torch": torch.__version__,
                           "git": git_revision(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "load_before": [round(v, 2) for v in os.getloadavg()],
                           "summary": summary, "config": to_container(cfg)}
    print(f"[benchmark] {name}: {summary} on {res['device']}", file=sys.stderr)
    step_res, trainer = bench_step(cfg, device)
    res["step"] = step_res
    print(f"[benchmark] step {step_res['step_s']:.3f} s, outside network "
          f"{step_res['outside_network_share'] * 100:.1f} %", file=sys.stderr)
    if b.infer:
        res["infer"] = bench_infer(cfg, trainer.model, device)
    del trainer
    if b.energy:
        res["energy"] = bench_energy(cfg, device)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(b.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    text = markdown(res)
    (out / f"{name}.md").write_text(text)
    print(text)
    return res


def main(argv: list[str] | None = None) -> None:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
