"""Validation during training (SPEC 7): CAM, LAM, Fused and Seg mIoU plus classifier F1.

Images are sharded by global rank; confusion matrices and F1 sums are all-reduced, so the numbers
do not depend on the number of processes. The maps come from `wetr.infer.validation_maps`.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from utils.dist import DistInfo, all_reduce_sum
from utils.metrics import confusion_matrix, multilabel_f1, scores
from utils.tensorboard_log import val_overlay

from .cam import denormalise, maps_to_label, resize_bilinear
from .infer import validation_maps

MAP_NAMES = ("cam", "lam", "fused", "seg")


def build_val_loader(dataset, dist: DistInfo, num_workers: int, max_images: int = 0) -> DataLoader:
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    shard = Subset(dataset, list(range(dist.rank, n, dist.world_size)))
    return DataLoader(shard, batch_size=1, shuffle=False, num_workers=num_workers,
                      pin_memory=dist.device.type == "cuda")


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, cfg, dist: DistInfo,
             progress: bool = False) -> dict:
    """Returns {"cam"|"lam"|"fused"|"seg": scores dict, "f1": float, "images": int}."""
    num_classes = cfg.data.num_classes
    device = dist.device
    was_training = model.training
    model.eval()
    conf = {k: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
            for k in MAP_NAMES}
    f1_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)
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
        maps = validation_maps(model, x, cfg.cam.scales, label.shape[-2:])
        preds = {
            "cam": maps_to_label(maps.cam, cls_label, bkg=bkg),
            "lam": maps_to_label(maps.lam, cls_label, bkg=bkg),
            "fused": maps_to_label(maps.fused, cls_label, bkg=bkg),
            "seg": maps.seg.argmax(1),
        }
        for k, p in preds.items():
            conf[k] += confusion_matrix(p, label, num_classes)
        f1 = multilabel_f1(maps.cls_logits > 0, cls_label)
        f1_sum[0] += f1.sum()
        f1_sum[1] += f1.numel()
    for c in conf.values():
        all_reduce_sum(c)
    all_reduce_sum(f1_sum)
    model.train(was_training)
    result = {k: scores(c.cpu()) for k, c in conf.items()}
    result["f1"] = float(f1_sum[0] / f1_sum[1].clamp(min=1))
    result["images"] = int(f1_sum[1])
    return result


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
