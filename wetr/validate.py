"""Validation during training (METHOD.md §7): CAM, LAM, Fused and Seg mIoU plus classifier F1.

Images are sharded by global rank; confusion matrices and F1 sums are all-reduced, so the numbers
do not depend on the number of processes. The maps come from `wetr.infer.validation_maps`.

An image without a mask (label all 255: a tag dataset's val image, datasets/tags.py) only goes
through the classifier's forward: its maps would add nothing to the confusion matrices. The
classifier is always scored per class too (precision / recall / F1 of logits > 0 against the
image labels, `result["cls"]`); when no val image has a mask, the mIoUs are NaN and the log
says once that mIoU needs masks. On a tag dataset, or without masks, each validation logs the
classifier's per-class figures with the class names (`val_scalars`: the same for TensorBoard).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from datasets import class_names
from utils.dist import DistInfo, all_reduce_sum, rank_shard
from utils.logger import get_logger
from utils.metrics import IGNORE_INDEX, classifier_scores, confusion_matrix, multilabel_f1, scores
from utils.tensorboard_log import val_overlay

from .cam import denormalise, maps_to_label, resize_bilinear
from .infer import validation_maps

MAP_NAMES = ("cam", "lam", "fused", "seg")


def build_val_loader(dataset, dist: DistInfo, num_workers: int, max_images: int = 0) -> DataLoader:
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    shard = Subset(dataset, list(rank_shard(n, dist)))
    return DataLoader(shard, batch_size=1, shuffle=False, num_workers=num_workers,
                      pin_memory=dist.device.type == "cuda")


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, cfg, dist: DistInfo,
             progress: bool = False) -> dict:
    """Returns {"cam"|"lam"|"fused"|"seg": scores dict, "f1": float, "images": int,
    "masked_images": int (val images with a labelled pixel), "cls": per-class classifier
    figures (`classifier_scores`)}."""
    num_classes = cfg.data.num_classes
    device = dist.device
    was_training = model.training
    model.eval()
    conf = {k: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
            for k in MAP_NAMES}
    f1_sum = torch.zeros(3, dtype=torch.float64, device=device)  # (sum, count, masked images)
    counts = torch.zeros(3, num_classes - 1, dtype=torch.int64, device=device)  # tp, fp, fn
    bkg = cfg.cam.bkg
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="val", dynamic_ncols=True, leave=False)
    for _, image, label, cls_label in it:
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        cls_label = cls_label.to(device, non_blocking=True).float()
        x = resize_bilinear(image, (cfg.val.size, cfg.val.size))
        if bool((label != IGNORE_INDEX).any()):
            maps = validation_maps(model, x, cfg.cam.scales, label.shape[-2:])
            cls_logits = maps.cls_logits
            preds = {
                "cam": maps_to_label(maps.cam, cls_label, bkg=bkg),
                "lam": maps_to_label(maps.lam, cls_label, bkg=bkg),
                "fused": maps_to_label(maps.fused, cls_label, bkg=bkg),
                "seg": maps.seg.argmax(1),
            }
            for k, p in preds.items():
                conf[k] += confusion_matrix(p, label, num_classes)
            f1_sum[2] += 1
        else:   # no mask: nothing to add to the confusion matrices, the classifier alone
            cls_logits = model(x).cls_logits
        pred, target = cls_logits > 0, cls_label.bool()
        counts += torch.stack([(pred & target).sum(0), (pred & ~target).sum(0),
                               (~pred & target).sum(0)])
        f1 = multilabel_f1(pred, cls_label)
        f1_sum[0] += f1.sum()
        f1_sum[1] += f1.numel()
    for c in conf.values():
        all_reduce_sum(c)
    all_reduce_sum(f1_sum)
    all_reduce_sum(counts)
    model.train(was_training)
    result = {k: scores(c.cpu()) for k, c in conf.items()}
    result["f1"] = float(f1_sum[0] / f1_sum[1].clamp(min=1))
    result["images"] = int(f1_sum[1])
    result["masked_images"] = int(f1_sum[2])
    result["cls"] = classifier_scores(counts.cpu())
    tags = getattr(cfg.data, "name", None) == "tags"
    if (result["masked_images"] == 0 or tags) and dist.is_main:
        _log_classifier(result, cfg)
    return result


def val_scalars(result: dict, cfg) -> dict:
    """Per-class classifier precision / recall as metrics.jsonl / TensorBoard scalars, named by
    class: {"val/cls_precision/<class>": p, "val/cls_recall/<class>": r} (NaN ones are left out
    of TensorBoard by `utils.tensorboard_log`); a tag dataset's only, so VOC / COCO records stay
    as they were."""
    if getattr(cfg.data, "name", None) != "tags":
        return {}
    names = [n.replace(" ", "_") for n in class_names(cfg.data)[1:]]
    out = {}
    for key in ("precision", "recall"):
        out.update({f"val/cls_{key}/{n}": v for n, v in zip(names, result["cls"][key])})
    return out


_NOTED: set[str] = set()   # runs whose log already says that mIoU needs masks


def _log_classifier(result: dict, cfg) -> None:
    """The per-class classifier figures (a tag dataset, or no val masks) and, without masks,
    the note that mIoU needs them (once a run)."""
    log = get_logger()
    if result["masked_images"] == 0 and cfg.tag not in _NOTED:
        _NOTED.add(cfg.tag)
        log.info("val: no val image has a mask, so validation scores the classifier (F1, "
                 "per-class precision / recall); mIoU needs masks (tools/prepare_tags.py --masks)")
    names = class_names(cfg.data)[1:]
    c = result["cls"]
    cells = [f"{n} P {_pct(p)} R {_pct(r)}" for n, p, r in zip(names, c["precision"], c["recall"])]
    log.info(f"val classifier: F1 {result['f1'] * 100:.2f} ({result['images']} images) | "
             + " | ".join(cells))


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


@torch.no_grad()
def val_overlays(model: torch.nn.Module, dataset, cfg, device: torch.device,
                 num_images: int) -> list:
    """The first `num_images` images of the val set as panel rows image | CAM | LAM | seg |
    ground truth (`utils.tensorboard_log.val_overlay`; maps of the image's own classes, as
    validated). Returns a list of (H, 5W, 3) uint8 arrays."""
    was_training = model.training
    model.eval()
    rows = []
    for i in range(min(num_images, len(dataset))):
        _, image, label, cls_label = dataset[i]
        x = resize_bilinear(image[None].to(device), (cfg.val.size, cfg.val.size))
        maps = validation_maps(model, x, cfg.cam.scales, label.shape[-2:])
        present = cls_label.nonzero()[:, 0].tolist()
        rgb = (denormalise(image[None])[0].permute(1, 2, 0) * 255).round().byte().numpy()
        rows.append(val_overlay(rgb, maps.cam[0, present].cpu().numpy(),
                                maps.lam[0, present].cpu().numpy(),
                                maps.seg[0].argmax(0).cpu().numpy(), label.numpy()))
    model.train(was_training)
    return rows
