"""Inference throughput: segmentation as the evaluation tools run it (one image at a time, 1 and
3 scales) and batched multi-scale CAMs at the training scales (validation, pseudo labels)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from utils.profiling import timeit
from tools.config import SEG_SCALES
from wetr.cam import multi_scale_cam
from wetr.infer import multi_scale_seg

from .step import synthetic_batch


def bench_infer(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict:
    """Images/s: segmentation (METHOD.md §8, one image at a time as tools.infer_seg_voc, 1 and 3 scales)
    and batched multi-scale CAMs at the training scales (validation, pseudo labels)."""

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
            out[key] = {"scales": list(scales), "images_per_s": n / timeit(run, device, 1)}
        cam_scales = list(cfg.cam.scales)
        for key, scales in (("cam_single_scale", [1.0]), ("cam_multi_scale", cam_scales)):
            sec = timeit(lambda: multi_scale_cam(model, images, scales), device, 1)
            out[key] = {"scales": scales, "batch": n, "images_per_s": n / sec}
    model.train()
    return out
