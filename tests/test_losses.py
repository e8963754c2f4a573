"""METHOD.md §5 losses against slow loop versions written from METHOD.md's text."""
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from wetr.config import UneConfig
from wetr.losses import (_une_choose, class_token_loss, cle_loss, ptc_loss, seg_loss, une_loss,
                         une_token_indices, une_value)

B, K, D, H, W = 2, 3, 8, 10, 10


def random_token_label(gen: torch.Generator, b: int, h: int, w: int, probs=(0.2, 0.3, 0.5)) -> torch.Tensor:
    """Labels with background, classes 1..K and 255 drawn with probabilities `probs`."""
    kind = torch.multinomial(torch.tensor(probs), b * h * w, replacement=True, generator=gen).view(b, h, w)
    cls = torch.randint(1, K + 1, (b, h, w), generator=gen)
    return torch.where(kind == 0, 0, torch.where(kind == 1, cls, 255))


def inputs(seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, K, D, generator=gen, requires_grad=True)
    pmap = (scale * torch.randn(B, D, H, W, generator=gen)).requires_grad_()
    label = random_token_label(gen, B, H, W)
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    return tokens, pmap, label, cls_label


def normalised(v: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    return v / max(np.linalg.norm(v), eps)


def assert_finite_grads(*tensors):
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------- class-token regularisation

def test_class_token_loss_matches_loop():
    tokens, *_ = inputs()
    with torch.no_grad():  # correlated tokens so that the loss is O(1), not ~1e-4
        tokens.mul_(0.1).add_(torch.ones(D))
    z = tokens.detach().double().numpy()
    total = 0.0
    for b in range(B):
        for k in range(K):
            row = [normalised(z[b, k]) @ normalised(z[b, j]) / 0.07 for j in range(K)]
            total += -row[k] + math.log(sum(math.exp(r) for r in row))
    loss = class_token_loss(tokens, None)
    assert loss.item() == pytest.approx(total / (B * K), rel=1e-5)
    loss.backward()
    assert_finite_grads(tokens)


# ---------------------------------------------------------------- CLE

def cle_loop(tokens, pmap, label, cls_label, temp, exp, log, num):
    """METHOD.md's text literally; `exp`, `log`, `num` pick the arithmetic (float64 or Decimal)."""
    z = tokens.detach().double().numpy()
    p = pmap.detach().double().numpy().reshape(B, D, -1)
    lab = label.reshape(B, -1).tolist()
    total = num(0)
    for b in range(B):
        for c in range(K):
            if cls_label[b, c] != 1:
                continue
            zc = normalised(z[b, c])
            logits = [num(float(zc @ p[b, :, n])) / num(temp) for n in range(p.shape[2])]
            denom = sum(exp(l) for l in logits) + num(1e-4)
            flags = [1 if lab[b][n] == c + 1 else 0 for n in range(len(logits))]
            weighted = sum(f * -log(exp(l) / denom) for f, l in zip(flags, logits))
            total += weighted / (sum(flags) + num(1e-4))
    return float(total / B)


def decimal_cle(tokens, pmap, label, cls_label, temp):
    getcontext().prec = 50
    return cle_loop(tokens, pmap, label, cls_label, temp, Decimal.exp, Decimal.ln, Decimal)


@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_cle_matches_naive_formula(temp):
    tokens, pmap, label, cls_label = inputs(1)
    ref = cle_loop(tokens, pmap, label, cls_label, temp, math.exp, math.log, float)
    loss = cle_loss(tokens, pmap, label, cls_label, temp)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert_finite_grads(tokens)
    assert pmap.grad is None  # the patch map is detached


@pytest.mark.parametrize("scale", [40.0, 200.0, -5.0, -60.0])
def test_cle_stable_at_extreme_logits(scale):
    # Positive scales: logits ~ 100..1000 overflow the naive float32 formula. Negative scales:
    # every logit negative, Σ exp(l) comparable to (-5) or far below (-60, float32 underflow) 1e-4.
    tokens, pmap, label, cls_label = inputs(2)
    with torch.no_grad():
        if scale < 0:
            direction = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(0)), dim=0)
            tokens.mul_(0.05).add_(direction)
            pmap.mul_(0.05).add_(scale * direction[None, :, None, None])
        else:
            pmap.mul_(scale)
    loss = cle_loss(tokens, pmap, label, cls_label, 0.5)
    assert torch.isfinite(loss)
    ref = decimal_cle(tokens, pmap, label, cls_label, 0.5)
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    loss.backward()
    assert_finite_grads(tokens)


def test_cle_ignores_absent_classes():
    tokens, pmap, label, cls_label = inputs(3)
    base = cle_loss(tokens, pmap, label, cls_label, 0.5)
    assert cle_loss(tokens, pmap, label, torch.zeros_like(cls_label), 0.5).item() == 0.0
    with torch.no_grad():
        tokens[0, 1] += 5.0  # class 2 is absent from image 0
    assert cle_loss(tokens, pmap, label, cls_label, 0.5).item() == pytest.approx(base.item(), rel=1e-6)


# ---------------------------------------------------------------- UNE

def une_choose_loop(label, keys, num_tokens=8, window=6, border=3, thresh=1.2, true_position=False):
    """Per-image, per-position loop following METHOD.md; returns sorted full-grid indices per image
    and which branch each image took."""
    b_, h, w = label.shape
    hi, wi = h - 2 * border, w - 2 * border
    out, branches = [], []
    for b in range(b_):
        roi = [[1 if v == 255 else 2 if v >= 1 else 0 for v in row] for row in label[b].tolist()]
        cands = []
        for i in range(hi):
            for j in range(wi):
                if roi[i + border][j + border] != 1:
                    continue
                total = sum(roi[y][x] for y in range(i, min(i + window, h)) for x in range(j, min(j + window, w)))
                if total / (window * window) >= thresh:
                    cands.append(i * wi + j)
        by_key = lambda pool, kk: sorted(pool, key=lambda q: (keys[kk, b].flatten()[q].item(), q))
        if len(cands) > num_tokens:
            chosen, branch = by_key(cands, 0)[:num_tokens], "many"
        else:
            add = (num_tokens - len(cands)) // 4
            pool = [q for q in range(hi * wi) if roi[q // wi + border][q % wi + border] == 2]
            branch = "few"
            if len(pool) < add:
                pool, branch = list(range(hi * wi)), "fallback"
            chosen = cands + by_key(pool, 1)[:add]
        off = border if true_position else 0
        out.append(sorted((q // wi + off) * w + q % wi + off for q in chosen))
        branches.append(branch)
    return out, branches


def chosen_lists(index, valid):
    return [sorted(index[b][valid[b]].tolist()) for b in range(index.shape[0])]


@pytest.mark.parametrize("true_position", [False, True])
def test_une_choice_matches_loop(true_position):
    branches = set()
    size = 12
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        probs = [(0.2, 0.3, 0.5), (0.1, 0.2, 0.7), (0.05, 0.05, 0.9), (0.9, 0.05, 0.05), (0.3, 0.1, 0.6)][seed % 5]
        label = random_token_label(gen, B, size, size, probs)
        keys = torch.rand(2, B, size - 6, size - 6, generator=gen)
        index, valid = _une_choose(label, keys, UneConfig(true_position=true_position))
        ref, br = une_choose_loop(label, keys, true_position=true_position)
        assert chosen_lists(index, valid) == ref
        branches.update(br)
    assert branches == {"many", "few", "fallback"}  # every rule of METHOD.md was exercised


def test_une_choice_generalises_to_other_window():
    gen = torch.Generator().manual_seed(7)
    label = random_token_label(gen, B, 11, 13, (0.1, 0.2, 0.7))
    keys = torch.rand(2, B, 11 - 4, 13 - 4, generator=gen)
    # windows run off the map (window > 2·border + 1); thresh·window² = 45 is reachable exactly
    kw = dict(num_tokens=5, window=6, border=2, thresh=1.25)
    index, valid = _une_choose(label, keys, UneConfig(**kw))
    assert chosen_lists(index, valid) == une_choose_loop(label, keys, **kw)[0]


def test_une_quirk_vs_true_position():
    label = torch.zeros(1, H, W, dtype=torch.long)
    label[0, 2:, 2:] = 1
    label[0, 4:, 4:] = 255  # an uncertain block inside a class region
    keys = torch.rand(2, 1, H - 6, W - 6, generator=torch.Generator().manual_seed(0))
    quirk, vq = _une_choose(label, keys, UneConfig(thresh=0.9))
    true, vt = _une_choose(label, keys, UneConfig(thresh=0.9, true_position=True))
    assert torch.equal(vq, vt) and vq.any()
    assert torch.equal(true[vt], quirk[vq] + 3 * W + 3)
    # every true-position token is uncertain; the quirk takes tokens 3 rows/cols up-left
    assert (label.flatten()[true[vt]] == 255).all()
    assert (label.flatten()[quirk[vq]] != 255).any()


def test_une_draws_reproducible_and_separable():
    _, _, label, _ = inputs(4)
    a = une_token_indices(label, generator=torch.Generator().manual_seed(5))
    b = une_token_indices(label, generator=torch.Generator().manual_seed(5))
    keys = torch.rand(2, B, H - 6, W - 6, generator=torch.Generator().manual_seed(5))
    c = _une_choose(label, keys)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_une_selection_is_random_over_candidates():
    yy, xx = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    label = torch.where((yy + xx) % 2 == 0, 255, 1)[None]  # window means 1.5: 32 candidates
    seen = set()
    for seed in range(60):
        index, valid = une_token_indices(label, generator=torch.Generator().manual_seed(seed))
        assert valid.sum() == 8
        seen.update(index[valid].tolist())
    # all candidates get drawn (taken at their inner coordinates, the reference quirk)
    assert seen == {i * 14 + j for i in range(8) for j in range(8) if (i + j) % 2 == 0}


def une_value_loop(tokens, pmap, cls_label, chosen):
    z = tokens.detach().double().numpy()
    p = pmap.detach().double().numpy().reshape(B, D, -1)
    y = cls_label.tolist()
    terms = []
    for b in range(B):
        for n in chosen[b]:
            u = normalised(p[b, :, n])
            s = [abs(u @ normalised(z[b, c])) for c in range(K)]
            pos = sum(y[b][c] * s[c] for c in range(K)) / (sum(y[b]) + 1)
            neg = sum((1 - y[b][c]) * s[c] for c in range(K)) / (sum(1 - v for v in y[b]) + 1)
            terms.append(0.5 * (1 - pos) + 0.5 * neg)
    return sum(terms) / len(terms)


def test_une_value_matches_loop():
    tokens, pmap, label, cls_label = inputs(5)
    index, valid = une_token_indices(label, generator=torch.Generator().manual_seed(0))
    ref = une_value_loop(tokens, pmap, cls_label, chosen_lists(index, valid))
    loss = une_loss(tokens, pmap, label, cls_label, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert une_value(tokens, pmap, cls_label, index, valid).item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert_finite_grads(pmap)
    assert tokens.grad is None  # class tokens are detached in UNE


def test_une_nothing_chosen_is_zero_with_grad():
    gen = torch.Generator().manual_seed(0)
    pmap = torch.randn(B, D, 6, 6, generator=gen, requires_grad=True)
    tokens = torch.randn(B, K, D, generator=gen)
    label = torch.full((B, 6, 6), 255)
    loss = une_loss(tokens, pmap, label, torch.ones(B, K), generator=gen)
    assert loss.item() == 0.0
    loss.backward()
    assert_finite_grads(pmap)


# ---------------------------------------------------------------- PTC

def test_ptc_matches_loop():
    _, pmap, label, _ = inputs(6)
    x = pmap.detach().double().numpy().reshape(B, D, -1)
    lab = label.reshape(B, -1).tolist()
    n = H * W
    pos_sum = neg_sum = pos_n = neg_n = 0.0
    for b in range(B):
        for i in range(n):
            for j in range(n):
                if i == j or lab[b][i] == 255 or lab[b][j] == 255:
                    continue
                cos = abs(normalised(x[b, :, i]) @ normalised(x[b, :, j]))
                if lab[b][i] == lab[b][j]:
                    pos_sum, pos_n = pos_sum + cos, pos_n + 1
                else:
                    neg_sum, neg_n = neg_sum + cos, neg_n + 1
    ref = 0.5 * (1 - pos_sum / (pos_n + 1)) + 0.5 * neg_sum / (neg_n + 1)
    loss = ptc_loss(pmap, label)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert_finite_grads(pmap)


# ---------------------------------------------------------------- seg

def seg_loop(logits, label):
    lg = logits.detach().double().numpy()
    lab = label.tolist()
    sums, counts = {"bg": 0.0, "fg": 0.0}, {"bg": 0, "fg": 0}
    for b in range(lg.shape[0]):
        for y in range(lg.shape[2]):
            for x in range(lg.shape[3]):
                v = lab[b][y][x]
                if v == 255:
                    continue
                part = "bg" if v == 0 else "fg"
                scores = lg[b, :, y, x]
                sums[part] += math.log(sum(math.exp(s) for s in scores)) - scores[v]
                counts[part] += 1
    return 0.5 * (sums["bg"] / (counts["bg"] + 1e-6) + sums["fg"] / (counts["fg"] + 1e-6))


@pytest.mark.parametrize("case", ["mixed", "one_image_ignored", "all_ignored", "no_foreground"])
def test_seg_loss_matches_loop(case):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(B, K + 1, 6, 7, generator=gen, requires_grad=True)
    label = random_token_label(gen, B, 6, 7)
    if case == "one_image_ignored":
        label[1] = 255
    elif case == "all_ignored":
        label[:] = 255
    elif case == "no_foreground":
        label[label != 255] = 0
    loss = seg_loss(logits, label)
    assert loss.item() == pytest.approx(seg_loop(logits, label), rel=1e-5, abs=1e-7)
    loss.backward()
    assert_finite_grads(logits)
