"""Validation during training (METHOD.md §7) against a per-image, per-pixel loop on a fake model."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.dist import DistInfo
from wetr.cam import multi_scale_cam
from wetr.model import MoReOutput
from wetr.validate import validate

K, D = 3, 6


class FakeModel(torch.nn.Module):
    """Deterministic stand-in with the MoRe call contract (patch 16)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Conv2d(3, D, 16, stride=16)
        self.cls = torch.nn.Conv2d(D, K, 1, bias=False)
        self.seg = torch.nn.Conv2d(D, K + 1, 1)
        self.tokens = torch.nn.Parameter(torch.randn(K, D, generator=g))

    def forward(self, x, cam_only=False, with_gcr=True):
        f = self.proj(x)
        cam = self.cls(f)
        if cam_only:
            return cam * 0.5, cam
        b = x.shape[0]
        logits = F.adaptive_max_pool2d(cam, 1).flatten(1)
        return MoReOutput(logits, self.seg(f), f, logits, self.tokens.expand(b, K, D), cam)


def label_loop(maps, present, bkg):
    """maps (K,H,W) numpy; METHOD.md: multiply by labels, max over classes, class id or 0 if <= bkg."""
    _, h, w = maps.shape
    out = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            vals = [maps[c, y, x] * present[c] for c in range(K)]
            c = int(np.argmax(vals))
            out[y, x] = 0 if vals[c] <= bkg else c + 1
    return out


def norm_loop(m):
    m = m.copy()
    for c in range(m.shape[0]):
        m[c] -= m[c].min()
        m[c] /= m[c].max() + 1e-5
    return m


def miou_loop(pairs, n):
    conf = np.zeros((n, n), dtype=np.int64)
    for pred, gt in pairs:
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g != 255:
                conf[g, p] += 1
    iou = [conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c])
           for c in range(n) if conf[c].sum() > 0]
    return float(np.mean(iou))


def _fake_val_data():
    torch.manual_seed(1)
    model = FakeModel().eval()
    sizes = [(40, 56), (48, 48)]
    data = []
    for i, (h, w) in enumerate(sizes):
        label = torch.randint(0, K + 1, (h, w))
        label[:3] = 255
        data.append((f"im{i}", torch.randn(1, 3, h, w), label[None],
                     torch.tensor([[1.0, 0.0, 1.0]]) if i == 0 else torch.tensor([[0.0, 1.0, 1.0]])))
    return model, data


def _coco_bkg() -> float:
    from scripts.train_coco import COCO
    from wetr.config import make_config
    return make_config(COCO).cam.bkg


@pytest.mark.parametrize("bkg", [0.5, "coco"])
def test_validate_matches_loop_reference(bkg):
    """CAM, LAM and Fused labels use cam.bkg (VOC 0.5; COCO's resolved config, 0.45)."""
    bkg = _coco_bkg() if bkg == "coco" else bkg
    model, data = _fake_val_data()
    cfg = SimpleNamespace(data=SimpleNamespace(num_classes=K + 1), val=SimpleNamespace(size=64),
                          cam=SimpleNamespace(bkg=bkg, scales=[1.0, 0.5]))
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    result = validate(model, data, cfg, dist)

    pairs = {k: [] for k in ("cam", "lam", "fused", "seg")}
    with torch.no_grad():
        for _, image, label, y in data:
            size = label.shape[-2:]
            x = F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False)
            cam = multi_scale_cam(model, x, [1.0, 0.5])[0]
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0].numpy()
            out = model(x)
            lam = torch.einsum("bkd,bdhw->bkhw", out.class_tokens, out.patch_map)
            lam = norm_loop(F.interpolate(lam, size=size, mode="bilinear",
                                          align_corners=False)[0].numpy())
            seg = F.interpolate(out.seg_logits, size=size, mode="bilinear", align_corners=False)
            gt, present = label[0].numpy(), y[0].numpy()
            pairs["cam"].append((label_loop(cam, present, bkg), gt))
            pairs["lam"].append((label_loop(lam, present, bkg), gt))
            pairs["fused"].append((label_loop(norm_loop(lam * cam), present, bkg), gt))
            pairs["seg"].append((seg[0].argmax(0).numpy(), gt))
    for k, p in pairs.items():
        assert abs(result[k]["miou"] - miou_loop(p, K + 1)) < 1e-9, k
    assert result["images"] == 2


def test_validation_labels_follow_cam_bkg():
    """COCO's 0.45 is not VOC's 0.5 in effect: every thresholded map's score moves with cam.bkg,
    the seg head's does not."""
    assert _coco_bkg() == 0.45
    model, data = _fake_val_data()
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    res = {}
    for bkg in (0.5, 0.45):
        cfg = SimpleNamespace(data=SimpleNamespace(num_classes=K + 1), val=SimpleNamespace(size=64),
                              cam=SimpleNamespace(bkg=bkg, scales=[1.0, 0.5]))
        res[bkg] = validate(model, data, cfg, dist)
    for k in ("cam", "lam", "fused"):
        assert res[0.5][k]["miou"] != res[0.45][k]["miou"], k
    assert res[0.5]["seg"] == res[0.45]["seg"]
