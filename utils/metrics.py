"""Segmentation and classification metrics (METHOD.md §7-8).

The confusion matrix is summed over the whole dataset (and over ranks with
`utils.dist.all_reduce_sum`) before any ratio is taken, so the scores of N processes equal the
scores of one. Rows are ground truth, columns are predictions.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

IGNORE_INDEX = 255   # the label of pixels no loss or metric counts (label maps: 0, 1..K, 255)


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Confusion counts of one or many label maps.

    pred, gt: integer tensors of the same shape (any device). Pixels where `gt` is
    `ignore_index` or outside 0..C-1 are skipped, and so are pixels whose prediction is outside
    0..C-1 (an "ignore" prediction, as in seed maps with uncertain regions).
    Returns (C, C) int64 on the input's device, conf[g, p] = #pixels with gt g predicted p.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes) & (pred >= 0) & (pred < num_classes)
    index = gt[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))


def scores(conf: torch.Tensor) -> dict:
    """IoU / precision / recall per class from a (C, C) confusion matrix.

    Returns plain Python values (JSON-ready apart from NaN for undefined ratios):
      iou, precision, recall: lists of C floats (NaN where the denominator is 0);
      present: list of C bools, class occurs in the ground truth;
      miou: mean IoU over the classes present in the ground truth (METHOD.md §8);
      mprecision, mrecall: means over the same classes (NaN-skipping);
      pixel_acc: correct / all counted pixels; pixels: number of counted pixels.
    """
    conf = conf.detach().to("cpu", torch.float64)
    tp = conf.diagonal()
    gt_count = conf.sum(1)
    pred_count = conf.sum(0)
    iou = _ratio(tp, gt_count + pred_count - tp)
    precision = _ratio(tp, pred_count)
    recall = _ratio(tp, gt_count)
    present = gt_count > 0

    def mean_present(values: torch.Tensor) -> float:
        v = values[present]
        v = v[~v.isnan()]
        return float(v.mean()) if v.numel() else float("nan")

    total = conf.sum()
    return {
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "present": present.tolist(),
        "miou": mean_present(iou),
        "mprecision": mean_present(precision),
        "mrecall": mean_present(recall),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "pixels": int(total),
    }


def multilabel_f1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image F1 of multi-label predictions (the reference's sklearn `f1_score` per image).

    pred, target: (B, K) 0/1. Returns (B,) float: 2·tp / (2·tp + fp + fn), 0 when an image has
    neither true nor predicted labels (sklearn's zero_division default).
    """
    pred = pred.bool()
    target = target.bool()
    tp = (pred & target).sum(1).double()
    wrong = (pred ^ target).sum(1).double()
    den = 2 * tp + wrong
    return torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.zeros_like(den)).float()


def classifier_scores(counts: torch.Tensor) -> dict:
    """counts (3, K): tp, fp, fn of each class of a multi-label classifier over a set of images
    -> {"precision", "recall", "f1": K floats (NaN where undefined), "support": K ints (images
    tagged with the class)}."""
    tp, fp, fn = counts.double()
    return {"precision": _ratio(tp, tp + fp).tolist(), "recall": _ratio(tp, tp + fn).tolist(),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn).tolist(), "support": (tp + fn).long().tolist()}


def _pct(v: float) -> str:
    return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"


def format_table(results: Mapping[str, dict], names: Sequence[str]) -> str:
    """Text table: one row per class, IoU / precision / recall columns for each result.

    results: {"cam": scores(...), "cam_crf": scores(...)}; names: the C class names.
    Classes absent from the ground truth are marked with `*` (excluded from the means).
    """
    cols = [(r, key, short) for r in results for key, short in
            (("iou", "IoU"), ("precision", "Prec"), ("recall", "Rec"))]
    width = max(12, *(len(n) + 2 for n in names))
    heads = [f"{r}:{short}" for r, _, short in cols]
    colw = [max(7, len(h)) for h in heads]
    lines = ["Class".ljust(width) + " ".join(h.rjust(w) for h, w in zip(heads, colw))]
    lines.append("-" * len(lines[0]))
    first = next(iter(results.values()))
    for c, name in enumerate(names):
        mark = "" if first["present"][c] else "*"
        cells = [_pct(results[r][key][c]).rjust(w) for (r, key, _), w in zip(cols, colw)]
        lines.append((name + mark).ljust(width) + " ".join(cells))
    lines.append("-" * len(lines[0]))
    means = {"iou": "miou", "precision": "mprecision", "recall": "mrecall"}
    cells = [_pct(results[r][means[key]]).rjust(w) for (r, key, _), w in zip(cols, colw)]
    lines.append("mean".ljust(width) + " ".join(cells))
    lines.append("pixel acc".ljust(width) + " ".join(
        (_pct(results[r]["pixel_acc"]) if key == "iou" else "").rjust(w)
        for (r, key, _), w in zip(cols, colw)))
    if not all(first["present"]):
        lines.append("* absent from the ground truth, not in the means")
    return "\n".join(lines)
