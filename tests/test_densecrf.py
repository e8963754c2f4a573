"""DenseCRF in PyTorch (wetr.densecrf): the mean-field update against a slow loop reference,
the sparse lattice filter, batching, the backend choice, and agreement with pydensecrf2."""
import sys

import cv2
import numpy as np
import pytest
import torch

from datasets.synthetic import render
from utils import crf
from utils.crf import CRFParams
from wetr import densecrf
from wetr.infer import seed_crf_stack
from wetr.permutohedral import PermutohedralLattice

NO_PYDENSECRF = "pydensecrf2 not installed (optional; the torch backend needs none)"


def exact_filter(features):
    """Dense Gaussian sum, self term included: (B, N, C) -> sum_j exp(-|f_i - f_j|^2/2) v_j."""
    k = torch.exp(-0.5 * torch.cdist(features, features).square())
    return lambda v: k.to(v.dtype) @ v


def loop_mean_field(image, probs, params):
    """Obviously-correct DenseCRF2D mean field with exact Gaussian kernels, pixel by pixel.

    image (H, W, 3) uint8, probs (C, H, W) -> (C, H, W) float64 marginals."""
    C, H, W = probs.shape
    N = H * W
    u = -np.log(np.clip(probs.reshape(C, N).astype(np.float64), 1e-5, 1.0))
    ys, xs = np.divmod(np.arange(N), W)
    rgb = image.reshape(N, 3).astype(np.float64)
    kernels = []
    for w, f in ((params.pos_w, np.stack([xs / params.pos_xy_std, ys / params.pos_xy_std], 1)),
                 (params.bi_w, np.concatenate([np.stack([xs, ys], 1) / params.bi_xy_std,
                                               rgb / params.bi_rgb_std], 1))):
        k = np.array([[np.exp(-0.5 * np.sum((f[i] - f[j]) ** 2)) for j in range(N)]
                      for i in range(N)])
        norm = np.array([1.0 / np.sqrt(sum(k[i]) + 1e-20) for i in range(N)])
        kernels.append((w, k, norm))

    def normalise(e):
        q = np.exp(e - e.max(0))
        return q / q.sum(0)

    q = normalise(-u)
    for _ in range(params.iter_max):
        e = -u.copy()
        for i in range(N):
            for w, k, norm in kernels:
                for c in range(C):
                    e[c, i] += w * norm[i] * sum(k[i, j] * norm[j] * q[c, j] for j in range(N))
        q = normalise(e)
    return q.reshape(C, H, W)


def test_dense_crf_equals_loop_reference_with_exact_kernels(monkeypatch):
    """Everything but the lattice (features, normalisation, Potts weights, update, layout) is
    exact: with the lattice replaced by the exact Gaussian sum it equals the loop."""
    class ExactLattice:  # PermutohedralLattice's interface, with the exact Gaussian sum
        def __init__(self, features):
            self.sparse_filter = exact_filter(features.double())

        def sparse_operator(self, scale):
            return lambda v: scale[..., None] * self.sparse_filter(scale[..., None] * v)

    monkeypatch.setattr(densecrf, "PermutohedralLattice", ExactLattice)
    densecrf._gaussian_kernel.cache_clear()
    rng = np.random.default_rng(0)
    params = CRFParams(iter_max=3, pos_xy_std=1.5, bi_xy_std=3.0, bi_rgb_std=40.0)
    image = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), (2, 5, 6)).transpose(0, 3, 1, 2)
    probs[0, 0, 0, 0] = 1e-7  # the 1e-5 clip
    try:
        q = densecrf.dense_crf(torch.from_numpy(image), torch.from_numpy(probs), params)
    finally:
        densecrf._gaussian_kernel.cache_clear()
    for b in range(2):
        ref = loop_mean_field(image[b], probs[b], params)
        assert np.abs(q[b].numpy() - ref).max() < 2e-5
    assert np.abs(q.numpy() - probs).max() > 0.05  # the pairwise terms did act


def test_sparse_filter_equals_filter():
    gen = torch.Generator().manual_seed(0)
    for d, n in ((2, 37), (5, 64)):
        feats = torch.rand(2, n, d, generator=gen) * 4
        values = torch.rand(2, n, 3, generator=gen)
        lattice = PermutohedralLattice(feats)
        ref = lattice.filter(values)
        assert torch.allclose(lattice.sparse_filter(values), ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(lattice.sparse_filter(2 * values), 2 * ref, rtol=1e-5, atol=1e-6)
        scale = torch.rand(2, n, generator=gen)
        scaled = scale[..., None] * lattice.filter(scale[..., None] * values)
        assert torch.allclose(lattice.sparse_operator(scale)(values), scaled, rtol=1e-5, atol=1e-6)


def test_batch_equals_one_image_at_a_time():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (2, 13, 11, 3), dtype=np.uint8))
    probs = torch.from_numpy(rng.dirichlet(np.ones(4), (2, 13, 11)).astype(np.float32))
    probs = probs.permute(0, 3, 1, 2)
    q = densecrf.dense_crf(image, probs)
    for b in range(2):
        assert torch.allclose(q[b:b + 1], densecrf.dense_crf(image[b:b + 1], probs[b:b + 1]),
                              atol=1e-6)


def test_backend_choice_and_torch_route_without_pydensecrf(monkeypatch):
    assert densecrf.resolve_backend("torch", "cpu") == "torch"
    assert densecrf.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="crf_backend='cuda' is not one of auto|torch|pydensecrf"):
        densecrf.resolve_backend("cuda", "cpu")
    installed = densecrf.pydensecrf_installed()
    assert densecrf.resolve_backend("auto", "cpu") == ("pydensecrf" if installed else "torch")
    if installed:
        assert densecrf.resolve_backend("pydensecrf", "cuda") == "pydensecrf"
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert densecrf.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(crf.CRFMissingError, match="pip install pydensecrf2"):
        densecrf.resolve_backend("pydensecrf", "cuda")
    image, probs, truth = _two_regions()
    keys = np.array([0, 7])
    label = densecrf.crf_label(image, probs, keys)
    assert label.dtype == np.uint8 and label.shape == truth.shape
    assert (label == keys[truth]).mean() > 0.99 > (keys[probs.argmax(0)] == keys[truth]).mean()
    empty = densecrf.crf_label(image, probs[:0], keys[:0])
    assert empty.shape == truth.shape and not empty.any()
    with pytest.raises(RuntimeError, match="pydensecrf2"):
        crf.crf_label(image, probs, keys)


def _two_regions():
    """Two flat colour regions and a noisy two-class stack wrong on ~25 % of the pixels."""
    rng = np.random.default_rng(0)
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, :16], image[:, 16:] = (40, 60, 200), (220, 200, 30)
    truth = np.zeros((24, 32), dtype=np.int64)
    truth[:, 16:] = 1
    p1 = np.clip(np.where(truth == 1, 0.7, 0.3) + rng.normal(0, 0.25, truth.shape), 0.02, 0.98)
    return image, np.stack([1 - p1, p1]).astype(np.float32), truth


# --- agreement with pydensecrf2 (the contract) ---

def natural_image(rng, h, w, classes):
    """Smooth shapes over a smooth background, blurred, plus pixel noise: (h, w, 3) uint8 and
    the label (h, w) with values in 0..classes-1."""
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):  # smooth colour gradient background
        img[..., c] = rng.uniform(0, 255) + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
    label = np.zeros((h, w), np.int64)
    for _ in range(7):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.3) * min(h, w)
        mask = ((xx - cx) / r) ** 2 + ((yy - cy) / (r * rng.uniform(0.5, 1.5))) ** 2 < 1
        img[mask] = rng.uniform(0, 255, 3)
        label[mask] = rng.integers(1, classes)
    img = cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _low_res(rng, label, channels, stride, strength):
    """(channels, H, W) smooth scores: noise at 1/stride resolution plus the one-hot label,
    both brought to full size bilinearly (as network maps are)."""
    h, w = label.shape
    small = (max(w // stride, 2), max(h // stride, 2))
    onehot = np.stack([cv2.resize((label == c).astype(np.float32), small, interpolation=cv2.INTER_AREA)
                       for c in range(channels)])
    scores = rng.normal(0, 1, onehot.shape).astype(np.float32) + strength * onehot
    return np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR) for s in scores])


def probability_stacks(rng, label, channels):
    """The three stacks the tools pass to the CRF: CAM seeds and LAM seeds (min-max normalised
    maps of the present classes through wetr.infer.seed_crf_stack) and a segmentation softmax.
    -> {name: (probs (C', H, W) float32, keys (C',))}."""
    present = torch.zeros(1, channels - 1)
    present[0, [int(c) - 1 for c in np.unique(label) if 0 < c < channels]] = 1
    stacks = {}
    for name, stride, strength in (("cam", 16, 2.5), ("lam", 4, 3.0)):
        maps = torch.from_numpy(_low_res(rng, label, channels, stride, strength)[1:]).relu()
        lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
        probs, keys = seed_crf_stack(((maps - lo) / (hi - lo + 1e-5))[None], present)
        stacks[name] = (probs.numpy().astype(np.float32), keys)
    logits = torch.from_numpy(_low_res(rng, label, channels, 8, 3.0))
    stacks["seg"] = (logits.softmax(0).numpy(), np.arange(channels))
    return stacks


def miou(pred, gt, classes):
    valid = gt != 255
    ious = [((pred == c) & (gt == c) & valid).sum() / (((pred == c) | (gt == c)) & valid).sum()
            for c in range(classes) if (gt[valid] == c).any()]
    return 100 * float(np.mean(ious))


def check_agreement(image, label, stacks, classes):
    for name, (probs, keys) in stacks.items():
        ref = crf.crf_label(image, probs, keys)
        ours = densecrf.crf_label(image, probs, keys)
        agreement = (ours == ref).mean()
        assert agreement >= 0.999, (name, agreement)
        assert abs(miou(ours, label, classes) - miou(ref, label, classes)) <= 0.1, name
        assert (ref != keys[probs.argmax(0)]).mean() > 0.005, name  # the CRF changed labels


def test_agreement_with_pydensecrf_on_demo_like_images():
    pytest.importorskip("pydensecrf", reason=NO_PYDENSECRF)
    rng = np.random.default_rng(0)
    for _ in range(4):
        image, label = render(rng, 4, 128)
        check_agreement(image, label, probability_stacks(rng, label, 5), 5)


def test_agreement_with_pydensecrf_at_voc_size():
    """One 500 x 375 image (each large image costs ~10 s on a loaded 2-core CPU)."""
    pytest.importorskip("pydensecrf", reason=NO_PYDENSECRF)
    rng = np.random.default_rng(375)
    classes = 21
    image, label = natural_image(rng, 375, 500, classes)
    check_agreement(image, label, probability_stacks(rng, label, classes), classes)
