"""Which MoRe a config or a checkpoint describes, and whether a checkpoint fits a model.

The one home of: the model of a training config (`model_from_config`) and its summary saved in
checkpoints (`model_meta`); the hyper-parameters a checkpoint implies (`describe_checkpoint`: ours
from meta / config, a reference state_dict from its weight shapes); loading weights strictly
(`load_weights`, SPEC 11) after `check_compatible`; the resume check (`check_resume_checkpoint`);
and a ready model from a checkpoint file (`model_from_checkpoint`, for the inference tools).
A checkpoint's `module.` prefix is stripped in one place (utils.checkpoint.model_state) and its
depth counted in one place (`checkpoint_depth`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from utils.checkpoint import CheckpointError, load_file, model_state
from utils.config import ConfigError

from .encoder import NUM_EXTRA_TOKENS
from .model import MoRe, build_model

# The hyper-parameters that decide a checkpoint's weight shapes, as saved in its "meta".
SHAPE_KEYS = ("num_classes", "backbone", "embed_dim", "depth", "num_heads", "patch_size",
              "decoder_dim", "decoder_dilation")
# The ones an inference config may set over what the checkpoint implies.
OVERRIDE_KEYS = ("backbone", "embed_dim", "depth", "num_heads", "decoder_dilation", "aux_layer")


# ----------------------------------------------------------------------------- from a config
def model_from_config(cfg: DictConfig, pretrained=None) -> MoRe:
    """The MoRe of a training config (`cfg.model`, `cfg.data.num_classes` = K+1); `pretrained`
    overrides `cfg.model.pretrained` (False: random weights, e.g. under torch.device("meta"))."""
    m = cfg.model
    return build_model(num_classes=cfg.data.num_classes, backbone=m.backbone,
                       pretrained=m.pretrained if pretrained is None else pretrained,
                       embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                       patch_size=m.patch_size, decoder_dim=m.decoder_dim,
                       decoder_dilation=m.decoder_dilation, aux_layer=m.aux_layer,
                       drop_path_rate=m.drop_path_rate)


def model_meta(model: MoRe, cfg: DictConfig) -> dict:
    """The SHAPE_KEYS of a built model, as checkpoints store them under "meta"."""
    enc = model.encoder
    return {"num_classes": int(cfg.data.num_classes), "embed_dim": int(model.embed_dim),
            "depth": len(enc.blocks), "num_heads": int(enc.blocks[0].attn.num_heads),
            "patch_size": int(enc.patch_size), "decoder_dim": int(model.decoder.conv6.out_channels),
            "decoder_dilation": int(model.decoder.conv6.dilation[0]),
            "backbone": str(cfg.model.backbone)}


# ----------------------------------------------------------------------------- from a checkpoint
def checkpoint_depth(state: Mapping[str, torch.Tensor]) -> int:
    """Number of encoder blocks in an unprefixed state_dict."""
    return len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def describe_checkpoint(obj: dict, state: dict[str, torch.Tensor]) -> dict:
    """Model hyper-parameters of a checkpoint: ours from meta/config, a reference one from the
    weight shapes. Returns {num_classes, backbone, embed_dim, depth, num_heads, patch_size,
    decoder_dim, decoder_dilation, aux_layer}; num_heads is None when nothing says it."""
    if "classifier.weight" not in state:
        raise CheckpointError("checkpoint has no classifier.weight: not a MoRe checkpoint")
    k, d = state["classifier.weight"].shape[:2]
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    conf = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    info = {
        "num_classes": int(k) + 1,
        "backbone": meta.get("backbone") or _dig(conf, "model", "backbone") or "vit_base_patch16_224",
        "embed_dim": int(meta.get("embed_dim") or d),
        "depth": int(meta.get("depth") or checkpoint_depth(state)),
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


def model_from_checkpoint(path: str | Path, device: torch.device, num_classes: int | None = None,
                          overrides: Mapping[str, Any] | None = None) -> tuple[MoRe, dict]:
    """Load checkpoint `path`, check K against `num_classes` (K+1; None: any), build the model it
    describes with the non-None `overrides` (OVERRIDE_KEYS) on top, and load its weights.

    Returns (model in eval mode on `device`, describe_checkpoint's info plus the checkpoint's
    training "config" and "step"). Errors are one line (ConfigError, CheckpointError).
    """
    obj = load_file(path)
    state = model_state(obj)
    info = describe_checkpoint(obj, state)
    if num_classes is not None and num_classes != info["num_classes"]:
        raise ConfigError(f"data.num_classes={num_classes} (K={num_classes - 1}) but checkpoint "
                          f"{path} has K={info['num_classes'] - 1} classes "
                          f"(num_classes={info['num_classes']})")
    for key in OVERRIDE_KEYS:
        if overrides is not None and overrides.get(key) is not None:
            info[key] = overrides[key]
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
        raise ConfigError(f"cannot build the model of {path}: {exc}") from None
    try:
        load_weights(model, state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    info["config"] = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    info["step"] = obj.get("step")
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------- compatibility
def state_differences(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                      ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, differently shaped) keys of `state` against `expected`, in the
    order of `expected` (missing, shapes) and of `state` (unexpected)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, wrong


def check_compatible(model: MoRe, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError with one line naming what differs: width, classes, depth, keys, shapes."""
    k_model, own = model.num_classes - 1, model.state_dict()
    tokens, classifier = sd.get("encoder.cls_token"), sd.get("classifier.weight")
    if tokens is not None and tokens.ndim == 3 and tokens.shape[2] != model.embed_dim:
        raise ValueError(f"checkpoint has width D={tokens.shape[2]} but the model has D={model.embed_dim}")
    k_ckpt = classifier.shape[0] if classifier is not None else None
    if k_ckpt is None and tokens is not None and tokens.ndim == 3:
        k_ckpt = tokens.shape[1] - NUM_EXTRA_TOKENS
    if k_ckpt is not None and k_ckpt != k_model:
        raise ValueError(f"checkpoint has K={k_ckpt} classes but the model has K={k_model}")
    proj = sd.get("encoder.patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and proj.shape[-1] != model.patch_size:
        raise ValueError(f"checkpoint has patch size {proj.shape[-1]} but the model has "
                         f"patch size {model.patch_size}")
    depth = checkpoint_depth(sd)
    if depth != model.encoder.depth:
        raise ValueError(f"checkpoint has depth {depth} but the model has depth {model.encoder.depth}")
    missing, unexpected, wrong = state_differences(sd, own)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: {len(missing)} missing keys "
                         f"{sorted(missing)[:3]}, {len(unexpected)} unexpected keys "
                         f"{sorted(unexpected)[:3]}")
    if wrong:
        wrong_set = set(wrong)
        key = next(k for k in sd if k in wrong_set)
        raise ValueError(f"checkpoint {key} has shape {tuple(sd[key].shape)} but the model expects "
                         f"{tuple(own[key].shape)}")


def load_weights(model: MoRe, source: Mapping[str, Any] | str | Path) -> MoRe:
    """Load our checkpoint (weights under "model") or a raw reference state_dict, strictly.

    A leading ``module.`` (DDP) is stripped. Any key or shape mismatch raises ValueError with one line.
    """
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    sd = model_state(source)
    check_compatible(model, sd)
    model.load_state_dict(sd, strict=True)
    return model


def check_resume_checkpoint(ckpt: dict, cfg: DictConfig, path: Path) -> None:
    """The resume checkpoint must be a training checkpoint of the configured K and encoder."""
    if "optimizer" not in ckpt or "step" not in ckpt:
        raise CheckpointError(f"{path} holds weights only; resume needs a training checkpoint "
                              f"(<work_dir>/<tag>/checkpoints/last.pth)")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = model_from_config(cfg, pretrained=False)
    meta, want = ckpt.get("meta", {}), model_meta(model, cfg)
    for key in SHAPE_KEYS:
        if key in meta and meta[key] != want[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={meta[key]} but the "
                                  f"config gives {key}={want[key]}; resume with the run's own config "
                                  f"(see its config.yaml) or start a new tag")
    expected = model.state_dict()
    state = model_state(ckpt)
    missing, unexpected, wrong = state_differences(state, expected)
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: {k} is "
                              f"{tuple(state[k].shape)} there but {tuple(expected[k].shape)} here "
                              f"({len(wrong)} weights differ in shape)")
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unknown weight {unexpected[0]}"
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: it {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
