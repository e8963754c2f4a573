"""GraphCategoryRepresentation (METHOD.md §3) against a slow per-class, per-neighbour loop."""
import copy
import math

import pytest
import torch

from wetr.gcr import GraphCategoryRepresentation

B, K, N, D = 2, 6, 10, 8


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return (x - mean) / math.sqrt(var + eps) * weight + bias


def lin(layer: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
    return layer.weight @ v + layer.bias


def gcr_loop(m: GraphCategoryRepresentation, z: torch.Tensor, p: torch.Tensor, gate_score: str) -> torch.Tensor:
    k = max(1, int(0.5 * z.shape[1]))  # METHOD.md §3's int(0.5 K), at least one neighbour (K = 1)
    out = torch.zeros_like(z)
    for b in range(z.shape[0]):
        x = torch.cat([z[b], p[b]])
        tails = [lin(m.tail_proj, x[j]) for j in range(len(x))]
        for c in range(z.shape[1]):
            e_h = lin(m.head_proj, z[b, c])
            logits = [float(e_h @ t) / math.sqrt(D) for t in tails]
            order = sorted(range(len(logits)), key=lambda j: -logits[j])[:k]
            a = [logits[j] for j in order]
            prob = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
            scores = []
            for j, pj in zip(order, prob):
                r = (1 - pj) * e_h + pj * tails[j]
                g = torch.tanh(e_h + r)
                scores.append(float(tails[j].sum() * g.sum()) if gate_score == "reference"
                              else float((tails[j] * g).sum()))
            q = [math.exp(s - max(scores)) for s in scores]
            e_n = sum(qi / sum(q) * tails[j] for qi, j in zip(q, order))
            h = leaky(lin(m.linear1, 0.1 * (e_h + e_n) + z[b, c])) + leaky(lin(m.linear2, 0.1 * (e_h * e_n) + z[b, c]))
            out[b, c] = layer_norm(h, m.norm.weight, m.norm.bias)
    return out


def make(gate_score: str = "reference") -> GraphCategoryRepresentation:
    torch.manual_seed(0)
    m = GraphCategoryRepresentation(D, gate_score=gate_score).eval()
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(0.5 * torch.randn_like(prm))
    return m


@pytest.mark.parametrize("gate_score,k", [("reference", K), ("dot", K), ("reference", 1),
                                          ("reference", 2), ("dot", 1)])
def test_matches_loop(gate_score, k):
    m = make(gate_score)
    z, p = torch.randn(B, k, D), torch.randn(B, N, D)
    with torch.no_grad():
        got = m(z, p)
        want = gcr_loop(copy.deepcopy(m).double(), z.double(), p.double(), gate_score)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_gate_scores_differ():
    z, p = torch.randn(B, K, D), torch.randn(B, N, D)
    with torch.no_grad():
        assert not torch.allclose(make("reference")(z, p), make("dot")(z, p), atol=1e-3)


def test_structure_and_gradients():
    m = make()
    assert set(m.state_dict()) == {f"{n}.{p}" for n in ("_fc1.0", "head_proj", "tail_proj", "linear1", "linear2",
                                                        "norm") for p in ("weight", "bias")}
    assert m.norm.eps == 1e-5 and m.dropout.p == 0.0
    z = torch.randn(B, K, D, requires_grad=True)
    p = torch.randn(B, N, D, requires_grad=True)
    m.train()(z, p).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert p.grad is None  # patch tokens are detached


def test_bad_gate_score():
    with pytest.raises(ValueError, match="gate_score"):
        GraphCategoryRepresentation(D, gate_score="mean")


@pytest.mark.parametrize("num_fg,k", [(1, 1), (2, 1), (3, 1), (20, 10), (80, 40)])
def test_topk_count(num_fg, k, monkeypatch):
    """k = int(0.5 K) (VOC 10, COCO 40 unchanged), at least 1 (K = 1 keeps one neighbour)."""
    seen = []
    real = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, n, **kw: seen.append(n) or real(t, n, **kw))
    out = make()(torch.randn(1, num_fg, D), torch.randn(1, N, D))
    assert seen == [k] and torch.isfinite(out).all()
