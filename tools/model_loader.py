"""Checkpoint -> model for the inference tools: ours ({"model", "config", "meta", ...}) or a
reference state_dict (possibly `module.`-prefixed); the model is built from its meta / config, or
from the weight shapes."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from utils.checkpoint import CheckpointError, load_file, model_state
from utils.config import ConfigError


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def describe_checkpoint(obj: dict, state: dict[str, torch.Tensor]) -> dict:
    """Model hyper-parameters of a checkpoint: ours from meta/config, a reference one from the
    weight shapes. Returns {num_classes, backbone, embed_dim, depth, num_heads, patch_size,
    decoder_dim, decoder_dilation, aux_layer}."""
    if "classifier.weight" not in state:
        raise CheckpointError("checkpoint has no classifier.weight: not a MoRe checkpoint")
    k, d = state["classifier.weight"].shape[:2]
    depth = len({key.split(".")[2] for key in state if key.startswith("encoder.blocks.")})
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    conf = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    info = {
        "num_classes": int(k) + 1,
        "backbone": meta.get("backbone") or _dig(conf, "model", "backbone") or "vit_base_patch16_224",
        "embed_dim": int(meta.get("embed_dim") or d),
        "depth": int(meta.get("depth") or depth),
        "num_heads": meta.get("num_heads") or _dig(conf, "model", "num_heads"),
        "patch_size": int(state["encoder.patch_embed.proj.weight"].shape[-1])
        if "encoder.patch_embed.proj.weight" in state else 16,
        "decoder_dim": int(state["decoder.conv6.weight"].shape[0])
        if "decoder.conv6.weight" in state else 512,
        "decoder_dilation": int(meta.get("decoder_dilation") or _dig(conf, "model", "decoder_dilation") or 5),
        "aux_layer": _dig(conf, "model", "aux_layer"),
    }
    if info["aux_layer"] is None:
        info["aux_layer"] = -3
    return info


def build_model_from_checkpoint(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Load `cfg.ckpt`, check K against `cfg.data.num_classes`, build and load the model.

    Returns (model in eval mode on `device`, checkpoint info incl. its training "config").
    """
    from wetr import build_model, load_weights

    obj = load_file(cfg.ckpt)
    state = model_state(obj)
    info = describe_checkpoint(obj, state)
    want = cfg.data.num_classes
    if want is not None and want != info["num_classes"]:
        raise ConfigError(f"data.num_classes={want} (K={want - 1}) but checkpoint {cfg.ckpt} has "
                          f"K={info['num_classes'] - 1} classes (num_classes={info['num_classes']})")
    for key in ("backbone", "embed_dim", "depth", "num_heads", "decoder_dilation", "aux_layer"):
        if cfg.model[key] is not None:
            info[key] = cfg.model[key]
    if info["num_heads"] is None:
        info["num_heads"] = info["embed_dim"] // 64   # timm ViT convention (ViT-B: 768 / 12)
    try:  # a bad model.* override (aux_layer past the depth, dilation 0, ...) is one line
        model = build_model(num_classes=info["num_classes"], backbone=info["backbone"],
                            pretrained=False, embed_dim=info["embed_dim"], depth=info["depth"],
                            num_heads=int(info["num_heads"]), patch_size=info["patch_size"],
                            decoder_dim=info["decoder_dim"],
                            decoder_dilation=info["decoder_dilation"],
                            aux_layer=int(info["aux_layer"]))
    except ValueError as exc:
        raise ConfigError(f"cannot build the model of {cfg.ckpt}: {exc}") from None
    try:
        load_weights(model, state)
    except ValueError as exc:
        raise CheckpointError(f"{cfg.ckpt}: {exc}") from None
    info["config"] = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    info["step"] = obj.get("step")
    return model.to(device).eval(), info
