"""One strict configuration for training and evaluation.

Defaults shared by VOC and COCO live here as typed dataclasses; `scripts/train_voc.py` and
`scripts/train_coco.py` hold only what differs. Overrides come as a `key=value` dotlist, e.g.

    torchrun --nproc_per_node=2 -m scripts.train_voc data.root=data/VOC2012 max_iters=200

A mistyped key or a value of the wrong type is a one-line `ConfigError`.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Bad configuration (unknown key, wrong type, invalid value); message is one line."""


@dataclass
class DataConfig:
    """`num_classes` is K + 1 everywhere in the project (config, `build_model`, MoRe, datasets,
    metrics): the K foreground classes plus background. Code that counts the K foreground
    classes alone (class tokens, image-label vectors, the synthetic data) names it
    `num_fg_classes`."""
    name: str = "voc"                   # voc | coco | tags (your own images: tools/prepare_tags.py)
    root: str = "data/VOCdevkit/VOC2012"  # dataset folder (images, masks, lists)
    list_dir: str | None = None         # split lists + cls_labels.npz; default <root>/ImageSets/Segmentation
    train_split: str = "train_aug"      # split list of the training images
    val_split: str = "val"              # split list validated during training
    num_classes: int = 21               # K + 1 (background counted, as in the reference)
    crop_size: int = 448                # training crop, pixels (square)
    # random-resized-crop area range (voc aug) or rescale range (coco aug)
    rescale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    jitter_p: float = 0.5               # probability of ColorJitter
    # ColorJitter's brightness, contrast, saturation, hue (SPEC 6); datasets.transforms.JITTER
    # is read from here
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    aug: str = "voc"                    # voc: RandomResizedCrop; coco: rescale + pad-crop
    num_workers: int = 4                # DataLoader worker processes per rank
    pin_memory: bool = True             # page-locked batches (faster host-to-GPU copies)
    persistent_workers: bool = True     # keep loader workers alive between epochs
    prefetch_factor: int = 4            # batches each worker loads ahead
    check_layout: bool = True           # verify folders / lists / masks before starting


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224"  # timm ViT name (sets width, depth, heads, patch)
    pretrained: Any = True              # True (timm hub), False, or a local .pth/.npz path
    embed_dim: int | None = None        # None: the backbone's own (768 for ViT-B)
    depth: int | None = None            # transformer blocks; None: the backbone's own (12)
    num_heads: int | None = None        # attention heads; None: the backbone's own (12)
    patch_size: int | None = None       # None: the backbone's own (16); 8 for small images
    decoder_dim: int = 512              # LargeFOV width (the reference's 512)
    decoder_dilation: int = 5           # LargeFOV dilation (the reference's 5, on a 28-token grid)
    aux_layer: int = -3                 # block whose patch tokens feed the aux classifier (-3: third last)
    drop_path_rate: float = 0.0         # stochastic depth of the ViT blocks
    with_gcr: bool = True               # Graph Category Representation on the class tokens


@dataclass
class OptimConfig:
    lr: float = 6e-5                    # AdamW base learning rate (the backbone's)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8                   # AdamW epsilon
    weight_decay: float = 0.01          # AdamW weight decay
    head_lr_mult: float = 10.0          # classifier, aux classifier, GCR and decoder
    warmup_iters: int = 1500            # linear warm-up steps
    warmup_ratio: float = 1e-6          # warm-up starts at lr x this
    power: float = 0.9                  # poly decay exponent after the warm-up


@dataclass
class CamConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75, 1.5])  # multi-scale CAM scales (with flip)
    bkg: float = 0.5                    # validation / seeds threshold
    high: float = 0.7                   # refined pseudo labels: upper background plane
    low: float = 0.25                   # refined pseudo labels: lower background plane
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
    num_iter: int = 10                  # PAR propagation iterations
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])  # PAR neighbourhood dilations
    sparse: bool = False                # one sparse product an iteration (not bit-exact on resume)


@dataclass
class LossWeights:
    cls: float = 1.0                    # multi-label classification (final classifier)
    cls_aux: float = 1.0                # multi-label classification (aux classifier)
    tokens: float = 1.0                 # class-token regularisation (GCR)
    cle: float = 0.2                    # LIR on confident tokens (CLE)
    une: float = 0.1                    # LIR on uncertain tokens (UNE)
    ptc: float = 0.3                    # patch-token contrast on the affinity labels
    seg: float = 0.12                   # segmentation cross-entropy on the refined labels
    reg: float = 0.05                   # dense energy loss on the segmentation


@dataclass
class LossAfter:
    """A term is added once the step counter (from 0) is strictly greater than this."""
    cle: int = -1                       # CLE starts after this step
    une: int = -1                       # UNE starts after this step
    ptc: int = -1                       # patch-token contrast starts after this step
    seg: int = 2000                     # segmentation loss starts after this step
    reg: int = 2000                     # dense energy loss starts after this step


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    after: LossAfter = field(default_factory=LossAfter)
    cle_temp: float = 0.5               # CLE temperature (VOC 0.5, COCO 0.1)


@dataclass
class UneConfig:
    num_tokens: int = 8                 # UNE tokens taken per image
    window: int = 6                     # side of a candidate's window, tokens
    border: int = 3                     # candidates come from the grid less this border
    thresh: float = 1.2                 # a candidate's window needs this mean roi (1 uncertain, 2 object)
    true_position: bool = False         # False reproduces the reference's indexing quirk


@dataclass
class RegConfig:
    filter: str = "permutohedral"       # permutohedral (reference lattice) | exact
    exact_scale: float = 0.58           # exact filter x this matches the lattice's scale
    sigma_rgb: float = 15.0             # bilateral kernel width in colour
    sigma_xy: float = 100.0             # bilateral kernel width in pixels
    scale: float = 0.5                  # images and predictions resized by this for the loss
    weight: float = 1e-7                # kernel weight inside the energy (reference value)


@dataclass
class ValConfig:
    size: int = 448                     # val images are resized to size x size
    max_images: int = 0                 # 0: the whole split


@dataclass
class LogConfig:
    tensorboard: bool = True            # rank 0 writes TensorBoard events to <run>/tb/
    images: int = 4                     # first val images drawn (CAM | LAM | seg) at validation


@dataclass
class TrainConfig:
    tag: str = "train_voc"              # run name: outputs in <work_dir>/<tag>/
    work_dir: str = "logs"              # folder of the run folders
    seed: int = 0                       # seed of weights, sampling and augmentation
    deterministic: bool = False         # deterministic kernels (slower)
    device: str = "auto"                # auto | cpu | cuda
    max_iters: int = 20000              # training steps
    batch_size: int = 4                 # images per process
    log_every: int = 200                # steps between log lines
    eval_every: int = 2000              # steps between validations
    eval_late_from: int = -1            # COCO: evaluate every eval_every_late from this step
    eval_every_late: int = 2000         # validation period from eval_late_from on
    save_every: int = 2000              # steps between iter_<N>.pth checkpoints
    amp: str = "none"                   # none | bf16 | fp16
    compile: bool = False               # torch.compile the model
    channels_last: bool = False         # channels-last memory format
    resume: str = ""                    # "" | auto | path/to/checkpoint.pth
    overwrite: bool = False             # reuse a tag that already holds a run
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
    log: LogConfig = field(default_factory=LogConfig)


_CHOICES = {
    "data.name": ("voc", "coco", "tags"),
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


def parse_cli(argv: Sequence[str], schema: type = TrainConfig, defaults: dict | None = None,
              prog: str | None = None) -> DictConfig:
    """The one command-line parser of every entry point: defaults <- `defaults` <- `key=value`
    arguments. `-h` / `--help` prints the keys (utils.config_help) and `--print-config` the resolved
    config as YAML; both exit 0 before any data or device is touched."""
    from utils.config_help import format_help

    argv = list(argv)
    prog = prog or (os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "entry.py")
    if "-h" in argv or "--help" in argv:
        print(format_help(make_config(defaults, None, schema), schema, prog), end="")
        raise SystemExit(0)
    if "--print-config" in argv:
        cfg = make_config(defaults, [a for a in argv if a != "--print-config"], schema)
        print(OmegaConf.to_yaml(cfg), end="")
        raise SystemExit(0)
    return make_config(defaults, argv, schema)
