"""Configuration of the inference tools: the `key=value` schema (`InferConfig`, strict) and what
differs between the tools (`ToolSpec`).

    python -m tools.infer_seg_voc ckpt=logs/voc/checkpoints/best.pth infer_set=val crf=true
    torchrun --nproc_per_node=2 -m tools.infer_cam ckpt=... multi_scale=true
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass

from omegaconf import DictConfig

from tools.cli import parse_cli
from utils.config import ConfigError, option
from utils.errors import UserError
from wetr.densecrf import BACKENDS as CRF_BACKENDS
from wetr.model import MoReSpec

SEED_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0)   # METHOD.md §8 "multi-scale" seeds
SEG_SCALES = (1.0, 1.25, 1.5)                           # METHOD.md §8 segmentation
SINGLE_SCALE = (1.0,)                                   # multi_scale=false, every tool
CRF_BACKEND_HELP = ("auto | torch | pydensecrf (alias crf.backend=X); auto: torch on a GPU, on "
                    "a CPU pydensecrf2 where installed, else torch; resolved once per run, the "
                    "log and scores.json's config name the backend used")


@dataclass
class InferData:
    """Unset fields come from the checkpoint's training config (then from the defaults)."""
    name: str | None = option(None, "voc | coco; null: the checkpoint's")
    root: str | None = option(None, "dataset folder; null: the checkpoint's")
    list_dir: str | None = option(None, "split lists + cls_labels.npz; null: <root>/ImageSets/"
                                        "Segmentation (or the checkpoint's)")
    num_classes: int | None = option(None, "K + 1; must agree with the checkpoint")


# The model keys of the tools: MoReSpec's fields (wetr/model.py) less those the weights' shapes
# fix, unset by default: unset ones come from the checkpoint's spec (or, for a checkpoint without
# one, its meta / config / weight shapes, else the reference's); set ones override it
# (wetr.factory.model_from_checkpoint).
InferModel = make_dataclass("InferModel", [
    *MoReSpec.options(skip=("num_classes", "patch_size", "decoder_dim"), unset="the checkpoint's"),
    ("with_gcr", "bool", option(True, "LAM from the GCR class tokens (reference default)")),
], namespace={"__module__": __name__})  # its types are read in this module


@dataclass
class InferConfig:
    ckpt: str = option("", "checkpoint path (required)")
    infer_set: str = option("", 'split list name; "" = the tool\'s default')
    multi_scale: bool = option(False, "seeds: METHOD.md §8 scales; segmentation tools default to true")
    scales: list[float] | None = option(None, "explicit scales (override multi_scale)")
    size: int = option(448, "images are resized to size x size (whatever the aspect)")
    bkg: float = option(0.5, "pseudo-label seed background threshold")
    cls_labels: str = option("gt", "seeds: gt image labels | pred (classifier, seg fallback)",
                             choices=("gt", "pred"))
    cam2seg: bool = option(False, "infer_lam: LAM as segmentation on val / test (METHOD.md §8)")
    crf: bool = option(False, "DenseCRF post-processing (METHOD.md §8), with crf_backend")
    crf_backend: str = option("auto", CRF_BACKEND_HELP, choices=CRF_BACKENDS)
    crf_workers: int = option(-1, "pydensecrf processes per rank; -1 auto, 0 in-process (the "
                                  "torch backend always runs in-process)")
    save_labels: bool = option(True, "palette PNGs of the predictions")
    save_overlays: bool = option(False, "jet overlays (seeds) / colour blends (segmentation)")
    save_arrays: bool = option(False, ".npz maps (seeds: present-class maps; seg: logits)")
    out_dir: str = option("", '"" = <run folder>/eval/<tool>_<set>')
    device: str = option("auto", "auto | cpu | cuda")
    num_workers: int = option(2, "DataLoader workers per rank")
    max_images: int = option(0, "0 = the whole split (before sharding)")
    resume: bool = option(False, "skip the images whose outputs a killed run completed (the "
                                 "same settings: out_dir's settings.json)")
    preflight: bool = option(False, "check config, checkpoint and data, then exit (launchers)")
    data: InferData = field(default_factory=InferData)
    model: InferModel = field(default_factory=InferModel)


@dataclass(frozen=True)
class ToolSpec:
    """What differs between the inference tools.

    name: the tool (log file, default output folder); variant: its prediction ("cam", "lam",
    "seg"; output sub-folder and scores key); multi_scales: the scales of multi_scale=true;
    defaults: the tool's config values over `InferConfig`'s (the command line overrides them);
    seed_split: default infer_set is the seed split (VOC `train`) rather than the validation
    split; train_split: default infer_set is the checkpoint's training split (the pseudo-mask
    export); needs_image_labels: ground-truth image labels are read (cls_labels=gt); route: the
    per-image route (`tools.routes.ROUTES`; default: the variant's); modes: {config key: spec}
    taken instead when that boolean key is true (infer_lam's cam2seg); schema: the tool's
    `key=value` schema (`InferConfig` or a subclass adding the tool's own keys).
    """
    name: str
    variant: str
    multi_scales: tuple[float, ...]
    defaults: dict = field(default_factory=dict)
    seed_split: bool = False
    needs_image_labels: bool = False
    route: str = ""
    modes: dict = field(default_factory=dict)
    train_split: bool = False
    schema: type = InferConfig


class InferError(UserError, RuntimeError):
    """A problem the user can fix (message is one line)."""


def crf_backend_alias(argv: Sequence[str]) -> list[str]:
    """Issue 29's spelling `crf.backend=X` -> `crf_backend=X` (`crf` is a boolean key, so the
    dotted form cannot merge); every other argument as it is."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"crf_backend={value}" if eq and key.lstrip("+") == "crf.backend" else arg)
    return out


def parse_config(argv: Sequence[str], defaults: dict | None = None,
                 schema: type = InferConfig) -> DictConfig:
    """defaults of `schema` <- `defaults` <- `key=value` arguments (`crf_backend_alias`
    applied), checked."""
    cfg = parse_cli(crf_backend_alias(argv), schema, defaults)
    if not cfg.ckpt:
        raise ConfigError("ckpt=<path to checkpoint .pth> is required")
    return cfg


def parse_tool_config(argv: Sequence[str], spec: ToolSpec) -> tuple[ToolSpec, DictConfig]:
    """The tool's config, parsed once, and its spec: a mode of `spec.modes` whose key is true
    brings its defaults for the keys the command line does not set."""
    argv = crf_backend_alias(argv)
    cfg = parse_config(argv, spec.defaults, spec.schema)
    for key, mode in spec.modes.items():
        if cfg[key]:
            given = {a.split("=", 1)[0].lstrip("+") for a in argv if "=" in a}
            for k, v in mode.defaults.items():
                if k not in given:
                    cfg[k] = v
            return mode, cfg
    return spec, cfg


def resolve_scales(cfg: DictConfig, spec: ToolSpec) -> tuple[float, ...]:
    """Explicit `scales`, else the tool's multi-scale set or 1.0 alone."""
    if cfg.scales:
        return tuple(float(s) for s in cfg.scales)
    return tuple(spec.multi_scales) if cfg.multi_scale else SINGLE_SCALE
