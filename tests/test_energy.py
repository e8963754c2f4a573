"""Dense energy loss (METHOD.md §5 "reg"): lattice, exact filter, loss value and gradient.

The slow references here are per-point Python loops (a dict as the lattice hash table, a double
loop for the Gaussian sum); pydensecrf, which shares the reference's lattice, is a second
reference when installed.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wetr.energy import (
    bilateral_features,
    bilateral_filter,
    dense_energy_loss,
    exact_gaussian_filter,
)
from wetr.permutohedral import _EMPTY, _hash, permutohedral_filter

f32 = np.float32


def loop_lattice(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Permutohedral lattice one point at a time, as Kraehenbuehl's C++ (SSE build).

    features (N, d), values (N, C) -> (N, C). Coordinates in float32 like the C++; the SSE
    build pads the points to a multiple of 4 with zero features, so this does too.
    """
    N, d = features.shape
    feats = [features[i].astype(f32) for i in range(N)]
    vals = [values[i].astype(np.float64) for i in range(N)]
    while len(feats) % 4:
        feats.append(np.zeros(d, f32))
        vals.append(np.zeros(values.shape[1]))
    inv_std = f32(math.sqrt(2 / 3) * (d + 1))
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    down = f32(1) / f32(d + 1)
    table, points = {}, []
    for f in feats:
        elevated, sm = [f32(0)] * (d + 1), f32(0)
        for j in range(d, 0, -1):
            cf = f32(f[j - 1] * scale[j - 1])
            elevated[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        elevated[0] = sm
        rem0, total = [], 0
        for e in elevated:
            rd = int(np.round(f32(down * e)))  # half to even, as SSE
            rem0.append(rd * (d + 1))
            total += rd
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if f32(elevated[i] - rem0[i]) < f32(elevated[j] - rem0[j]):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        bary = [f32(0)] * (d + 2)
        for i in range(d + 1):
            v = f32(f32(elevated[i] - rem0[i]) * down)
            bary[d - rank[i]] = f32(bary[d - rank[i]] + v)
            bary[d - rank[i] + 1] = f32(bary[d - rank[i] + 1] - v)
        bary[0] = f32(bary[0] + f32(1 + bary[d + 1]))
        vertices = []
        for r in range(d + 1):
            key = tuple(rem0[i] + (r if rank[i] <= d - r else r - (d + 1)) for i in range(d))
            table.setdefault(key, len(table))
            vertices.append((key, float(bary[r])))
        points.append(vertices)
    lattice = {key: np.zeros(values.shape[1]) for key in table}
    for vertices, v in zip(points, vals):
        for key, w in vertices:
            lattice[key] = lattice[key] + w * v
    for j in range(d + 1):
        blurred = {}
        for key, v in lattice.items():
            n1 = tuple(key[k] + (d if k == j else -1) for k in range(d))
            n2 = tuple(key[k] + (-d if k == j else 1) for k in range(d))
            zero = np.zeros_like(v)
            blurred[key] = v + 0.5 * (lattice.get(n1, zero) + lattice.get(n2, zero))
        lattice = blurred
    alpha = 1 / (1 + 2.0**-d)
    out = [sum(w * alpha * lattice[key] for key, w in vertices) for vertices in points]
    return np.stack(out)[:N]


def loop_gaussian_sum(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """O(N^2) exact sum_j exp(-|f_i - f_j|^2 / 2) v_j, one output point at a time."""
    out = np.zeros(values.shape, dtype=np.float64)
    for i in range(features.shape[0]):
        w = np.exp(-0.5 * ((features[i] - features) ** 2).sum(1))
        out[i] = w @ values
    return out


def smooth_images(B: int, H: int, W: int, seed: int) -> torch.Tensor:
    """(B, 3, H, W) in 0..255: bicubic upsampling of a coarse random grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, 4, 4, generator=g) * 255
    return F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 255)


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("B,N,d,C", [(2, 72, 5, 3), (2, 30, 5, 2), (1, 45, 2, 1), (3, 17, 3, 4)])
def test_lattice_matches_loop(B, N, d, C, fixed):
    g = torch.Generator().manual_seed(N)
    feats = torch.rand(B, N, d, generator=g) * 3
    vals = torch.rand(B, N, C, generator=g, dtype=torch.float64)
    out = permutohedral_filter(feats, vals, fixed_capacity=fixed)
    ref = np.stack([loop_lattice(feats[b].numpy(), vals[b].numpy()) for b in range(B)])
    assert out.shape == (B, N, C) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_lattice_on_image_features_matches_loop():
    images = smooth_images(1, 8, 9, seed=3)
    feats = bilateral_features(images, 15.0, 50.0)
    vals = torch.softmax(torch.randn(1, 72, 3, generator=torch.Generator().manual_seed(0)), -1)
    out = permutohedral_filter(feats, vals)
    ref = loop_lattice(feats[0].numpy(), vals[0].numpy())
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_fixed_capacity_hash_equals_unique():
    g = torch.Generator().manual_seed(4)
    code = torch.randint(0, 50, (300,), generator=g) * 7919 + 2**40  # many repeats, large keys
    table, vertex, valid = _hash(code, fixed_capacity=True)
    want_table, want_vertex = torch.unique(code, sorted=True, return_inverse=True)
    m = want_table.numel()
    assert table.shape == vertex.shape == valid.shape == (300,) and int(valid.sum()) == m
    assert valid[:m].all() and torch.equal(table[:m], want_table) and (table[m:] == _EMPTY).all()
    assert torch.equal(vertex, want_vertex) and torch.equal(table[vertex], code)


@pytest.mark.parametrize("B,N,C", [(2, 200, 3), (1, 37, 21)])
def test_fixed_capacity_lattice_equals_unique_lattice(B, N, C):
    """Same table rows, same scatter order: equal bit for bit on the CPU."""
    images = smooth_images(B, 10, N // 10, seed=N) + torch.rand(B, 3, 10, N // 10) * 30
    feats = bilateral_features(images, 15.0, 50.0)
    vals = torch.rand(B, feats.shape[1], C, generator=torch.Generator().manual_seed(N))
    assert torch.equal(permutohedral_filter(feats, vals, fixed_capacity=True),
                       permutohedral_filter(feats, vals, fixed_capacity=False))


def test_fixed_capacity_lattice_has_no_data_dependent_shapes():
    """Traced whole (fullgraph) only if no size depends on tensor values: no unique, nonzero or
    .item(), so no device->host sync. The torch.unique form is the control that must fail."""
    g = torch.Generator().manual_seed(5)
    feats, vals = torch.rand(2, 37, 5, generator=g) * 3, torch.rand(2, 37, 3, generator=g)

    def traced(fixed):
        fn = torch.compile(lambda f, v: permutohedral_filter(f, v, fixed_capacity=fixed),
                           fullgraph=True, backend="eager", dynamic=False)
        return fn(feats, vals)

    torch._dynamo.reset()
    torch.testing.assert_close(traced(True), permutohedral_filter(feats, vals), rtol=0, atol=0)
    with pytest.raises(Exception, match="data-dependent"):
        traced(False)
    torch._dynamo.reset()


def test_lattice_batch_images_do_not_mix():
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(3, 40, 5, generator=g) * 2  # overlapping feature ranges
    vals = torch.rand(3, 40, 2, generator=g)
    together = permutohedral_filter(feats, vals)
    alone = torch.cat([permutohedral_filter(feats[b : b + 1], vals[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H,W", [(6, 8), (5, 7), (12, 12)])  # 35 points: SSE padding point
def test_lattice_matches_pydensecrf(H, W):
    """pydensecrf's DenseCRF uses the same lattice. With Potts compat 1, no normalisation and
    one mean-field step, log Q1 = -U + A Q0 - const, so A (Q0_a - Q0_b) is recoverable."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    g = torch.Generator().manual_seed(H * W)
    images = torch.rand(1, 3, H, W, generator=g) * 255
    q0 = torch.softmax(torch.randn(1, 3, H, W, generator=g), 1)
    feats = bilateral_features(images, 15.0, 5.0)[0].numpy()
    n = H * W
    q0_np = q0[0].reshape(3, n).numpy()
    crf = dcrf.DenseCRF(n, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(q0_np)))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(feats.T), compat=1.0, kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NO_NORMALIZATION,
    )
    q1 = np.array(crf.inference(1)).reshape(3, n)
    recovered = np.log(q1[0] / q1[2]) - np.log(q0_np[0] / q0_np[2])
    out = bilateral_filter(images, q0.double(), 15.0, 5.0)[0].reshape(3, n).numpy()
    tol = 2e-5 * np.abs(recovered).max() + 1e-6
    np.testing.assert_allclose(out[0] - out[2], recovered, atol=tol)


def test_features_order_and_scaling():
    images = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    feats = bilateral_features(images, 2.0, 4.0)
    for b in range(2):
        for y in range(2):
            for x in range(3):
                expected = [x / 4.0, y / 4.0] + [images[b, c, y, x].item() / 2.0 for c in range(3)]
                assert feats[b, y * 3 + x].tolist() == pytest.approx(expected)


def test_exact_filter_equals_dense_sum():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 90, 5, generator=g, dtype=torch.float64) * 4
    vals = torch.rand(2, 90, 3, generator=g, dtype=torch.float64)
    ref = np.stack([loop_gaussian_sum(feats[b].numpy(), vals[b].numpy()) for b in range(2)])
    np.testing.assert_allclose(exact_gaussian_filter(feats, vals).numpy(), ref, rtol=1e-5)
    # float32 with image-sized feature magnitudes (rgb / 15 up to 17)
    feats32 = bilateral_features(smooth_images(1, 10, 9, seed=5), 15.0, 50.0)
    vals32 = torch.rand(1, 90, 4, generator=g)
    ref32 = loop_gaussian_sum(feats32[0].double().numpy(), vals32[0].double().numpy())
    np.testing.assert_allclose(exact_gaussian_filter(feats32, vals32)[0].numpy(), ref32, rtol=1e-4)


def test_bilateral_exact_scale():
    images = smooth_images(1, 6, 7, seed=2)
    vals = torch.rand(1, 2, 6, 7, dtype=torch.float64)
    one = bilateral_filter(images, vals, 15.0, 50.0, method="exact", exact_scale=1.0)
    scaled = bilateral_filter(images, vals, 15.0, 50.0, "exact", 0.58)
    torch.testing.assert_close(scaled, 0.58 * one)
    with pytest.raises(ValueError):
        bilateral_filter(images, vals, 15.0, 50.0, method="gaussian")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lattice_to_exact_ratio_on_smooth_images(seed):
    images = smooth_images(1, 24, 24, seed)
    g = torch.Generator().manual_seed(seed)
    seg = torch.softmax(F.interpolate(torch.randn(1, 4, 3, 3, generator=g) * 3, size=(24, 24),
                                      mode="bilinear", align_corners=False), 1)
    lattice = bilateral_filter(images, seg, 15.0, 50.0, "permutohedral")
    exact = bilateral_filter(images, seg, 15.0, 50.0, "exact", exact_scale=1.0)
    assert 0.4 < (lattice.sum() / exact.sum()).item() < 0.7


def loop_downscale(images, probs, label):
    """Exact 0.5 downscale for even sizes: nearest = top-left pixel of each 2x2 block (as
    F.interpolate's floor(dst * 2)); bilinear with align_corners=False = mean of the block."""
    B, C, H, W = probs.shape
    h, w = H // 2, W // 2
    img = np.zeros((B, 3, h, w))
    seg = np.zeros((B, C, h, w))
    lab = np.zeros((B, h, w), dtype=np.int64)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                img[b, :, y, x] = images[b, :, 2 * y, 2 * x]
                lab[b, y, x] = label[b, 2 * y, 2 * x]
                seg[b, :, y, x] = probs[b, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].mean((1, 2))
    return img, seg, lab


def loop_energy(images, logits, label, filter_fn, weight, sigma_rgb, sigma_xy):
    """METHOD.md §5 reg written out pixel by pixel; also returns the frozen dE/dS (reference form)."""
    images, logits, label = images.numpy(), logits.numpy(), label.numpy()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    img, seg, lab = loop_downscale(images, probs, label)
    B, C, h, w = seg.shape
    energy, coef = 0.0, np.zeros_like(seg)
    for b in range(B):
        feats = []
        for y in range(h):
            for x in range(w):
                xy = [x / (sigma_xy * 0.5), y / (sigma_xy * 0.5)]
                feats.append(xy + list(img[b, :, y, x] / sigma_rgb))
        values = seg[b].reshape(C, h * w).T
        AS = filter_fn(np.array(feats), values).T.reshape(C, h, w)
        for y in range(h):
            for x in range(w):
                gate = 1.0 if lab[b, y, x] == 255 else max(1.0 - seg[b, :, y, x].max(), 0.0)
                for k in range(C):
                    energy -= seg[b, k, y, x] * AS[k, y, x] * gate
                    coef[b, k, y, x] = -2.0 * AS[k, y, x] * gate
    return energy / B * weight, coef / B * weight


def random_inputs(B=2, C=3, H=8, W=10, seed=0, ignore_all=False):
    g = torch.Generator().manual_seed(seed)
    images = smooth_images(B, H, W, seed) + torch.rand(B, 3, H, W, generator=g) * 20
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2
    label = torch.randint(0, C, (B, H, W), generator=g)
    label[torch.rand(B, H, W, generator=g) < 0.3] = 255
    if ignore_all:
        label[:] = 255
    return images.double(), logits, label


@pytest.mark.parametrize("method", ["exact", "permutohedral"])
def test_loss_value_matches_loop(method):
    images, logits, label = random_inputs()
    weight = 1e-3
    if method == "exact":
        filter_fn = lambda f, v: 0.58 * loop_gaussian_sum(f, v)  # noqa: E731
    else:
        filter_fn = lambda f, v: loop_lattice(f.astype(f32), v)  # noqa: E731
    ref, _ = loop_energy(images, logits, label, filter_fn, weight, 15.0, 100.0)
    loss = dense_energy_loss(images, logits, label, weight=weight, filter=method)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_default_weight_and_float32():
    images, logits, label = random_inputs(seed=4)
    loss32 = dense_energy_loss(images.float(), logits.float(), label)
    loss64 = dense_energy_loss(images, logits, label, weight=1.0)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(1e-7 * loss64.item(), rel=1e-4)


@pytest.mark.parametrize("method", ["exact", "permutohedral"])
def test_gradient_is_reference_form(method):
    """The backward is -2 AS Gate / B * weight w.r.t. the downscaled S (Gate and AS frozen),
    chained through the bilinear downscale and the softmax: finite differences of
    z -> sum S(z) * coef with the loop coefficients frozen at z0 must match autograd."""
    images, logits, label = random_inputs(seed=1)
    weight = 1e-2
    if method == "exact":
        filter_fn = lambda f, v: 0.58 * loop_gaussian_sum(f, v)  # noqa: E731
    else:
        filter_fn = lambda f, v: loop_lattice(f.astype(f32), v)  # noqa: E731
    _, coef = loop_energy(images, logits, label, filter_fn, weight, 15.0, 100.0)
    z = logits.clone().requires_grad_(True)
    dense_energy_loss(images, z, label, weight=weight, filter=method).backward()

    def surrogate(x: np.ndarray) -> float:
        probs = np.exp(x) / np.exp(x).sum(1, keepdims=True)
        return float((loop_downscale(images.numpy(), probs, label.numpy())[1] * coef).sum())

    x0, eps = logits.numpy().copy(), 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (surrogate(xp) - surrogate(xm)) / (2 * eps)
    np.testing.assert_allclose(z.grad.numpy(), fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_gradient_equals_derivative_when_gate_flat_and_filter_exact():
    """With every pixel labelled 255 the Gate is 1 everywhere, and the exact kernel is
    symmetric, so -2 AS is the true derivative: finite differences of the loss itself.
    (The lattice operator is not symmetric, so there the reference form is only an
    approximation of the derivative, as in the reference.)"""
    images, logits, label = random_inputs(B=1, C=2, H=6, W=8, seed=2, ignore_all=True)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return dense_energy_loss(images, x, label, weight=1.0, filter="exact")

    z = logits.clone().requires_grad_(True)
    loss_of(z).backward()
    eps = 1e-6
    fd = torch.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        xp, xm = logits.clone(), logits.clone()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (loss_of(xp) - loss_of(xm)) / (2 * eps)
    torch.testing.assert_close(z.grad, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


def test_odd_sizes_and_devices_follow_input():
    images, logits, label = random_inputs(B=1, C=3, H=9, W=11, seed=3)
    for method in ("permutohedral", "exact"):
        z = logits.float().requires_grad_(True)
        loss = dense_energy_loss(images.float(), z, label, filter=method)
        loss.backward()
        assert torch.isfinite(loss) and z.grad.shape == z.shape and loss.device == z.device


def test_exact_filter_ignores_autocast():
    images, logits, label = random_inputs(B=1, C=3, seed=5)
    images, logits = images.float(), logits.float()
    plain = dense_energy_loss(images, logits, label, filter="exact")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dense_energy_loss(images, logits, label, filter="exact")
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-5)
