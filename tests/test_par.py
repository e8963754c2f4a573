"""PAR (METHOD.md §4) against a per-pixel, per-neighbour loop written from METHOD.md's text."""
import math

import pytest
import torch
import torch.nn.functional as F

from wetr.par import PAR

RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _resize_align_corners(m: list, out_h: int, out_w: int) -> list:
    """Bilinear resize with align_corners=True of one (h, w) nested list."""
    h, w = len(m), len(m[0])
    out = [[0.0] * out_w for _ in range(out_h)]
    for y in range(out_h):
        sy = y * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(math.floor(sy)), h - 1)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for x in range(out_w):
            sx = x * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(math.floor(sx)), w - 1)
            x1, lx = min(x0 + 1, w - 1), sx - x0
            out[y][x] = ((1 - ly) * ((1 - lx) * m[y0][x0] + lx * m[y0][x1])
                         + ly * ((1 - lx) * m[y1][x0] + lx * m[y1][x1]))
    return out


def _softmax(v: list) -> list:
    top = max(v)
    e = [math.exp(a - top) for a in v]
    s = sum(e)
    return [a / s for a in e]


def _std(v: list) -> float:
    mean = sum(v) / len(v)
    return math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))


def par_loop(images: torch.Tensor, masks: torch.Tensor, dilations, num_iter, w1=0.3, w2=0.01):
    """Slow PAR: images (B, 3, H, W), masks (B, C, h, w) -> (B, C, H, W) float64."""
    b, c3, hh, ww = images.shape
    offs = [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0))
            for d in dilations for dy, dx in RING]
    dist = [o[2] for o in offs]
    pos = _softmax([-(dd / (_std(dist) + 1e-8) / w1) ** 2 for dd in dist])
    out = torch.zeros(b, masks.shape[1], hh, ww, dtype=torch.float64)
    for bi in range(b):
        img = images[bi].double().tolist()
        m = [_resize_align_corners(ch, hh, ww) for ch in masks[bi].double().tolist()]
        aff = {}
        for y in range(hh):
            for x in range(ww):
                nbr = [(min(max(y + dy, 0), hh - 1), min(max(x + dx, 0), ww - 1)) for dy, dx, _ in offs]
                img_aff = [0.0] * len(offs)
                for c in range(c3):
                    vals = [img[c][yy][xx] for yy, xx in nbr]
                    sd = _std(vals)
                    for n, v in enumerate(vals):
                        img_aff[n] += -(abs(v - img[c][y][x]) / (sd + 1e-8) / w1) ** 2 / c3
                sm = _softmax(img_aff)
                aff[y, x] = [(nbr[n], sm[n] + w2 * pos[n]) for n in range(len(offs))]
        for _ in range(num_iter):
            m = [[[sum(ch[yy][xx] * a for (yy, xx), a in aff[y, x]) for x in range(ww)]
                  for y in range(hh)] for ch in m]
        out[bi] = torch.tensor(m, dtype=torch.float64)
    return out


@pytest.mark.parametrize("dilations", [(1, 2), (1, 12)])  # 12 > image size: clamped borders
def test_par_matches_loop_float64(dilations):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    masks = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    par = PAR(num_iter=2, dilations=dilations).double()
    got = par(images, masks)
    want = par_loop(images, masks, dilations, num_iter=2)
    assert got.shape == (2, 3, 9, 11)
    # The position prior is a float32 constant (as in the reference), hence ~1e-9 differences.
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_par_float32_and_custom_weights():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 8, 7, generator=g)
    masks = torch.rand(1, 2, 8, 7, generator=g)
    par = PAR(num_iter=3, dilations=(1, 3), w1=0.5, w2=0.1)
    want = par_loop(images, masks, (1, 3), num_iter=3, w1=0.5, w2=0.1)
    torch.testing.assert_close(par(images, masks).double(), want, rtol=1e-5, atol=1e-6)


def test_par_default_config_and_buffers():
    par = PAR()
    assert par.num_iter == 10 and par.dilations == (1, 2, 4, 8, 12, 24)
    buffers = dict(par.named_buffers())
    assert buffers["pos_weight"].shape == (48, 1, 1)
    assert par.double().pos_weight.dtype == torch.float64  # buffers follow .to()
    assert par.state_dict() == {}  # constants, not checkpoint state


def test_par_is_channelwise_linear():
    """refine_label relies on this: channels do not interact, zero channels stay zero."""
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 12, 10, generator=g)
    masks = torch.rand(2, 4, 12, 10, generator=g)
    par = PAR(num_iter=4, dilations=(1, 2, 4))
    full = par(images, masks)
    torch.testing.assert_close(par(images, masks[:, [2]]), full[:, [2]])
    zeroed = masks.clone()
    zeroed[:, 1] = 0
    out = par(images, zeroed)
    assert (out[:, 1] == 0).all()
    torch.testing.assert_close(out[:, [0, 2, 3]], full[:, [0, 2, 3]])


def par_views_loop(par: PAR, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The default form written out: per iteration, n multiply-adds of replicate-padded shifted
    views."""
    masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
    aff = par.affinity(images).unsqueeze(1)
    for _ in range(par.num_iter):
        views = par._neighbours(masks)
        out = views[0] * aff[:, :, 0]
        for i in range(1, len(views)):
            out = out.addcmul_(views[i], aff[:, :, i])
        masks = out
    return masks


@pytest.mark.parametrize("shape,dilations", [
    ((1, 2, 5, 7), (1, 2, 4, 8, 12, 24)),  # every dilation past 2 is larger than the image
    ((2, 3, 16, 20), (1, 2, 4, 8, 12, 24)),
    ((3, 1, 9, 4), (1, 3, 30)),
    ((2, 5, 12, 12), (2,)),
])
def test_sparse_propagation_equals_views_loop(shape, dilations):
    b, c, h, w = shape
    g = torch.Generator().manual_seed(h * w + c)
    images = torch.rand(b, 3, h, w, generator=g)
    masks = torch.rand(b, c, (h + 1) // 2, (w + 1) // 2, generator=g)
    par = PAR(num_iter=10, dilations=dilations, sparse=True)
    got, want = par(images, masks), par_views_loop(par, images, masks)
    assert torch.equal(PAR(num_iter=10, dilations=dilations)(images, masks), want)  # default
    assert got.shape == want.shape == (b, c, h, w) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got64 = par.double()(images.double(), masks.double())
    torch.testing.assert_close(got64, par_views_loop(par, images.double(), masks.double()),
                               rtol=1e-12, atol=1e-14)


def test_neighbour_index_is_clamped_offset():
    par = PAR(dilations=(1, 5))
    h, w = 4, 6
    index = par.neighbour_index(h, w, torch.device("cpu"))
    assert index.shape == (16, h * w)
    for i, (dy, dx) in enumerate(par.offsets):
        for y in range(h):
            for x in range(w):
                yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                assert index[i, y * w + x] == yy * w + xx
