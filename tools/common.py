"""The one loader and evaluation loop shared by the inference tools (SPEC 7-8).

Every tool takes `key=value` arguments (schema `InferConfig`, strict), e.g.

    python -m tools.infer_seg_voc ckpt=logs/voc/checkpoints/best.pth infer_set=val crf=true
    torchrun --nproc_per_node=2 -m tools.infer_cam ckpt=... multi_scale=true

The checkpoint is ours ({"model", "config", "meta", ...}) or a reference state_dict (possibly
`module.`-prefixed); the model is built from its meta / config, or from the weight shapes. The
dataset (name, root, lists) defaults to the one the checkpoint was trained on. Images are sharded
by global rank (rank::world_size), confusion matrices are all-reduced, so N processes report
exactly the numbers of one. CRF runs on the rank that owns the image, in a process pool.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from utils import dist as udist
from utils.checkpoint import CheckpointError, load_file, model_state
from utils.config import ConfigError, parse_cli, to_container
from utils.logger import git_revision, setup_logger
from utils.metrics import confusion_matrix, format_table, scores
from utils.palette import colorize, save_label_png, save_rgb

SEED_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0)   # SPEC 8 "multi-scale" seeds
SEG_SCALES = (1.0, 1.25, 1.5)                           # SPEC 8 segmentation
DEFAULT_ROOTS = {"voc": "data/VOCdevkit/VOC2012", "coco": "data/COCO"}


@dataclass
class InferData:
    """Unset fields come from the checkpoint's training config (then from the defaults)."""
    name: str | None = None             # voc | coco
    root: str | None = None
    list_dir: str | None = None         # default <root>/ImageSets/Segmentation (or the ckpt's)
    num_classes: int | None = None      # K + 1; must agree with the checkpoint


@dataclass
class InferModel:
    """Unset fields come from the checkpoint (meta / config / weight shapes)."""
    backbone: str | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None        # reference checkpoints: embed_dim // 64 unless set
    decoder_dilation: int | None = None  # reference checkpoints: 5 unless set
    aux_layer: int | None = None
    with_gcr: bool = True               # LAM from the GCR class tokens (reference default)


@dataclass
class InferConfig:
    ckpt: str = ""                      # checkpoint path (required)
    infer_set: str = ""                 # split list name; "" = the tool's default
    multi_scale: bool = False           # seeds: SPEC 8 scales; segmentation tools default to true
    scales: list[float] | None = None   # explicit scales (override multi_scale)
    size: int = 448                     # images are resized to size x size (whatever the aspect)
    bkg: float = 0.5                    # seed background threshold
    cls_labels: str = "gt"              # seeds: gt image labels | pred (classifier, seg fallback)
    crf: bool = False                   # DenseCRF post-processing (needs pydensecrf2)
    crf_workers: int = -1               # CRF processes per rank; -1 auto, 0 in-process
    save_labels: bool = True            # palette PNGs of the predictions
    save_overlays: bool = False         # jet overlays (seeds) / colour blends (segmentation)
    save_arrays: bool = False           # .npz maps (seeds: present-class maps; seg: logits)
    out_dir: str = ""                   # "" = <run folder>/eval/<tool>_<set>
    device: str = "auto"                # auto | cpu | cuda
    num_workers: int = 2                # DataLoader workers per rank
    max_images: int = 0                 # 0 = the whole split (before sharding)
    data: InferData = field(default_factory=InferData)
    model: InferModel = field(default_factory=InferModel)


class InferError(RuntimeError):
    """A problem the user can fix (message is one line)."""


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- config / model
def parse_config(argv: Sequence[str], defaults: dict | None = None) -> DictConfig:
    cfg = parse_cli(argv, InferConfig, defaults)
    if not cfg.ckpt:
        raise ConfigError("ckpt=<path to checkpoint .pth> is required")
    if cfg.cls_labels not in ("gt", "pred"):
        raise ConfigError(f"config key 'cls_labels' must be one of gt, pred; got {cfg.cls_labels!r}")
    return cfg


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


def resolve_data(cfg: DictConfig, info: dict) -> SimpleNamespace:
    """Dataset config: the user's data.* over the checkpoint's training data config."""
    trained = info["config"].get("data", {}) if isinstance(info["config"], dict) else {}
    num_classes = info["num_classes"]
    name = cfg.data.name or trained.get("name")
    if name is None:
        name = {21: "voc", 81: "coco"}.get(num_classes)
        if name is None:
            raise ConfigError(f"checkpoint has K={num_classes - 1} classes and no training config: "
                              f"set data.name and data.root")
    if cfg.data.root:   # a new root: its own lists unless list_dir is given too
        root, list_dir = cfg.data.root, cfg.data.list_dir
    else:
        root = trained.get("root") or DEFAULT_ROOTS.get(name, "")
        list_dir = cfg.data.list_dir or trained.get("list_dir")
    return SimpleNamespace(name=name, root=root, list_dir=list_dir, num_classes=num_classes,
                           train_split=trained.get("train_split", "train_aug"),
                           val_split=trained.get("val_split", "val"))


def list_dir_of(data: SimpleNamespace) -> str:
    return data.list_dir or os.path.join(data.root, "ImageSets", "Segmentation")


def build_dataset_for(data: SimpleNamespace, split: str, check: bool = True):
    """Stage "val" (image at original size, mask, image labels); splits named test* have no
    masks and use stage "test" (label all 255, image labels all 0). `check`: verify the layout
    of a labelled split first (folders, lists, image labels, masks), one-line errors."""
    from datasets import build_dataset
    from datasets.layout import LayoutError, check_layout

    stage = "test" if split.startswith("test") else "val"
    lists = list_dir_of(data)
    have = sorted(p.stem for p in Path(lists).glob("*.txt")) if os.path.isdir(lists) else []
    if have and split not in have:   # a mistyped infer_set, most likely
        raise InferError(f"no split list {split}.txt in {lists}; infer_set can be: {', '.join(have)}")
    if check and stage == "val":
        try:
            check_layout(data, [split])
        except LayoutError as exc:
            raise InferError(str(exc)) from None
    try:
        return build_dataset(data, split, stage)
    except (FileNotFoundError, ValueError) as exc:
        raise InferError(str(exc).splitlines()[0]) from None


def class_names(data: SimpleNamespace) -> list[str]:
    """Names of the K+1 classes: the dataset's own, the synthetic dataset's (synthetic.json), or
    generic ones."""
    from datasets import coco, synthetic, voc

    names = {"voc": voc.CLASS_NAMES, "coco": coco.CLASS_NAMES}.get(data.name)
    if names is None or len(names) != data.num_classes:
        names = (synthetic.read_params(data.root) or {}).get("class_names")
    if names is None or len(names) != data.num_classes:
        names = ["background"] + [f"class_{c}" for c in range(1, data.num_classes)]
    return list(names)


def default_out_dir(ckpt: str, tool: str, split: str, suffix: str = "") -> Path:
    """<run>/eval/<checkpoint stem>/<tool>_<split><suffix>, <run> being the folder above
    checkpoints/ (so evaluating best.pth and last.pth keeps both)."""
    path = Path(ckpt).resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "eval" / path.stem / f"{tool}_{split}{suffix}"


# ----------------------------------------------------------------------------- tensor helpers
def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) -> (H, W, 3) uint8, rounded: recovers the decoded pixels
    (the reference CRF reads the JPEG itself)."""
    from wetr.cam import denormalise_255

    rgb = denormalise_255(image[None].double())[0].round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def predicted_cls_label(out, min_pixels: int = 5) -> torch.Tensor:
    """Image labels from the network (reference `cam2seg`): classifier logits > 0; if no class
    is predicted, the foreground classes of the segmentation argmax (at token resolution) with at
    least `min_pixels` pixels. out: MoReOutput of one image. Returns (1, K) float."""
    cls = (out.cls_logits[:1] > 0).float()
    if cls.sum() > 0:
        return cls
    k = cls.shape[1]
    counts = torch.bincount(out.seg_logits[:1].argmax(1).flatten(), minlength=k + 1)[1:]
    return (counts >= min_pixels).float()[None]


# ----------------------------------------------------------------------------- evaluation loop
@dataclass
class _Pending:
    variant: str
    name: str
    future: Any
    label: np.ndarray | None


class Evaluation:
    """Model, data shard, outputs and metric accumulators of one tool run.

    Usage: `ev = Evaluation(tool, variant, argv, ...)`; for each item of `ev.items()` compute the
    predictions and call `ev.add(...)` / `ev.add_crf(...)`; then `ev.finish()`.
    """

    def __init__(self, tool: str, variant: str, argv: Sequence[str], defaults: dict | None = None,
                 default_set: Callable[[SimpleNamespace], str] | None = None,
                 default_scales: Sequence[float] = (1.0,), multi_scales: Sequence[float] = SEED_SCALES,
                 needs_image_labels: bool = False):
        self.tool = tool
        self.variant = variant
        self.t0 = time.time()
        self.cfg = cfg = parse_config(argv, defaults)
        self.dist = udist.init_distributed(cfg.device)
        self.device = self.dist.device
        self.model, self.info = build_model_from_checkpoint(cfg, self.device)
        self.data = resolve_data(cfg, self.info)
        self.num_classes = self.data.num_classes
        self.split = cfg.infer_set or (default_set(self.data) if default_set else self.data.val_split)
        self.has_labels = not self.split.startswith("test")
        if needs_image_labels and not self.has_labels and cfg.cls_labels == "gt":
            raise InferError(f"split {self.split!r} has no image labels: use cls_labels=pred")
        if cfg.scales:
            self.scales = tuple(float(s) for s in cfg.scales)
        else:
            self.scales = tuple(multi_scales) if cfg.multi_scale else tuple(default_scales)
        self.dataset = build_dataset_for(self.data, self.split, check=self.dist.is_main)
        if cfg.crf:
            from utils.crf import check_available
            check_available()
        if os.environ.get("MORE_PREFLIGHT"):   # launcher scripts: checks only, once, no torchrun
            raise SystemExit(0)

        suffix = ""
        if not cfg.scales and cfg.multi_scale != bool((defaults or {}).get("multi_scale")):
            suffix = "_ms" if cfg.multi_scale else "_ss"
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(
            cfg.ckpt, tool, self.split, suffix)
        self.names = class_names(self.data)
        self.variants = (variant, f"{variant}_crf") if cfg.crf else (variant,)
        self.conf: dict[str, torch.Tensor] = {}
        self.crf_conf: dict[str, torch.Tensor] = {}
        self.pending: list[_Pending] = []
        self.crf_pool = None
        if cfg.crf:
            from utils.crf import CRFPool
            self.crf_pool = CRFPool(self._crf_workers())
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        udist.barrier()
        self.log = setup_logger(self.out_dir / f"{tool}.log", self.dist.is_main)
        self.log.info(f"{tool} | git {git_revision()} | {self.dist.world_size} process(es) on "
                      f"{self.device} | checkpoint {cfg.ckpt} (step {self.info['step']})")
        self.log.info(f"data {self.data.name} {self.data.root} split {self.split} "
                      f"({len(self.dataset)} images) | scales {list(self.scales)} | crf {cfg.crf}"
                      f" | out {self.out_dir}")

    def _crf_workers(self) -> int:
        if self.cfg.crf_workers >= 0:
            return self.cfg.crf_workers
        # The reference uses 60% of the cores for CRF; share them between the local ranks.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        return max(1, int(0.6 * (os.cpu_count() or 1)) // max(1, local))

    # -- data
    def items(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's images: (name, image (1, 3, H, W), label (1, H, W) long,
        cls_label (1, K) float), on the device."""
        n = len(self.dataset)
        if self.cfg.max_images > 0:
            n = min(n, self.cfg.max_images)
        shard = Subset(self.dataset, range(self.dist.rank, n, self.dist.world_size))
        loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=self.cfg.num_workers,
                            pin_memory=self.device.type == "cuda")
        it = loader
        if self.dist.is_main:
            from tqdm import tqdm
            it = tqdm(loader, desc=f"{self.tool} (rank 0)", dynamic_ncols=True)
        for name, image, label, cls_label in it:
            yield (name[0], image.to(self.device, non_blocking=True),
                   label.to(self.device, non_blocking=True),
                   cls_label.to(self.device, non_blocking=True).float())
            self._drain(block=False)

    # -- outputs
    def path(self, *parts: str) -> Path:
        return self.out_dir.joinpath(*parts)

    def _count(self, table: dict, variant: str, pred: torch.Tensor, label: torch.Tensor) -> None:
        if not self.has_labels:
            return
        c = confusion_matrix(pred, label, self.num_classes)
        table[variant] = table[variant] + c if variant in table else c

    def _save_label(self, variant: str, name: str, pred: np.ndarray) -> None:
        if self.cfg.save_labels:
            save_label_png(self.path(variant, f"{name}.png"), pred)
        if not self.has_labels and self.data.name == "voc" and variant == self.variants[-1]:
            # PASCAL VOC evaluation server layout (CRF output when crf=true), ready to zip
            save_label_png(self.path("results", "VOC2012", "Segmentation", "comp6_test_cls",
                                     f"{name}.png"), pred)

    def add(self, name: str, pred: torch.Tensor, label: torch.Tensor) -> np.ndarray:
        """pred, label: (1, H, W) long on the device. Counts and saves; returns pred (H, W) uint8."""
        self._count(self.conf, self.variant, pred, label)
        out = pred[0].to(torch.uint8).cpu().numpy()
        self._save_label(self.variant, name, out)
        return out

    def add_crf(self, name: str, rgb: np.ndarray, probs: torch.Tensor, keys: np.ndarray,
                label: torch.Tensor) -> None:
        """Queue a CRF job: rgb (H, W, 3) uint8, probs (C, H, W), keys (C,) class id per channel."""
        gt = label[0].cpu().numpy() if self.has_labels else None
        probs = np.ascontiguousarray(probs.float().cpu().numpy())
        fut = self.crf_pool.submit(rgb, probs, np.asarray(keys, dtype=np.int64))
        self.pending.append(_Pending(f"{self.variant}_crf", name, fut, gt))
        # bound the memory held by queued probability stacks
        self._drain(block=len(self.pending) > 4 * max(1, self._crf_workers()))

    def _drain(self, block: bool) -> None:
        keep = []
        for i, p in enumerate(self.pending):
            if not (block or p.future.done()):
                keep.append(p)
                continue
            pred = p.future.result()
            block = False   # wait for the oldest one only
            if p.label is not None:
                self._count(self.crf_conf, p.variant, torch.from_numpy(pred),
                            torch.from_numpy(p.label))
            self._save_label(p.variant, p.name, pred)
        self.pending = keep

    def save_npz(self, name: str, **arrays: np.ndarray) -> None:
        path = self.path("arrays", f"{name}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def save_image(self, rel: str, rgb: np.ndarray) -> None:
        save_rgb(self.path(rel), rgb)

    def save_blend(self, name: str, rgb: np.ndarray, pred: np.ndarray) -> None:
        """Segmentation overlay: half image, half palette colours."""
        blend = (0.5 * rgb.astype(np.float64) + 0.5 * colorize(pred)).astype(np.uint8)
        self.save_image(f"overlays/{name}.jpg", blend)

    # -- end
    def finish(self) -> dict | None:
        """Wait for CRF, all-reduce the confusion matrices, print the table, write scores.json
        (rank 0). Returns {variant: scores} on rank 0, None elsewhere."""
        while self.pending:
            self._drain(block=True)
        if self.crf_pool is not None:
            self.crf_pool.close()
        table = {}
        if self.has_labels:
            # same variants on every rank, even one that got no images
            counted = {**self.conf, **self.crf_conf}
            for variant in self.variants:
                c = counted.get(variant)
                if c is None:
                    c = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
                table[variant] = udist.all_reduce_sum(c.to(self.device))
        udist.barrier()
        result = None
        if self.dist.is_main:
            result = {v: scores(c) for v, c in table.items()}
            if result:
                self.log.info(f"{self.tool} on {self.split}:\n" + format_table(result, self.names))
            else:
                self.log.info(f"{self.split} has no ground truth: predictions written, no scores")
            self._write_json(result)
        udist.barrier()
        udist.cleanup()
        return result

    def _write_json(self, result: dict) -> None:
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        record = {
            "tool": self.tool, "checkpoint": str(self.cfg.ckpt), "step": self.info.get("step"),
            "dataset": self.data.name, "root": self.data.root, "split": self.split,
            "images": min(len(self.dataset), self.cfg.max_images or len(self.dataset)),
            "scales": list(self.scales), "class_names": self.names,
            "processes": self.dist.world_size, "seconds": round(time.time() - self.t0, 1),
            "scores": clean(result), "config": to_container(self.cfg),
        }
        path = self.path("scores.json")
        tmp = path.with_name(".scores.json.tmp")
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        self.log.info(f"scores written to {path}")


# ----------------------------------------------------------------------------- seed tools
SeedMaps = Callable[[torch.nn.Module, torch.Tensor, Sequence[float], DictConfig], torch.Tensor]


def _seed_split(data: SimpleNamespace) -> str:
    """VOC seeds are reported on `train` (1464 images) when that list exists, else on the
    training split of the checkpoint."""
    return "train" if os.path.isfile(os.path.join(list_dir_of(data), "train.txt")) else data.train_split


def seed_prediction(maps: torch.Tensor, cls_label: torch.Tensor, bkg: float) -> torch.Tensor:
    """maps: (1, K, H, W) in [0, 1]; cls_label: (1, K) -> (1, H, W) long: best present class + 1,
    background where its score <= bkg (SPEC 7-8, no ignore band)."""
    from wetr.cam import cam_to_label

    return cam_to_label(maps, cls_label, bkg=bkg, ignore_mid=False)


def seed_crf_stack(maps: torch.Tensor, cls_label: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """SPEC 8 CRF input: (1 − max over present classes, present-class maps).

    maps: (1, K, H, W); cls_label: (1, K). Returns probs (1 + P, H, W) and keys (1 + P,) class
    ids [0, c1 + 1, ...]; no present class gives an empty stack (the CRF then labels all 0).
    """
    keys = cls_label[0].nonzero()[:, 0]
    valid = maps[0, keys]
    if keys.numel() == 0:
        return valid, np.zeros(0, dtype=np.int64)
    probs = torch.cat([1 - valid.amax(0, keepdim=True), valid], dim=0)
    return probs, np.concatenate([[0], keys.cpu().numpy() + 1])


def run_seeds(tool: str, variant: str, compute: SeedMaps, argv: Sequence[str]) -> dict | None:
    """CAM / LAM seeds (SPEC 8): each image resized to size x size, `compute` -> (1, K, size,
    size) multi-scale + flip maps in [0, 1], upsampled to the label size, labelled with bkg using
    the ground-truth (or predicted) image labels; optional CRF, arrays and overlays."""
    from utils.palette import jet_overlay

    ev = Evaluation(tool, variant, argv, default_set=_seed_split, default_scales=(1.0,),
                    multi_scales=SEED_SCALES, needs_image_labels=True)
    cfg = ev.cfg
    with torch.no_grad():
        for name, image, label, cls_label in ev.items():
            x = resize(image, (cfg.size, cfg.size))
            if cfg.cls_labels == "pred":
                cls_label = predicted_cls_label(ev.model(x, with_gcr=cfg.model.with_gcr))
            maps = resize(compute(ev.model, x, ev.scales, cfg), label.shape[-2:])
            ev.add(name, seed_prediction(maps, cls_label, cfg.bkg), label)
            rgb = to_uint8_rgb(image[0]) if cfg.crf or cfg.save_overlays else None
            if cfg.crf:
                probs, keys = seed_crf_stack(maps, cls_label)
                ev.add_crf(name, rgb, probs, keys, label)
            present = cls_label[0].nonzero()[:, 0]
            if cfg.save_arrays:
                ev.save_npz(name, **{variant: maps[0, present].half().cpu().numpy(),
                                     "classes": (present + 1).cpu().numpy()})
            if cfg.save_overlays:
                heat = (maps * cls_label[:, :, None, None]).amax(1)[0].cpu().numpy()
                ev.save_image(f"overlays/{name}.jpg", jet_overlay(rgb, heat, 0.5))
                for c in present.tolist():
                    ev.save_image(f"overlays_class/{name}_{ev.names[c + 1].replace(' ', '_')}.jpg",
                                  jet_overlay(rgb, maps[0, c].cpu().numpy(), 0.6))
    return ev.finish()


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Entry point wrapper: user errors become one line on stderr and exit status 2."""
    from utils.dist import DeviceError

    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ConfigError, CheckpointError, InferError, DeviceError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        from utils.crf import CRF_MISSING
        if str(exc) == CRF_MISSING:
            _fail(CRF_MISSING)
        raise
