"""cam2seg's val label order (`wetr.infer.classifier_first_labels`, METHOD.md §8) against a slow
transcription of the authors' tools/infer_lam.py (one image at a time, as their batch of 1),
including its first-class quirk: the pixel check loops over `cls_idx[1:]`, so when no argmax cell
is background the lowest foreground class is kept whatever its size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wetr.infer import classifier_first_labels


def authors_val_labels(cls: torch.Tensor, segs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reference's cam2seg block for one image: cls (1, K) logits, segs (1, K+1, h, w).
    Returns (1, K) float."""
    cls_pred = (cls > 0).to(torch.int16)
    cls_idx = torch.argmax(segs, dim=1).unique()
    non_zero_cls = cls_idx[cls_idx != 0] - 1
    cls_pred_from_seg = torch.eye(num_classes - 1)[non_zero_cls].sum(dim=0, keepdim=True)
    for id in cls_idx[1:]:
        if (torch.argmax(segs, dim=1) == id).sum() < 5:
            cls_pred_from_seg[0, id - 1] = 0
    return (cls_pred_from_seg if cls_pred.sum() <= 0 else cls_pred).float()


def loop(cls: torch.Tensor, segs: torch.Tensor) -> torch.Tensor:
    k1 = segs.shape[1]
    return torch.cat([authors_val_labels(cls[b:b + 1], segs[b:b + 1], k1)
                      for b in range(cls.shape[0])])


def logits_of(grid: torch.Tensor, k: int) -> torch.Tensor:
    """(h, w) class ids -> (1, K+1, h, w) logits whose argmax is `grid`."""
    return F.one_hot(grid, k + 1).permute(2, 0, 1)[None].float()


def test_quirk_keeps_the_lowest_class_when_the_argmax_has_no_background():
    k = 4
    grid = torch.full((6, 6), 3)
    grid.view(-1)[:2] = 2          # class 2: 2 cells, below 5, but the first of {2, 3}
    grid.view(-1)[2:4] = 4         # class 4: 2 cells, checked and dropped
    cls = torch.full((1, k), -1.0)  # the classifier predicts nothing
    got = classifier_first_labels(cls, logits_of(grid, k))
    want = loop(cls, logits_of(grid, k))
    assert torch.equal(got, want)
    assert got[0].nonzero()[:, 0].tolist() == [1, 2]   # 0-based: classes 2 and 3
    grid.view(-1)[4] = 0           # one background cell: class 2 is now checked and dropped
    assert classifier_first_labels(cls, logits_of(grid, k))[0].nonzero()[:, 0].tolist() == [2]
    assert torch.equal(classifier_first_labels(cls, logits_of(grid, k)),
                       loop(cls, logits_of(grid, k)))


@pytest.mark.parametrize("seed", range(4))
def test_val_order_matches_the_authors_loop_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    k = 5
    quirk_cases = 0
    for _ in range(25):
        cls = torch.randn(8, k, generator=g) - 1.2         # often no class predicted
        seg = torch.randn(8, k + 1, 4, 5, generator=g)
        seg[:3, 0] -= 4                                    # no background in these images
        seg[3:5, 0] += 1.5                                 # mostly background
        got = classifier_first_labels(cls, seg)
        assert got.shape == (8, k) and got.dtype == torch.float32
        assert torch.equal(got, loop(cls, seg))
        for b in range(8):   # the quirk decides: nothing predicted, no background, lowest < 5
            present = seg[b].argmax(0).unique().tolist()
            small = int((seg[b].argmax(0) == present[0]).sum()) < 5
            quirk_cases += (cls[b] <= 0).all().item() and present[0] != 0 and small
    assert quirk_cases > 0   # so the comparison covered it
