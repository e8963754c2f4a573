"""Pictures of a finished run: loss / mIoU curves and CAM, LAM and prediction overlays.

    python -m tools.demo_report logs/demo [--images 6]

Writes <run>/report/curves.png and <run>/report/overlays.png (one row per val image:
image | CAM | LAM | segmentation | ground truth).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from omegaconf import OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from datasets import build_dataset  # noqa: E402
from utils.palette import colorize, jet_overlay  # noqa: E402
from wetr.cam import denormalise, resize_bilinear  # noqa: E402
from wetr.factory import model_from_checkpoint  # noqa: E402
from wetr.infer import validation_maps  # noqa: E402


def plot_curves(metrics_file: Path, out: Path) -> None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss/total" in r]
    val = [r for r in rows if "val/seg_miou" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in train]
    for key in ("total", "cls", "cls_aux", "tokens", "cle", "une", "ptc", "seg"):
        # a term that has not started yet is logged as 0: leave it out of the log-scale plot
        values = [r[f"loss/{key}"] if r[f"loss/{key}"] > 0 else float("nan") for r in train]
        axes[0].plot(steps, values, label=key)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses (unweighted)")
    axes[0].legend(fontsize=8, ncol=2)
    for key in ("cam", "lam", "fused", "seg"):
        axes[1].plot([r["step"] for r in val], [100 * r[f"val/{key}_miou"] for r in val], "o-",
                     label=key.upper())
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("val mIoU (%)")
    axes[1].set_title("validation")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_overlays(ckpt_path: Path, out: Path, num_images: int) -> None:
    model, info = model_from_checkpoint(ckpt_path, torch.device("cpu"))
    cfg = OmegaConf.create(info["config"])
    dataset = build_dataset(cfg.data, cfg.data.val_split, "val")
    n = min(num_images, len(dataset))
    fig, axes = plt.subplots(n, 5, figsize=(12, 2.5 * n), squeeze=False)
    for row in range(n):
        name, image, label, cls_label = dataset[row]
        x = resize_bilinear(image[None], (cfg.val.size,) * 2)
        y = cls_label[None, :, None, None].float()
        maps = validation_maps(model, x, cfg.cam.scales, label.shape[-2:])
        cam, lam_map, seg = maps.cam * y, maps.lam * y, maps.seg.argmax(1)
        rgb = (denormalise(image[None])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        panels = [rgb, jet_overlay(rgb, cam[0].max(0).values.numpy()),
                  jet_overlay(rgb, lam_map[0].max(0).values.numpy()),
                  colorize(seg[0].numpy().astype(np.uint8)),
                  colorize(label.numpy().astype(np.uint8))]
        for col, (panel, title) in enumerate(zip(panels, ("image", "CAM", "LAM", "seg", "GT"))):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
        axes[row, 0].set_title(str(name), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="log folder of a run, e.g. logs/demo")
    parser.add_argument("--images", type=int, default=6)
    args = parser.parse_args()
    report = args.run / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_curves(args.run / "metrics.jsonl", report / "curves.png")
    ckpt = args.run / "checkpoints" / "last.pth"
    plot_overlays(ckpt, report / "overlays.png", args.images)
    print(f"wrote {report / 'curves.png'} and {report / 'overlays.png'}")
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    val = [r for r in rows if "val/seg_miou" in r]
    if val:
        last = val[-1]
        print(f"final val (step {last['step']}): " + " ".join(
            f"{k.upper()} {100 * last[f'val/{k}_miou']:.1f}" for k in ("cam", "lam", "fused", "seg"))
            + f" mIoU, cls F1 {100 * last['val/f1']:.1f}")
    for path in sorted((args.run / "eval" / ckpt.stem).glob("*/scores.json")):
        result = json.loads(path.read_text())
        print(f"{path.parent.name}: " + ", ".join(
            f"{k} {100 * v['miou']:.1f}" for k, v in result["scores"].items()) + " mIoU")


if __name__ == "__main__":
    main()
