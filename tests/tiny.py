"""Tiny synthetic data and a tiny random MoRe checkpoint, shared by the tool tests.

The checkpoint is in the training checkpoint's layout without a `spec` (as written before the
model spec existed), so the tools rebuild the model from its config, meta and weight shapes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils.checkpoint import save_atomic
from utils.config import to_container
from wetr import build_model
from wetr.config import make_config

WIDTH = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.pretrained=false"]


def tiny_data(root: Path, k: int, num_train: int, num_val: int, size: int, seed: int) -> Path:
    """Synthetic VOC-layout data with K classes under root/syn."""
    from datasets.synthetic import SyntheticParams, make_synthetic

    data = root / "syn"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=k, num_train=num_train,
                                              num_val=num_val, size=size, seed=seed),
                   progress=False)
    return data


def tiny_checkpoint(root: Path, data: Path, k: int, step: int | None = None,
                    with_meta: bool = True, extra: tuple[str, ...] = ()
                    ) -> tuple[Path, torch.nn.Module]:
    """root/run/checkpoints/last.pth: a random width-64 MoRe (seed 0) for data with K classes,
    its config with the `extra` key=value overrides; returns (path, model)."""
    torch.manual_seed(0)
    model = build_model(num_classes=k + 1, embed_dim=64, depth=4, num_heads=4)
    cfg = make_config(argv=[f"data.root={data}", f"data.num_classes={k + 1}", *WIDTH, *extra])
    obj = {"model": model.state_dict(), "config": to_container(cfg)}
    if with_meta:
        obj["meta"] = {"num_classes": k + 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
                       "backbone": "vit_base_patch16_224"}
    if step is not None:
        obj["step"] = step
    ckpt = root / "run" / "checkpoints" / "last.pth"
    save_atomic(obj, ckpt)
    return ckpt, model
