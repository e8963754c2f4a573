"""Pseudo-label helpers (METHOD.md §4, 7) against slow loop versions written from METHOD.md's text."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wetr import cam as C
from wetr.par import PAR


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _labels(b, k, seed=0):
    """(B, K) 0/1 with at least one present class per image and at least one absent one."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(b, k, generator=g) < 0.4).float()
    y[:, 0] = 1
    y[:, -1] = 0
    return y


def minmax_loop(maps):
    out = maps.clone()
    for b in range(maps.shape[0]):
        for k in range(maps.shape[1]):
            m = maps[b, k] - maps[b, k].min()
            out[b, k] = m / (m.max() + 1e-5)
    return out


def cam_to_label_loop(cam, y, bkg, high, low, ignore_mid):
    b, k, h, w = cam.shape
    label = torch.zeros(b, h, w, dtype=torch.long)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                scores = [float(cam[bi, c, i, j] * y[bi, c]) for c in range(k)]
                value = max(scores)
                lab = scores.index(value) + 1
                if ignore_mid:
                    lab = 0 if value <= low else (255 if value <= high else lab)
                elif value <= bkg:
                    lab = 0
                label[bi, i, j] = lab
    return label


# ---------------------------------------------------------------- normalisation, LAM, fused maps

def test_minmax_normalise_matches_loop():
    maps = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    got = C.minmax_normalise(maps)
    torch.testing.assert_close(got, minmax_loop(maps))
    assert got.min() >= 0 and got.max() < 1


def test_lam_matches_loop():
    tokens = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pmap = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            for y in range(4):
                for x in range(5):
                    want[b, k, y, x] = sum(tokens[b, k, d] * pmap[b, d, y, x] for d in range(6))
    torch.testing.assert_close(C.lam(tokens, pmap), want)


def test_fused_map_and_maps_to_label():
    lam_n, cam_n = _rand(2, 4, 6, 5, seed=1), _rand(2, 4, 6, 5, seed=2)
    fused = C.fused_map(lam_n, cam_n)
    torch.testing.assert_close(fused, minmax_loop(lam_n * cam_n))
    y = _labels(2, 4)
    want = cam_to_label_loop(fused, y, 0.5, 0.7, 0.25, ignore_mid=False)
    assert torch.equal(C.maps_to_label(fused, y), want)


# ---------------------------------------------------------------- cam_to_label

@pytest.mark.parametrize("ignore_mid", [True, False])
def test_cam_to_label_matches_loop(ignore_mid):
    cam, y = _rand(3, 4, 6, 7, seed=3), _labels(3, 4, seed=3)
    thresholds = dict(bkg=0.45, high=0.6, low=0.3)
    got = C.cam_to_label(cam, y, ignore_mid=ignore_mid, **thresholds)
    assert got.dtype == torch.long and got.shape == (3, 6, 7)
    assert torch.equal(got, cam_to_label_loop(cam, y, ignore_mid=ignore_mid, **thresholds))
    if ignore_mid:
        assert {0, 255} <= set(got.unique().tolist())


def test_cam_to_label_default_thresholds():
    cam, y = _rand(2, 3, 5, 5, seed=4), _labels(2, 3, seed=4)
    assert torch.equal(C.cam_to_label(cam, y), cam_to_label_loop(cam, y, 0.5, 0.7, 0.25, True))


class ReferenceContract(nn.Module):
    """Only the reference network's contract, `forward(x, cam_only=True) -> (aux_cam, cam)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, cam_only=False):
        assert cam_only
        cam, aux_cam = self.model.cams(x)
        return aux_cam, cam


def test_multi_scale_cam_takes_more_and_the_reference_network_alike(monkeypatch):
    """On a MoRe the CAM passes are `model.cams` (-> (cam, aux_cam)), never its forward; a
    network with only the reference's contract gives the same maps (METHOD.md §11)."""
    from wetr import build_model
    torch.manual_seed(0)
    model = build_model(4, embed_dim=32, depth=2, num_heads=4, aux_layer=0).eval()
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    want = C.multi_scale_cam(ReferenceContract(model), images, (1.0, 0.5))
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("forward called"))
    got = C.multi_scale_cam(model, images, (1.0, 0.5))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.allclose(got[0], got[1])


# ---------------------------------------------------------------- denormalisation

def test_denormalise_truncates_like_uint8():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6)).clamp(-2, 2)
    mean, std = C.IMAGENET_MEAN_255, C.IMAGENET_STD_255
    want = torch.zeros_like(x)
    want255 = torch.zeros_like(x)
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    v = float(x[b, c, i, j]) * std[c] + mean[c]
                    want255[b, c, i, j] = v
                    want[b, c, i, j] = min(max(int(v), 0), 255) / 255.0
    torch.testing.assert_close(C.denormalise_255(x), want255)
    torch.testing.assert_close(C.denormalise(x), want, rtol=0, atol=1e-6)
    levels = C.denormalise(x) * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- multi_scale_cam

class FakeCamModel(nn.Module):
    """cam_only forward: fixed 3x3 convs on a 16x average-pooled input -> (aux_cam, cam)."""

    def __init__(self, k: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.cam = nn.Conv2d(3, k, 3, padding=1)
        self.aux = nn.Conv2d(3, k, 3, padding=1)
        for conv in (self.cam, self.aux):
            conv.weight.data = torch.randn(conv.weight.shape, generator=g)
            conv.bias.data = torch.randn(conv.bias.shape, generator=g) * 0.5
        self.batch_sizes = []

    def forward(self, x, cam_only=False):
        assert cam_only
        self.batch_sizes.append(x.shape[0])
        t = F.avg_pool2d(x, 16)
        return self.aux(t), self.cam(t)


def multi_scale_cam_loop(model, images, scales):
    """Every image, scale and flip separately; scale 1.0 first, as the reference."""
    b, _, h, w = images.shape
    order = [1.0] + [s for s in scales if s != 1.0]
    cam_sum = aux_sum = 0
    for s in order:
        cams, auxs = [], []
        for i in range(b):
            x = F.interpolate(images[i:i + 1], size=(int(s * h), int(s * w)), mode="bilinear",
                              align_corners=False)
            per_view = []
            for flip in (False, True):
                aux, cam = model(x.flip(-1) if flip else x, cam_only=True)
                aux = F.interpolate(aux, size=(h, w), mode="bilinear", align_corners=False)
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
                per_view.append((aux.flip(-1), cam.flip(-1)) if flip else (aux, cam))
            (a0, c0), (a1, c1) = per_view
            cams.append(torch.where(c0 > c1, c0, c1).clamp(min=0))
            auxs.append(torch.where(a0 > a1, a0, a1).clamp(min=0))
        cam_sum = cam_sum + torch.cat(cams)
        aux_sum = aux_sum + torch.cat(auxs)
    return minmax_loop(cam_sum), minmax_loop(aux_sum)


@pytest.mark.parametrize("scales", [(1.0, 0.5, 0.75, 1.5), (0.5, 1.25)])
def test_multi_scale_cam_matches_loop(scales):
    model = FakeCamModel()
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(8))
    cam, aux = C.multi_scale_cam(model, images, scales)
    n_scales = len({1.0, *scales})
    assert model.batch_sizes == [4] * n_scales  # one forward per scale, image + flip together
    want_cam, want_aux = multi_scale_cam_loop(model, images, scales)
    assert cam.shape == aux.shape == (2, 3, 48, 64)
    torch.testing.assert_close(cam, want_cam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-6)
    assert not cam.requires_grad
    assert not torch.allclose(cam, aux)


@pytest.mark.parametrize("scales", [(1.0, 0.5, 0.75, 1.5), (0.5, 1.25)])
def test_multi_scale_cam_reuses_the_given_scale_one_maps(scales):
    model = FakeCamModel()
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(8))
    first = model(images, cam_only=True)[::-1]  # (cam, aux_cam), the order of model.cams
    model.batch_sizes.clear()
    cam, aux = C.multi_scale_cam(model, images, scales, first=first)
    # scale 1.0: only the flipped images go through the model; every other scale: image + flip
    assert model.batch_sizes == [2] + [4] * (len({1.0, *scales}) - 1)
    want_cam, want_aux = multi_scale_cam_loop(model, images, scales)
    torch.testing.assert_close(cam, want_cam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-6)
    # the given maps are used, not recomputed: other maps give another result
    other = C.multi_scale_cam(model, images, scales, first=(first[0] * 0, first[1] * 0))[0]
    assert not torch.allclose(other, cam)


# ---------------------------------------------------------------- refine_label

def refine_label_loop(par, images, cam, y, high, low):
    """Per image, only background + present classes, as METHOD.md's text describes."""
    b, k, h, w = cam.shape
    half = (h // 2, w // 2)
    small_images = F.interpolate(images, size=half, mode="bilinear", align_corners=False)
    out = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):
        keys = [0] + [c + 1 for c in range(k) if y[i, c] != 0]
        labels = []
        for thre in (high, low):
            stack = torch.cat([torch.full((1, 1, h, w), thre), cam[i:i + 1]], dim=1)
            stack = F.interpolate(stack, size=half, mode="bilinear", align_corners=False)
            probs = stack[:, keys].softmax(dim=1)
            refined = F.interpolate(par(small_images[i:i + 1], probs), size=(h, w), mode="bilinear",
                                    align_corners=False)
            labels.append(torch.tensor(keys)[refined[0].argmax(dim=0)])
        lab_h, lab_l = labels
        for r in range(h):
            for c in range(w):
                if int(lab_h[r, c]) + int(lab_l[r, c]) == 0:
                    out[i, r, c] = 0
                elif int(lab_h[r, c]) == 0:
                    out[i, r, c] = 255
                else:
                    out[i, r, c] = lab_h[r, c]
    return out


@pytest.mark.parametrize("size,par_kwargs", [((20, 26), dict(num_iter=3, dilations=(1, 2))),
                                             ((21, 27), dict())])
def test_refine_label_matches_per_image_loop(size, par_kwargs):
    b, k = 3, 4
    y = _labels(b, k, seed=9)
    y[2] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    images = _rand(b, 3, *size, seed=10)
    # Smooth CAMs (upsampled from a coarse grid) so all label kinds occur.
    cam = F.interpolate(_rand(b, k, 4, 5, seed=11) ** 2, size=size, mode="bilinear", align_corners=False)
    cam = cam * y[:, :, None, None]
    par = PAR(**par_kwargs)
    got = C.refine_label(par, images, cam, y, high=0.7, low=0.25)
    want = refine_label_loop(par, images, cam, y, 0.7, 0.25)
    assert got.dtype == torch.long and got.shape == (b, *size)
    assert torch.equal(got, want)
    values = set(got.unique().tolist())
    assert {0, 255} <= values and len(values - {0, 255}) >= 2
    assert values <= {0, 255} | {c + 1 for c in range(k) if y[:, c].any()}
