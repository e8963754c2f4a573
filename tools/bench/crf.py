"""DenseCRF throughput (METHOD.md §8, issue 29): the torch backend (wetr.densecrf) vs pydensecrf2 at
VOC size on a segmentation softmax (K+1 channels, the largest stack the tools pass), in 1 and
2 CPU processes, and on the benchmark's device (one image at a time and batched); and the whole
segmentation route of the tools per image (`tools.routes.seg_route`, multi-scale + flip, then
`tools.crf_step.CRFStep` with each backend), with the time of COCO val it projects."""
from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import torch
from omegaconf import DictConfig

from datasets.synthetic import MAX_CLASSES, render
from datasets.transforms import normalise
from tools.config import SEG_SCALES
from tools.crf_step import CRFStep
from tools.routes import Item, RouteParams, seg_route
from utils.profiling import sync, timeit
from wetr.densecrf import dense_crf, pydensecrf_installed


def crf_inputs(n: int, height: int, width: int, classes: int, seed: int) -> list[tuple]:
    """n (image (H, W, 3) uint8, probs (C, H, W) float32, keys (C,)) from datasets.synthetic:
    a square render cropped to H x W, and a softmax of low-resolution noisy logits that favour
    the true class (as a segmentation head's, upsampled)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image, label = render(rng, min(classes - 1, MAX_CLASSES), max(height, width))
        image, label = image[:height, :width], label[:height, :width]
        small = (width // 8, height // 8)
        logits = np.stack([cv2.resize(rng.normal(0, 1, small[::-1]).astype(np.float32)
                                      + 3.0 * cv2.resize((label == c).astype(np.float32), small),
                                      (width, height)) for c in range(classes)])
        probs = torch.from_numpy(logits).softmax(0).numpy()
        out.append((np.ascontiguousarray(image), probs, np.arange(classes)))
    return out


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def cpu_images_per_s(backend: str, inputs: list[tuple], processes: int) -> float:
    """Images/s of the backend's `CRFStep.label_map` on the CPU: in this process (processes ==
    1, its torch threads) or spread over `processes` spawned workers with 1 thread each, after
    one warm-up image each."""
    label_map = CRFStep(backend).label_map
    if processes == 1:
        label_map(*inputs[0])
        t0 = time.perf_counter()
        for item in inputs:
            label_map(*item)
        return len(inputs) / (time.perf_counter() - t0)
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(1,)) as pool:
        list(pool.map(label_map, *zip(*inputs[:1] * processes)))
        t0 = time.perf_counter()
        list(pool.map(label_map, *zip(*inputs)))
        return len(inputs) / (time.perf_counter() - t0)


def bench_crf(cfg: DictConfig, device: torch.device) -> dict:
    """bench.crf_images images of bench.crf_size (H, W) with data.num_classes channels."""
    b = cfg.bench
    height, width = b.crf_size
    inputs = crf_inputs(max(b.crf_images, 2), height, width, cfg.data.num_classes, b.seed + 3)
    res = {"size": f"{width}x{height}", "channels": cfg.data.num_classes, "images": len(inputs),
           "torch_threads": torch.get_num_threads(), "cpu": {}}
    backends = ["torch"] + (["pydensecrf"] if pydensecrf_installed() else [])
    for backend in backends:
        for processes in b.crf_processes:
            ips = cpu_images_per_s(backend, inputs, processes)
            res["cpu"][f"{backend} x{processes}"] = {"images_per_s": ips, "s_per_image": 1 / ips}
    if "pydensecrf" not in backends:
        res["cpu"]["pydensecrf"] = {"skipped": "pydensecrf2 not installed"}
    if device.type != "cpu":
        images = torch.from_numpy(np.stack([i for i, _, _ in inputs])).to(device)
        probs = torch.from_numpy(np.stack([p for _, p, _ in inputs])).to(device)
        n = len(inputs)
        one = timeit(lambda: [dense_crf(images[i:i + 1], probs[i:i + 1]) for i in range(n)], device, 1)
        batched = timeit(lambda: dense_crf(images, probs), device, 1)
        res["device"] = {"one at a time": {"images_per_s": n / one},
                         f"batch {n}": {"images_per_s": n / batched}}
    return res


def crf_markdown(res: dict) -> str:
    """The report's DenseCRF section."""
    lines = ["", f"## DenseCRF (10 mean-field iterations), {res['size']}, {res['channels']} channels, "
             f"{res['images']} images", "",
             f"CPU: 'x1' runs in the benchmark's process ({res['torch_threads']} torch threads), "
             "'x2' in 2 spawned processes with 1 thread each.", "",
             "| backend | images/s | s/image |", "|---|---:|---:|"]
    for where in ("cpu", "device"):
        for name, row in res.get(where, {}).items():
            if "skipped" in row:
                lines.append(f"| {name} | {row['skipped']} | |")
            else:
                label = name if where == "cpu" else f"torch on device, {name}"
                lines.append(f"| {label} | {row['images_per_s']:.3f} | {1 / row['images_per_s']:.3f} |")
    return "\n".join(lines) + "\n"


COCO_VAL_IMAGES = 40137   # full COCO val (run_evaluate_seg_coco.sh's default)


def _route_seconds(params: RouteParams, step: CRFStep, item: Item, device) -> tuple[float, float]:
    """(route s, CRF s) of one image as the tools run it: seg_route, then the CRF step."""
    sync(device)
    t0 = time.perf_counter()
    out = seg_route(params, item)
    sync(device)
    t1 = time.perf_counter()
    step.put(out)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def bench_seg_route(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict:
    """Seconds per image of the segmentation route (METHOD.md §8: resize to bench.infer_size or the
    crop, scales 1.0 / 1.25 / 1.5 with flip, logits at the image size, softmax) and of its CRF,
    per backend, on bench.route_images images of bench.crf_size, one at a time in one process
    (fp32, as the tools); the first image of each backend is an untimed warm-up."""
    b = cfg.bench
    height, width = b.crf_size
    size = b.infer_size or cfg.data.crop_size
    inputs = crf_inputs(b.route_images + 1, height, width, cfg.data.num_classes, b.seed + 5)
    items = [Item(f"bench_{i}", normalise(rgb)[None].to(device))
             for i, (rgb, _, _) in enumerate(inputs)]
    params = RouteParams(model, "seg", size, SEG_SCALES, crf=True)
    res = {"device": str(device), "size": f"{width}x{height}", "net_size": size,
           "scales": list(SEG_SCALES), "images": b.route_images, "backends": {}}
    backends = ["torch"] + (["pydensecrf"] if pydensecrf_installed() else [])
    model.eval()
    with torch.no_grad():
        for backend in backends:
            step = CRFStep(backend, workers=0)
            times = [_route_seconds(params, step, item, device) for item in items]
            step.close()
            route, crf = (float(np.mean(t)) for t in zip(*times[1:]))
            res["backends"][backend] = {"route_s": route, "crf_s": crf, "total_s": route + crf,
                                        "coco_val_h": COCO_VAL_IMAGES * (route + crf) / 3600}
    model.train()
    return res


def seg_route_markdown(res: dict) -> str:
    """The report's section on the whole segmentation route, with the COCO val projection."""
    where = ("a CPU figure (1 process); the GPU figure needs the benchmark run on a GPU"
             if res["device"] == "cpu" else f"one {res['device']} (1 process)")
    lines = ["", f"## Segmentation route per image ({res['size']} images, network at "
             f"{res['net_size']} px, scales {res['scales']} + flip, then CRF), "
             f"{res['images']} images", "",
             "| CRF backend | route (network) s | CRF s | total s/image | COCO val (40 137) h |",
             "|---|---:|---:|---:|---:|"]
    for name, r in res["backends"].items():
        lines.append(f"| {name} | {r['route_s']:.3f} | {r['crf_s']:.3f} | {r['total_s']:.3f} | "
                     f"{r['coco_val_h']:.1f} |")
    lines += ["", f"COCO val projection: {COCO_VAL_IMAGES} x the per-image time on {res['device']}"
              f" at this image size: {where}."]
    return "\n".join(lines) + "\n"
