"""Training-step, inference and dense-energy benchmark (issue 6).

    # tiny, seconds on a CPU; bench.threads=1 keeps timings steady on a shared machine
    python -m tools.benchmark model.embed_dim=64 model.depth=4 model.num_heads=4 data.crop_size=64 \
        batch_size=2 data.num_classes=5 bench.energy_sizes=[32,64] bench.threads=1
    python -m tools.benchmark data.crop_size=224 batch_size=2 bench.threads=1   # ViT-B on a CPU
    # DenseCRF only (torch vs pydensecrf2, 500x375, 21 channels; the tiny step takes seconds)
    python -m tools.benchmark model.embed_dim=64 model.depth=4 model.num_heads=4 data.crop_size=64 \
        batch_size=2 bench.infer=false bench.energy=false bench.threads=1 bench.name=cpu_crf_voc
    # the paper's setting on a GPU (ViT-B/16, crop 448, batch 4, K=20), fp32 then bf16
    python -m tools.benchmark device=cuda data.crop_size=448 batch_size=4 data.num_classes=21 \
        amp=none bench.naive_max_gib=20        # then amp=bf16

Arguments are the training config's `key=value` overrides (wetr.config.TrainConfig: model.*,
data.crop_size, data.num_classes, batch_size, amp, compile, channels_last, device, ...) plus
`bench.*` (BenchOptions below). Weights are random (model.pretrained=false by default); the batch
is rendered by datasets.synthetic so that the lattice and the labels see natural-looking images.

The training step is the engine's: `wetr.step.train_step` itself runs under torch.profiler, and
each stage is the time of the range the step labels for it (CPU time on the CPU, kernel time on
CUDA; tools/bench/step.py), so the breakdown cannot drift from the engine. The step time without
the profiler is reported too.
Inference: tools/bench/infer.py; dense energy filters: tools/bench/energy.py; DenseCRF, torch vs
pydensecrf2 (1 and 2 processes, and the device), and the tools' segmentation route per image
with each CRF backend and its COCO val projection: tools/bench/crf.py; stage times and peak
memory: utils/profiling.py. Results go to `<bench.out_dir>/<name>.json` and `<name>.md`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tools.bench.crf import bench_crf, bench_seg_route, crf_markdown, seg_route_markdown
from tools.bench.energy import bench_energy
from tools.bench.infer import bench_infer
from tools.bench.report import default_name, device_name, markdown
from tools.bench.step import bench_step
from tools.cli import parse_cli
from utils.config import ConfigError, option, to_container
from utils.dist import resolve_device
from utils.errors import user_errors
from utils.io import write_text_atomic
from utils.logger import git_revision
from wetr.config import TrainConfig
from wetr.factory import model_from_config


@dataclass
class BenchOptions:
    warmup: int = option(2, "un-timed steps first (allocator, autotuning; >= 3 with compile)")
    steps: int = option(5, "timed steps; medians are reported")
    step: int = option(-1, "iteration given to compute_losses; -1: every term on")
    seed: int = option(0, "RNG seed of the random weights and batch")
    flops: bool = option(True, "count FLOPs of one step (torch.utils.flop_counter)")
    infer: bool = option(True, "inference throughput, single- and multi-scale")
    infer_size: int = option(0, "0: data.crop_size")
    infer_images: int = option(4, "images per inference pass")
    energy: bool = option(True, "dense energy filters: lattice, exact, naive N x N")
    energy_sizes: list[int] = option([112, 224], "filter grid (crop / 2)")
    energy_repeats: int = option(3, "timed runs of each filter (median)")
    naive_max_gib: float = option(4.0, "naive N x N only where B*N*N float32 x 2 fits in this")
    crf: bool = option(True, "DenseCRF images/s: torch backend vs pydensecrf2")
    crf_images: int = option(4, "images per CRF measurement (>= 2)")
    crf_size: list[int] = option([375, 500], "(H, W): VOC size")
    crf_processes: list[int] = option([1, 2], "CPU processes")
    seg_route: bool = option(True, "the tools' segmentation route per image (multi-scale + CRF, "
                                   "each backend) and the COCO val time it projects")
    route_images: int = option(2, "timed images of the segmentation route (after one warm-up)")
    out_dir: str = option("logs/benchmarks", "where <name>.json and <name>.md go")
    name: str = option("", "file stem; default from device and config")
    threads: int = option(0, "CPU threads (torch.set_num_threads); 0: torch's default. On a "
                             "loaded machine 1 thread is far steadier: OpenMP regions stall on "
                             "descheduled threads.")


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchOptions = field(default_factory=BenchOptions)


DEFAULTS = {"model": {"pretrained": False}, "data": {"num_classes": 21}, "batch_size": 4}


def run(argv: list[str]) -> dict:
    cfg = parse_cli(argv, BenchConfig, DEFAULTS)
    b = cfg.bench
    if b.steps < 1:
        raise ConfigError("bench.steps must be >= 1")
    with torch.device("meta"):  # a model the config cannot build is one line (no weights made)
        model_from_config(cfg, pretrained=False)
    device = resolve_device(cfg.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if b.threads > 0:
        torch.set_num_threads(b.threads)
    torch.manual_seed(b.seed)
    m = cfg.model
    summary = (f"{m.backbone} D={m.embed_dim or 'default'} depth={m.depth or 'default'} "
               f"heads={m.num_heads or 'default'} patch={m.patch_size or 'default'} "
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
    if b.seg_route:
        res["seg_route"] = bench_seg_route(cfg, trainer.model, device)
    del trainer
    if b.energy:
        res["energy"] = bench_energy(cfg, device)
    if b.crf:
        res["crf"] = bench_crf(cfg, device)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(b.out_dir)
    write_text_atomic(out / f"{name}.json", json.dumps(res, indent=1, default=float) + "\n")
    text = (markdown(res) + (crf_markdown(res["crf"]) if "crf" in res else "")
            + (seg_route_markdown(res["seg_route"]) if "seg_route" in res else ""))
    write_text_atomic(out / f"{name}.md", text)
    print(text)
    return res


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
