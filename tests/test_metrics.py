"""Metrics against slow loop references (METHOD.md §8)."""
import math

import pytest
import torch

from utils.metrics import confusion_matrix, format_table, multilabel_f1, scores


def loop_confusion(pred, gt, c, ignore=255):
    conf = [[0] * c for _ in range(c)]
    for p, g in zip(pred.flatten().tolist(), gt.flatten().tolist()):
        if g == ignore or not (0 <= g < c) or not (0 <= p < c):
            continue
        conf[g][p] += 1
    return torch.tensor(conf, dtype=torch.int64)


def loop_scores(conf):
    c = conf.shape[0]
    iou, prec, rec, present = [], [], [], []
    for k in range(c):
        tp = conf[k, k].item()
        row = sum(conf[k, j].item() for j in range(c))
        col = sum(conf[j, k].item() for j in range(c))
        iou.append(tp / (row + col - tp) if row + col - tp > 0 else math.nan)
        prec.append(tp / col if col > 0 else math.nan)
        rec.append(tp / row if row > 0 else math.nan)
        present.append(row > 0)
    used = [iou[k] for k in range(c) if present[k] and not math.isnan(iou[k])]
    total = sum(conf[i, j].item() for i in range(c) for j in range(c))
    return iou, prec, rec, present, sum(used) / len(used), sum(conf[k, k].item() for k in range(c)) / total


def same(a, b, tol=1e-12):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_scores_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    c = 6
    # classes 4 and 5 never occur in the ground truth; 5 is still predicted sometimes
    gt = torch.randint(0, 4, (3, 17, 13), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.1] = 255
    pred = torch.where(torch.rand(gt.shape, generator=g) < 0.6, gt.clamp(max=3),
                       torch.randint(0, c, gt.shape, generator=g))
    pred[torch.rand(gt.shape, generator=g) < 0.05] = 255   # "ignore" predictions are skipped
    conf = confusion_matrix(pred, gt, c)
    assert conf.dtype == torch.int64 and conf.shape == (c, c)
    assert torch.equal(conf, loop_confusion(pred, gt, c))

    s = scores(conf)
    iou, prec, rec, present, miou, acc = loop_scores(conf)
    assert s["present"] == present and present[4] is False and present[5] is False
    assert all(same(a, b) for a, b in zip(s["iou"], iou))
    assert all(same(a, b) for a, b in zip(s["precision"], prec))
    assert all(same(a, b) for a, b in zip(s["recall"], rec))
    assert s["iou"][5] == 0.0            # predicted but absent: IoU 0, not in the mean
    assert same(s["miou"], miou) and same(s["pixel_acc"], acc)


def test_confusion_sums_over_images_and_devices_agree():
    g = torch.Generator().manual_seed(3)
    gt = torch.randint(0, 5, (4, 9, 11), generator=g)
    pred = torch.randint(0, 5, (4, 9, 11), generator=g)
    parts = sum(confusion_matrix(pred[i], gt[i], 5) for i in range(4))
    assert torch.equal(parts, confusion_matrix(pred, gt, 5))   # sharding does not change it


def test_multilabel_f1_matches_loop():
    g = torch.Generator().manual_seed(0)
    pred = (torch.rand(20, 7, generator=g) < 0.4).float()
    target = (torch.rand(20, 7, generator=g) < 0.4).float()
    pred[0] = 0
    target[0] = 0     # no labels at all: F1 0 (sklearn's zero_division)
    f1 = multilabel_f1(pred, target)
    for i in range(20):
        tp = sum(1 for k in range(7) if pred[i, k] and target[i, k])
        fp = sum(1 for k in range(7) if pred[i, k] and not target[i, k])
        fn = sum(1 for k in range(7) if not pred[i, k] and target[i, k])
        want = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
        assert abs(f1[i].item() - want) < 1e-6


def test_format_table_lists_classes_and_means():
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    s = scores(conf)
    text = format_table({"cam": s, "cam_crf": s}, ["background", "cat", "dog"])
    lines = text.splitlines()
    assert "cam:IoU" in lines[0] and "cam_crf:Rec" in lines[0]
    assert any(line.startswith("dog*") for line in lines)   # absent from the ground truth
    mean_line = next(line for line in lines if line.startswith("mean"))
    assert f"{100 * s['miou']:5.1f}" in mean_line
