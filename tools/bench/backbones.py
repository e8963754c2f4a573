"""The backbone table of docs/BACKBONES.md: per family its timm tag, patch size, parameter count,
the network GFLOPs of one training step at the paper's setting, and the measured step time and
peak memory at a small setting, with and without `model.grad_checkpointing`.

    python -m tools.bench.backbones                          # every family, crop 112, batch 2
    python -m tools.bench.backbones families=[DeiT-B/16] steps=3 threads=2

GFLOPs are counted by torch.utils.flop_counter on the meta device (nothing runs): the training
forward, its backward and the no-grad multi-scale CAM passes (the config's scales, with flips) at
crop 448, batch 4, K=20; PAR, the losses and AdamW are not counted (a few percent). The timed step
is `wetr.step.train_step` itself, every loss term on (the late-training step), random weights,
rendered synthetic images; peak memory is the device's peak allocation (CUDA) or the process's
peak resident set since the model was built (CPU). Results go to
`<out_dir>/<date>_<device>_backbones_c<crop>_b<batch>_k<K>.json` and `.md`.
"""
from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tools.bench.report import device_name
from tools.bench.step import synthetic_batch
from tools.cli import parse_cli
from utils.config import ConfigError, option, to_container
from utils.dist import DistInfo, resolve_device
from utils.errors import user_errors
from utils.profiling import PeakMemory, sync
from wetr.cam import multi_scale_cam
from wetr.backbones import FAMILY_TAGS
from wetr.config import make_config
from wetr.factory import model_from_config
from wetr.step import build_training, to_device, train_step


@dataclass
class BackbonesBench:
    families: list[str] = option(list(FAMILY_TAGS), "rows to measure (FAMILY_TAGS keys)")
    crop: int = option(112, "timed step: crop (pixels)")
    batch: int = option(2, "timed step: images")
    num_classes: int = option(21, "K + 1, both settings")
    flops_crop: int = option(448, "counted step: crop")
    flops_batch: int = option(4, "counted step: images")
    steps: int = option(2, "timed steps (median) after one untimed")
    threads: int = option(0, "torch threads; 0: torch's default")
    device: str = option("cpu", "cpu | cuda")
    out_dir: str = option("logs/benchmarks", "folder of the JSON and MD records")


def _config(tag: str, crop: int, batch: int, num_classes: int, checkpointing: bool = False):
    return make_config(None, [f"model.backbone={tag}", "model.pretrained=false",
                              f"model.grad_checkpointing={str(checkpointing).lower()}",
                              f"data.crop_size={crop}", f"batch_size={batch}",
                              f"data.num_classes={num_classes}", "loss.after.seg=-1",
                              "loss.after.reg=-1"])


def count(tag: str, b: BackbonesBench) -> dict:
    """Parameters and the network GFLOPs of one training step, on the meta device."""
    cfg = _config(tag, b.flops_crop, b.flops_batch, b.num_classes)
    with torch.device("meta"):
        model = model_from_config(cfg)
        images = torch.randn(b.flops_batch, 3, b.flops_crop, b.flops_crop)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, with_cams=True)
        multi_scale_cam(model, images, cfg.cam.scales, first=out.cams)
        sum(o.sum() for o in (out.cls_logits, out.aux_logits, out.seg_logits, out.class_tokens,
                              out.patch_map)).backward()
    return {"tag": tag, "patch": model.patch_size, "embed_dim": model.embed_dim,
            "depth": model.encoder.depth,
            "params_encoder_M": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_gflops": counter.get_total_flops() / 1e9}


def time_step(tag: str, b: BackbonesBench, device: torch.device, checkpointing: bool) -> dict:
    """Median wall time of `train_step` and the peak memory over the timed steps."""
    cfg = _config(tag, b.crop, b.batch, b.num_classes, checkpointing)
    torch.manual_seed(0)
    memory = PeakMemory(device)
    memory.reset()
    training = build_training(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=device))
    batch = to_device(*synthetic_batch(b.batch, b.crop, b.num_classes - 1, seed=0), device)
    times = []
    for step in range(b.steps + 1):
        sync(device)
        start = time.perf_counter()
        train_step(training, [batch], step, cfg)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = memory.peak()
    return {"step_s": statistics.median(times[1:]),
            "peak_GiB": None if peak is None else peak / 2 ** 30,
            "peak_is_since_build": memory.resettable or device.type == "cuda"}


def markdown(rows: list[dict], b: BackbonesBench, machine: str) -> str:
    k = b.num_classes - 1
    lines = [f"# Backbones: {machine}, {datetime.date.today()}", "",
             f"Counted: network GFLOPs of one training step at crop {b.flops_crop}, batch "
             f"{b.flops_batch}, K={k} (forward + backward + multi-scale CAM passes). Timed: "
             f"`train_step` at crop {b.crop}, batch {b.batch}, K={k}, median of {b.steps} "
             f"after one untimed; peak memory of the process (CPU: resident set).", "",
             "| family | timm tag | patch | D x depth | params (encoder / all) | GFLOPs/step | "
             "step s | peak GiB | step s, grad ckpt | peak GiB, grad ckpt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plain, ckpt = r["timed"], r["timed_grad_checkpointing"]
        lines.append(
            f"| {r['family']} | `{r['tag']}` | {r['patch']} | {r['embed_dim']} x {r['depth']} | "
            f"{r['params_encoder_M']:.1f}M / {r['params_M']:.1f}M | {r['step_gflops']:.0f} | "
            f"{plain['step_s']:.2f} | {plain['peak_GiB']:.2f} | {ckpt['step_s']:.2f} | "
            f"{ckpt['peak_GiB']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    b = BackbonesBench(**to_container(parse_cli(argv, BackbonesBench)))
    unknown = [f for f in b.families if f not in FAMILY_TAGS]
    if unknown:
        raise ConfigError(f"unknown family {unknown[0]!r}; families: {', '.join(FAMILY_TAGS)}")
    if b.threads > 0:
        torch.set_num_threads(b.threads)
    device = resolve_device(b.device, 0)
    machine = device_name(device)
    rows = []
    for family in b.families:
        tag = FAMILY_TAGS[family]
        row = {"family": family, **count(tag, b)}
        row["timed"] = time_step(tag, b, device, checkpointing=False)
        row["timed_grad_checkpointing"] = time_step(tag, b, device, checkpointing=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = (f"{datetime.date.today()}_{device.type}_backbones_c{b.crop}_b{b.batch}_"
            f"k{b.num_classes - 1}")
    out = Path(b.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "setting": {k: getattr(b, k) for k in BackbonesBench.__dataclass_fields__},
         "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown(rows, b, machine))
    print(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
