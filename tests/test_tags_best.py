"""best.pth of a run: chosen by Seg mIoU when the val split has masks (VOC / COCO: checkpoint meta
as before, {"best_miou"}), by the classifier's F1 when no val image has one (a tag dataset
without masks, whose mIoUs are NaN); the train.log val line then shows the F1, not NaN mIoUs."""
from __future__ import annotations

import logging

import pytest
import torch

from utils.dist import DistInfo
from wetr import engine
from wetr.config import make_config
from wetr.factory import model_from_config
from wetr.optim import build_optimizer
from wetr.run import TrainState, new_loss_sums
from wetr.step import Training

TINY = ["model.pretrained=false", "model.embed_dim=32", "model.depth=3", "model.num_heads=4",
        "data.num_classes=3", "eval_every=2", "save_every=100", "max_iters=100"]


def _result(miou: float, f1: float, masked: int) -> dict:
    """A validation result as wetr.validate.validate returns it (the fields the engine reads)."""
    seg = {"miou": miou}
    return {"cam": seg, "lam": seg, "fused": seg, "seg": seg, "f1": f1, "images": 4,
            "masked_images": masked, "cls": {}}


@pytest.fixture
def state(tmp_path):
    cfg = make_config(None, TINY + [f"work_dir={tmp_path}", "tag=t"])
    model = model_from_config(cfg)
    training = Training(model, model, build_optimizer(model.param_groups(), cfg), None, par=None)
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    ctx = engine.TrainContext(cfg, dist, training, None, logging.getLogger("test"), None, 1)
    return ctx, TrainState(new_loss_sums(dist.device))


def _run(state, monkeypatch, results):
    """Validate at steps 2, 4, ... with `results`; -> (best.pth step and meta, last.pth meta)
    after each."""
    ctx, st = state
    seen = []
    for i, res in enumerate(results):
        monkeypatch.setattr(engine, "_validate", lambda _ctx, _step, _r=res: _r)
        st.step = 2 * (i + 1)
        engine._evaluate_and_save(ctx, st)
        best = ctx.ckpt_dir / "best.pth"
        b = torch.load(best, weights_only=False) if best.exists() else None
        last = torch.load(ctx.ckpt_dir / "last.pth", weights_only=False)
        seen.append((b and b["step"], b and {k: v for k, v in b["meta"].items() if k != "val"},
                     last["meta"]))
    return seen


def test_without_masks_best_is_the_best_f1(state, monkeypatch):
    nan = float("nan")
    seen = _run(state, monkeypatch, [_result(nan, 0.5, 0), _result(nan, 0.4, 0),
                                     _result(nan, 0.6, 0)])
    assert [s[0] for s in seen] == [2, 2, 6]
    assert [s[1]["best_f1"] for s in seen] == [0.5, 0.5, 0.6]
    assert [s[2] for s in seen] == [{"best_miou": -1.0, "best_f1": f} for f in (0.5, 0.5, 0.6)]


def test_with_masks_best_is_the_seg_miou_and_meta_as_before(state, monkeypatch):
    seen = _run(state, monkeypatch, [_result(0.3, 0.9, 4), _result(0.2, 0.95, 4),
                                     _result(0.35, 0.1, 4)])
    assert [s[0] for s in seen] == [2, 2, 6]
    assert [s[1] for s in seen] == [{"best_miou": m} for m in (0.3, 0.3, 0.35)]
    assert [s[2] for s in seen] == [{"best_miou": m} for m in (0.3, 0.3, 0.35)]
