"""The training schema: every key of a run, its default and its meaning (METHOD.md §4-7).

Defaults shared by VOC and COCO live here as typed dataclasses; `scripts/train_voc.py` and
`scripts/train_coco.py` hold only what differs. Overrides come as a `key=value` dotlist, e.g.

    torchrun --nproc_per_node=2 -m scripts.train_voc data.root=data/VOC2012 max_iters=200

Each leaf is an `option(default, help, ...)`: the help text is what `--help` prints
(tools/cli.py); choices and checks are enforced by `make_config`, whose errors are one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from typing import Any  # noqa: F401  (the type "Any" of ModelConfig.pretrained is read here)

from omegaconf import DictConfig

from datasets.transforms import JITTER, RESCALE
from utils.config import ConfigError, merge_config, option
from utils.logger import get_logger
from wetr.backbones import backbone_facts
from wetr.model import MoReSpec


def _jitter_ok(v: list) -> bool:
    return len(v) == 4 and min(v) >= 0 and v[3] <= 0.5


@dataclass
class DataConfig:
    """`num_classes` is K + 1 everywhere in the project (config, `build_model`, MoRe, datasets,
    metrics): the K foreground classes plus background. Code that counts the K foreground
    classes alone (class tokens, image-label vectors, the synthetic data) names it
    `num_fg_classes`."""
    name: str = option("voc", "dataset (tags: your own images, tools/prepare_tags.py)",
                      choices=("voc", "coco", "tags"))
    root: str = option("data/VOCdevkit/VOC2012", "dataset folder (images, masks, lists)")
    list_dir: str | None = option(None, "split lists + cls_labels.npz; default "
                                        "<root>/ImageSets/Segmentation")
    train_split: str = option("train_aug", "split list of the training images")
    val_split: str = option("val", "split list validated during training")
    num_classes: int = option(21, "K + 1 (background counted, as in the reference)")
    crop_size: int = option(448, "training crop, pixels (square)")
    rescale: list[float] = option(list(RESCALE), "random-resized-crop area range (voc aug) or "
                                                 "rescale range (coco aug)")
    jitter_p: float = option(0.5, "probability of ColorJitter")
    jitter: list[float] = option(list(JITTER), "ColorJitter's brightness, contrast, saturation, "
                                               "hue (METHOD.md §6)",
                                 check=(_jitter_ok, "4 numbers >= 0 (brightness, contrast, "
                                                    "saturation, hue <= 0.5)"))
    aug: str = option("voc", "voc: RandomResizedCrop; coco: rescale + pad-crop",
                      choices=("voc", "coco"))
    num_workers: int = option(4, "DataLoader worker processes per rank")
    pin_memory: bool = option(True, "page-locked batches (faster host-to-GPU copies)")
    persistent_workers: bool = option(True, "keep loader workers alive between epochs")
    prefetch_factor: int = option(4, "batches each worker loads ahead")
    check_layout: bool = option(True, "verify folders / lists / masks before starting")


# The model's keys: MoReSpec's fields (wetr/model.py, the one definition; with `data.num_classes`
# they make the spec, `wetr.factory.spec_from_config`, which checkpoints save) and the
# training-only ones.
ModelConfig = make_dataclass("ModelConfig", [
    *MoReSpec.options(),
    ("pretrained", "Any", option(True, "True (timm hub, the backbone's tag), False, or a local "
                                     ".pth/.npz path")),
    ("drop_path_rate", "float", option(0.0, "stochastic depth of the ViT blocks")),
    ("with_gcr", "bool", option(True, "Graph Category Representation on the class tokens")),
    ("grad_checkpointing", "bool", option(False, "recompute the encoder blocks' activations in the "
                                               "backward pass (less memory, same gradients)")),
], namespace={"__module__": __name__})  # its types are read in this module


@dataclass
class OptimConfig:
    lr: float = option(6e-5, "AdamW base learning rate (the backbone's)")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.01, "AdamW weight decay")
    head_lr_mult: float = option(10.0, "classifier, aux classifier, GCR and decoder")
    warmup_iters: int = option(1500, "linear warm-up steps")
    warmup_ratio: float = option(1e-6, "warm-up starts at lr x this")
    power: float = option(0.9, "poly decay exponent after the warm-up")


@dataclass
class CamConfig:
    scales: list[float] = option([1.0, 0.5, 0.75, 1.5], "multi-scale CAM scales (with flip)")
    bkg: float = option(0.5, "validation / pseudo-label seeds threshold")
    high: float = option(0.7, "refined pseudo labels: upper background plane")
    low: float = option(0.25, "refined pseudo labels: lower background plane")
    cle_thresholds: list[float] = option([0.5, 0.25], "L_cle (aux CAM)")
    aux_thresholds: list[float] = option([0.7, 0.25], "L_aux (aux CAM)")
    fin_thresholds: list[float] = option([0.6, 0.35], "L_fin (final CAM)")
    cam2mask: int = option(10000, "LIR switches from L_cle/L_aux to L_fin after this step")
    reuse_forward: bool = option(
        True, "The training forward's own CAMs stand in for the unflipped half of the scale-1.0 "
              "CAM pass (same maps, B images fewer through the network); false runs them again, "
              "as the reference. Off with drop_path_rate > 0.")


@dataclass
class ParConfig:
    num_iter: int = option(10, "PAR propagation iterations")
    dilations: list[int] = option([1, 2, 4, 8, 12, 24], "PAR neighbourhood dilations")
    sparse: bool = option(False, "one sparse product an iteration (not bit-exact on resume)")


@dataclass
class LossWeights:
    cls: float = option(1.0, "multi-label classification (final classifier)")
    cls_aux: float = option(1.0, "multi-label classification (aux classifier)")
    tokens: float = option(1.0, "class-token regularisation (GCR)")
    cle: float = option(0.2, "LIR on confident tokens (CLE)")
    une: float = option(0.1, "LIR on uncertain tokens (UNE)")
    ptc: float = option(0.3, "patch-token contrast on the affinity labels")
    seg: float = option(0.12, "segmentation cross-entropy on the refined labels")
    reg: float = option(0.05, "dense energy loss on the segmentation")


@dataclass
class LossAfter:
    """A term is added once the step counter (from 0) is strictly greater than this."""
    cle: int = option(-1, "CLE starts after this step")
    une: int = option(-1, "UNE starts after this step")
    ptc: int = option(-1, "patch-token contrast starts after this step")
    seg: int = option(2000, "segmentation loss starts after this step")
    reg: int = option(2000, "dense energy loss starts after this step")


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    after: LossAfter = field(default_factory=LossAfter)
    cle_temp: float = option(0.5, "CLE temperature (VOC 0.5, COCO 0.1)")


@dataclass
class UneConfig:
    num_tokens: int = option(8, "UNE tokens taken per image")
    window: int = option(6, "side of a candidate's window, tokens")
    border: int = option(3, "candidates come from the grid less this border")
    thresh: float = option(1.2, "a candidate's window needs this mean roi (1 uncertain, 2 object)")
    true_position: bool = option(False, "False reproduces the reference's indexing quirk")


@dataclass
class RegConfig:
    filter: str = option("permutohedral", "permutohedral (reference lattice) | exact",
                         choices=("permutohedral", "exact"))
    exact_scale: float = option(0.58, "exact filter x this matches the lattice's scale")
    sigma_rgb: float = option(15.0, "bilateral kernel width in colour")
    sigma_xy: float = option(100.0, "bilateral kernel width in pixels")
    scale: float = option(0.5, "images and predictions resized by this for the loss")
    weight: float = option(1e-7, "kernel weight inside the energy (reference value)")


@dataclass
class ValConfig:
    size: int = option(448, "val images are resized to size x size")
    max_images: int = option(0, "0: the whole split")


@dataclass
class LogConfig:
    tensorboard: bool = option(True, "rank 0 writes TensorBoard events to <run>/tb/")
    images: int = option(4, "first val images drawn (CAM | LAM | seg) at validation")


@dataclass
class TrainConfig:
    tag: str = option("train_voc", "run name: outputs in <work_dir>/<tag>/")
    work_dir: str = option("logs", "folder of the run folders")
    seed: int = option(0, "RNG seed of weights, sampling and augmentation")
    deterministic: bool = option(False, "deterministic kernels (slower)")
    device: str = option("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    max_iters: int = option(20000, "training steps")
    batch_size: int = option(4, "images per process")
    global_batch: int = option(
        0, "images per optimizer step over all processes; 0: batch_size x processes. Larger: "
           "gradient accumulation over global_batch / (batch_size x processes) micro-batches "
           "(must divide)")
    log_every: int = option(200, "steps between log lines")
    eval_every: int = option(2000, "steps between validations")
    eval_late_from: int = option(-1, "COCO: evaluate every eval_every_late from this step")
    eval_every_late: int = option(2000, "validation period from eval_late_from on")
    save_every: int = option(2000, "steps between iter_<N>.pth checkpoints")
    amp: str = option("none", "none | bf16 | fp16", choices=("none", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model")
    channels_last: bool = option(False, "channels-last memory format")
    resume: str = option("", '"" | auto | path/to/checkpoint.pth')
    overwrite: bool = option(False, "reuse a tag that already holds a run")
    nan_policy: str = option("stop", "stop | skip", choices=("stop", "skip"))
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


def make_config(overrides: dict | None = None, argv: list[str] | None = None,
                schema: type = TrainConfig) -> DictConfig:
    """Training defaults <- `overrides` (a script's dict) <- `argv` (`key=value` strings);
    struct mode: an unknown key, a wrong type or a broken rule is a one-line ConfigError.
    The training crop and the validation size are rounded to the model's patch size."""
    cfg = merge_config(schema, overrides, argv)
    if issubclass(schema, TrainConfig):
        round_to_patch(cfg)
    return cfg


def round_to_patch(cfg: DictConfig) -> None:
    """`data.crop_size` and `val.size` to the nearest multiple of the patch size (the token grid
    covers whole patches), each change noted in one log line (rank 0)."""
    try:
        patch = cfg.model.patch_size or backbone_facts(cfg.model.backbone).patch_size
    except ValueError as exc:  # a tag timm does not know
        raise ConfigError(str(exc)) from None
    if patch < 1:  # refused, in one line, when the model is built
        return
    for section, key in (("data", "crop_size"), ("val", "size")):
        size = cfg[section][key]
        fitted = max(patch, round(size / patch) * patch)
        if fitted != size:
            cfg[section][key] = fitted
            if int(os.environ.get("RANK", 0)) == 0:
                get_logger().warning(f"{section}.{key}={size} is not a multiple of the patch size "
                                     f"{patch}: using {fitted}")
