"""Which MoRe a config or a checkpoint describes, and whether a checkpoint fits a model.

A model is described by one `wetr.model.MoReSpec`: built from a training config
(`spec_from_config`, `model_from_config`), saved in every checkpoint as a plain dict under
"spec" (`spec_dict`), and read back by every tool (`checkpoint_spec`, `model_from_checkpoint`).
A checkpoint without a "spec" (ours from before it, or a reference state_dict) is described from
its "meta" / "config" and its weight shapes. `load_weights` (METHOD.md §11) loads strictly after
`check_compatible`; `check_resume_checkpoint` is the resume check. A checkpoint's `module.`
prefix is stripped in one place (utils.checkpoint.model_state) and its depth counted in one
place (`checkpoint_depth`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from utils.checkpoint import CheckpointError, load_file, model_state
from utils.config import ConfigError

from .model import MoRe, MoReSpec


# ----------------------------------------------------------------------------- from a config
def spec_from_config(cfg: DictConfig) -> MoReSpec:
    """The MoReSpec of a training config: `cfg.data.num_classes` (K+1) and the same-named keys
    of `cfg.model` (unresolved: None takes the backbone's value)."""
    return MoReSpec(num_classes=cfg.data.num_classes,
                    **{k: cfg.model[k] for k in MoReSpec.names() if k != "num_classes"})


def model_from_config(cfg: DictConfig, pretrained=None) -> MoRe:
    """The MoRe of a training config, the one way to build it from one (training, resume check,
    benchmark); `pretrained` overrides `cfg.model.pretrained` (False: random weights, e.g. under
    torch.device("meta")). With `model.grad_checkpointing` the encoder recomputes its blocks'
    activations in training passes."""
    model = MoRe(spec_from_config(cfg), cfg.model.pretrained if pretrained is None else pretrained,
                 cfg.model.drop_path_rate)
    model.encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def spec_dict(model: MoRe) -> dict:
    """A built model's (resolved) spec as checkpoints store it: a plain dict, which
    `torch.load(weights_only=True)` reads."""
    return asdict(model.spec)


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


def _derived_spec(obj: dict, state: Mapping[str, torch.Tensor]) -> MoReSpec:
    """The spec of a checkpoint saved without one: K, width, depth, patch size and decoder width
    from the weight shapes; heads, backbone and dilation from "meta" (checkpoints before the
    spec), else the training "config", else the reference's (heads: D // 64, timm's convention);
    aux layer and GCR options from the config, else the reference's."""
    k, d = state["classifier.weight"].shape[:2]
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    conf = obj.get("config") if isinstance(obj.get("config"), dict) else {}

    def saved(key: str) -> Any:
        return meta.get(key) or _dig(conf, "model", key)

    proj, conv6 = state.get("encoder.patch_embed.proj.weight"), state.get("decoder.conv6.weight")
    defaults = MoReSpec()
    unseen = {key: _dig(conf, "model", key) for key in ("aux_layer", "gcr_topk_ratio", "gcr_gate_score")}
    return MoReSpec(
        num_classes=int(k) + 1, backbone=saved("backbone") or defaults.backbone,
        embed_dim=int(d), depth=checkpoint_depth(state),
        num_heads=int(saved("num_heads") or int(d) // 64),
        patch_size=int(proj.shape[-1]) if proj is not None else 16,
        decoder_dim=int(conv6.shape[0]) if conv6 is not None else defaults.decoder_dim,
        decoder_dilation=int(saved("decoder_dilation") or defaults.decoder_dilation),
        **{key: value for key, value in unseen.items() if value is not None})


def checkpoint_spec(obj: dict, state: Mapping[str, torch.Tensor]) -> MoReSpec:
    """The MoReSpec of a loaded checkpoint `obj` with unprefixed weights `state`: its saved
    "spec", or one derived from the rest (`_derived_spec`). Errors are one CheckpointError line."""
    if "classifier.weight" not in state:
        raise CheckpointError("checkpoint has no classifier.weight: not a MoRe checkpoint")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return _derived_spec(obj, state)
    unknown = sorted(set(spec) - set(MoReSpec.names()))
    if unknown:
        raise CheckpointError(f"checkpoint spec has unknown key {unknown[0]!r} (a newer MoRe-py's "
                              f"checkpoint?); known: {', '.join(MoReSpec.names())}")
    return MoReSpec(**spec)


def model_from_checkpoint(path: str | Path, device: torch.device, num_classes: int | None = None,
                          overrides: Mapping[str, Any] | None = None) -> tuple[MoRe, dict]:
    """Load checkpoint `path`, check K against `num_classes` (K+1; None: any), build the model of
    its spec with the non-None `overrides` (keys named as MoReSpec's fields) on top, and load its
    weights.

    Returns (model in eval mode on `device`, its spec as a dict plus the checkpoint's training
    "config" and "step"). Errors are one line (ConfigError, CheckpointError).
    """
    obj = load_file(path)
    state = model_state(obj)
    spec = checkpoint_spec(obj, state)
    if num_classes is not None and num_classes != spec.num_classes:
        raise ConfigError(f"data.num_classes={num_classes} (K={num_classes - 1}) but checkpoint "
                          f"{path} has K={spec.num_classes - 1} classes "
                          f"(num_classes={spec.num_classes})")
    given = {k: overrides[k] for k in MoReSpec.names()
             if overrides is not None and k in overrides and overrides[k] is not None}
    try:  # a bad model.* override (aux_layer past the depth, dilation 0, ...) is one line
        model = MoRe(replace(spec, **given))
    except ValueError as exc:
        raise ConfigError(f"cannot build the model of {path}: {exc}") from None
    try:
        load_weights(model, state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    info = {**spec_dict(model), "step": obj.get("step"),
            "config": obj.get("config") if isinstance(obj.get("config"), dict) else {}}
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------- compatibility
def shape_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                   ) -> str | None:
    """How `state` does not fit `expected`, in one line: the first differently shaped key (in
    the order of `state`), else the first missing or unexpected one; None when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        return (f"{k} is {tuple(state[k].shape)} there but {tuple(expected[k].shape)} here "
                f"({len(wrong)} weights differ in shape)")
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unknown weight {unexpected[0]}"
        return f"it {what} ({len(missing)} missing, {len(unexpected)} unexpected)"
    return None


def check_compatible(model: MoRe, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError with one line naming what differs: width, classes, patch size, depth,
    else the first weight that does not fit (`shape_mismatch`)."""
    k_model = model.num_classes - 1
    tokens, classifier = sd.get("encoder.cls_token"), sd.get("classifier.weight")
    if tokens is not None and tokens.ndim == 3 and tokens.shape[2] != model.embed_dim:
        raise ValueError(f"checkpoint has width D={tokens.shape[2]} but the model has D={model.embed_dim}")
    k_ckpt = classifier.shape[0] if classifier is not None else None
    if k_ckpt is None and tokens is not None and tokens.ndim == 3:
        k_ckpt = tokens.shape[1] - model.encoder.num_extra_tokens
    if k_ckpt is not None and k_ckpt != k_model:
        raise ValueError(f"checkpoint has K={k_ckpt} classes but the model has K={k_model}")
    proj = sd.get("encoder.patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and proj.shape[-1] != model.patch_size:
        raise ValueError(f"checkpoint has patch size {proj.shape[-1]} but the model has "
                         f"patch size {model.patch_size}")
    depth = checkpoint_depth(sd)
    if depth != model.encoder.depth:
        raise ValueError(f"checkpoint has depth {depth} but the model has depth {model.encoder.depth}")
    mismatch = shape_mismatch(sd, model.state_dict())
    if mismatch:
        raise ValueError(f"checkpoint does not match the model: {mismatch}")


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
    want = spec_dict(model)
    saved = ckpt.get("spec") or {k: v for k, v in ckpt.get("meta", {}).items() if k in want}
    for key in MoReSpec.names():
        if key in saved and saved[key] != want[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved[key]} but the "
                                  f"config gives {key}={want[key]}; resume with the run's own config "
                                  f"(see its config.yaml) or start a new tag")
    mismatch = shape_mismatch(model_state(ckpt), model.state_dict())
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: {mismatch}")
