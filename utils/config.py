"""One strict configuration for training and evaluation.

Defaults shared by VOC and COCO live here as typed dataclasses; `scripts/train_voc.py` and
`scripts/train_coco.py` hold only what differs. Overrides come as a `key=value` dotlist, e.g.

    torchrun --nproc_per_node=2 -m scripts.train_voc data.root=data/VOC2012 max_iters=200

A mistyped key or a value of the wrong type is a one-line `ConfigError`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Bad configuration (unknown key, wrong type, invalid value); message is one line."""


@dataclass
class DataConfig:
    name: str = "voc"                   # voc | coco
    root: str = "data/VOCdevkit/VOC2012"
    list_dir: str | None = None         # split lists + cls_labels.npz; default <root>/ImageSets/Segmentation
    train_split: str = "train_aug"
    val_split: str = "val"
    num_classes: int = 21               # K + 1 (background counted, as in the reference)
    crop_size: int = 448
    rescale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    jitter_p: float = 0.5               # probability of ColorJitter
    # ColorJitter's brightness, contrast, saturation, hue: datasets.transforms.JITTER, written out
    # so that the config imports no torch; test_datasets pins both to SPEC 6
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    aug: str = "voc"                    # voc: RandomResizedCrop; coco: rescale + pad-crop
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    check_layout: bool = True           # verify folders / lists / masks before starting


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224"
    pretrained: Any = True              # True (timm hub), False, or a local .pth/.npz path
    embed_dim: int | None = None        # None: the backbone's own (768 for ViT-B)
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None       # None: the backbone's own (16); 8 for small images
    decoder_dim: int = 512              # LargeFOV width (the reference's 512)
    decoder_dilation: int = 5           # LargeFOV dilation (the reference's 5, on a 28-token grid)
    aux_layer: int = -3
    drop_path_rate: float = 0.0
    with_gcr: bool = True


@dataclass
class OptimConfig:
    lr: float = 6e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0          # classifier, aux classifier, GCR and decoder
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 0.9


@dataclass
class CamConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75, 1.5])
    bkg: float = 0.5                    # validation / seeds threshold
    high: float = 0.7                   # refined pseudo label thresholds
    low: float = 0.25
    cle_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.25])   # L_cle (aux CAM)
    aux_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.25])   # L_aux (aux CAM)
    fin_thresholds: list[float] = field(default_factory=lambda: [0.6, 0.35])   # L_fin (final CAM)
    cam2mask: int = 10000               # LIR switches from L_cle/L_aux to L_fin after this step
    # The training forward's own CAMs stand in for the unflipped half of the scale-1.0 CAM pass
    # (same maps, B images fewer through the network); false runs them again, as the reference.
    # Off with drop_path_rate > 0.
    reuse_forward: bool = True


@dataclass
class ParConfig:
    num_iter: int = 10
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])


@dataclass
class LossWeights:
    cls: float = 1.0
    cls_aux: float = 1.0
    tokens: float = 1.0                 # class-token regularisation (GCR)
    cle: float = 0.2
    une: float = 0.1
    ptc: float = 0.3
    seg: float = 0.12
    reg: float = 0.05


@dataclass
class LossAfter:
    """A term is added once the step counter (from 0) is strictly greater than this."""
    cle: int = -1
    une: int = -1
    ptc: int = -1
    seg: int = 2000
    reg: int = 2000


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    after: LossAfter = field(default_factory=LossAfter)
    cle_temp: float = 0.5


@dataclass
class UneConfig:
    num_tokens: int = 8
    window: int = 6
    border: int = 3
    thresh: float = 1.2
    true_position: bool = False         # False reproduces the reference's indexing quirk


@dataclass
class RegConfig:
    filter: str = "permutohedral"       # permutohedral (reference lattice) | exact
    exact_scale: float = 0.58
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    scale: float = 0.5
    weight: float = 1e-7


@dataclass
class ValConfig:
    size: int = 448                     # val images are resized to size x size
    max_images: int = 0                 # 0: the whole split


@dataclass
class TrainConfig:
    tag: str = "train_voc"
    work_dir: str = "logs"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"                # auto | cpu | cuda
    max_iters: int = 20000
    batch_size: int = 4                 # images per process
    log_every: int = 200
    eval_every: int = 2000
    eval_late_from: int = -1            # COCO: evaluate every eval_every_late from this step
    eval_every_late: int = 2000
    save_every: int = 2000
    amp: str = "none"                   # none | bf16 | fp16
    compile: bool = False
    channels_last: bool = False
    resume: str = ""                    # "" | auto | path/to/checkpoint.pth
    overwrite: bool = False
    nan_policy: str = "stop"            # stop | skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    par: ParConfig = field(default_factory=ParConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    une: UneConfig = field(default_factory=UneConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    val: ValConfig = field(default_factory=ValConfig)


_CHOICES = {
    "data.name": ("voc", "coco"),
    "data.aug": ("voc", "coco"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("none", "bf16", "fp16"),
    "nan_policy": ("stop", "skip"),
    "reg.filter": ("permutohedral", "exact"),
}


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _all_keys(v, full + ".")
    return keys


def _explain(exc: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        near = difflib.get_close_matches(key, _all_keys(schema), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown config key {key!r}{hint}"
    return f"bad value for config key {key!r}: {msg}"


def make_config(overrides: dict | None = None, argv: list[str] | None = None,
                schema: type = TrainConfig) -> DictConfig:
    """Defaults <- `overrides` (a script's dict) <- `argv` (`key=value` strings). Struct mode."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        cfg = base
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
        if argv:
            bad = [a for a in argv if "=" not in a]
            if bad:
                raise ConfigError(f"arguments must be key=value, got {bad[0]!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, base)) from None
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {value!r}")
    jitter = OmegaConf.select(cfg, "data.jitter", default=None)
    if jitter is not None and (len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5):
        raise ConfigError(f"config key 'data.jitter' must be 4 numbers >= 0 (brightness, contrast, "
                          f"saturation, hue <= 0.5); got {list(jitter)}")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """Plain dict (for checkpoints that load with weights_only=True, and for JSON logs)."""
    return OmegaConf.to_container(cfg, resolve=True)
