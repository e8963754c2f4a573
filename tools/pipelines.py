"""Per-image routes of the inference tools (SPEC 8): seeds (CAM / LAM) and segmentation. Each
takes the run and one image, computes its maps (`wetr.infer`) and hands the predictions to the
run's `Evaluation`."""
from __future__ import annotations

import numpy as np
import torch

from utils.palette import jet_overlay
from wetr.cam import maps_to_label, resize_bilinear
from wetr.infer import (classifier_first_labels, multi_scale_seg, seed_crf_stack, seed_maps,
                        seg_first_labels)

from .evaluation import to_uint8_rgb
from .session import InferRun, Item


def seed_image(run: InferRun, item: Item) -> None:
    """CAM / LAM seeds (run.spec.variant): the image resized to size x size, multi-scale + flip
    maps in [0, 1] upsampled to the label size, labelled with bkg using the ground-truth (or
    predicted) image labels; optional CRF, arrays and overlays. Also LAM as segmentation
    (`cam2seg`): the same route with predicted labels on the val or test split."""
    cfg, ev, kind = run.cfg, run.ev, run.spec.variant
    name, image, label, cls_label = item
    x = resize_bilinear(image, (cfg.size, cfg.size))
    if cfg.cls_labels == "pred":
        # the reference's label order: classifier first on a labelled split (infer_lam.py),
        # segmentation head first on the test split (infer_lam_test_75.py)
        order = classifier_first_labels if run.has_labels else seg_first_labels
        out = run.model(x, with_gcr=cfg.model.with_gcr)
        cls_label = order(out.cls_logits, out.seg_logits)
    maps = seed_maps(kind, run.model, x, run.scales, with_gcr=cfg.model.with_gcr)
    maps = resize_bilinear(maps, label.shape[-2:])
    ev.add(name, maps_to_label(maps, cls_label, bkg=cfg.bkg), label)
    rgb = to_uint8_rgb(image[0]) if cfg.crf or cfg.save_overlays else None
    if cfg.crf:
        probs, keys = seed_crf_stack(maps, cls_label)
        ev.add_crf(name, rgb, probs, keys, label)
    present = cls_label[0].nonzero()[:, 0]
    if cfg.save_arrays:
        ev.save_npz(name, **{kind: maps[0, present].half().cpu().numpy(),
                             "classes": (present + 1).cpu().numpy()})
    if cfg.save_overlays:
        _seed_overlays(run, name, rgb, maps, cls_label, present)


def _seed_overlays(run: InferRun, name: str, rgb: np.ndarray, maps: torch.Tensor,
                   cls_label: torch.Tensor, present: torch.Tensor) -> None:
    """Jet overlays: the max over present classes, and one per present class."""
    heat = (maps * cls_label[:, :, None, None]).amax(1)[0].cpu().numpy()
    run.ev.save_image(f"overlays/{name}.jpg", jet_overlay(rgb, heat, 0.5))
    for c in present.tolist():
        run.ev.save_image(f"overlays_class/{name}_{run.names[c + 1].replace(' ', '_')}.jpg",
                          jet_overlay(rgb, maps[0, c].cpu().numpy(), 0.6))


def seg_image(run: InferRun, item: Item) -> None:
    """Segmentation: multi-scale + flip logits at the label size, argmax; optional CRF on the
    softmax, arrays (logits) and colour blends."""
    cfg, ev = run.cfg, run.ev
    name, image, label, _ = item
    seg = multi_scale_seg(run.model, image, cfg.size, run.scales, label.shape[-2:])
    pred = ev.add(name, seg.argmax(1), label)
    rgb = to_uint8_rgb(image[0]) if cfg.crf or cfg.save_overlays else None
    if cfg.crf:
        ev.add_crf(name, rgb, seg[0].softmax(0), np.arange(seg.shape[1]), label)
    if cfg.save_arrays:
        ev.save_npz(name, seg=seg[0].half().cpu().numpy())
    if cfg.save_overlays:
        ev.save_blend(name, rgb, pred)
