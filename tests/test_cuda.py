"""CUDA against CPU: the same weights and batch give the same losses, gradients and filters.

Skipped where no GPU is visible (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
TF32 is switched off for the comparison, so both devices compute in float32 and only the
summation order differs. Tolerances: loss terms 1e-3 relative (+1e-4 absolute), gradients 1e-3 of
the largest entry per tensor, lattice filter 1e-4 of the largest output.
"""
import copy

import pytest
import torch

from tools.bench.step import synthetic_batch
from utils.config import make_config
from wetr import step as wetr_step
from wetr.factory import model_from_config
from wetr.permutohedral import permutohedral_filter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _losses_and_grads(cfg, model, images, cls_label, step, device):
    model = model.to(device)
    par = wetr_step.build_par(cfg).to(device)
    total, terms = wetr_step.compute_losses(model, model, par, images.to(device), cls_label.to(device),
                                            step, cfg)
    model.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), {k: float(v.detach()) for k, v in terms.items()}, grads


def test_compute_losses_cuda_matches_cpu():
    cfg = make_config(None, ["model.embed_dim=64", "model.depth=4", "model.num_heads=4",
                             "model.pretrained=false", "data.num_classes=5", "data.crop_size=64",
                             "batch_size=2", "device=cpu"])
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    images, cls_label = synthetic_batch(2, 64, 4, seed=0)
    step = max(cfg.loss.after.values()) + 1  # every term on
    cpu = _losses_and_grads(cfg, copy.deepcopy(model), images, cls_label, step, torch.device("cpu"))
    gpu = _losses_and_grads(cfg, copy.deepcopy(model), images, cls_label, step, torch.device("cuda"))
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-3, abs=1e-4)
    for k, v in cpu[1].items():
        assert gpu[1][k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
    assert cpu[2].keys() == gpu[2].keys() and len(cpu[2]) > 10
    for n, g in cpu[2].items():
        scale = g.abs().max().clamp_min(1e-8)
        assert (gpu[2][n] - g).abs().max() <= 1e-3 * scale, n


def test_permutohedral_filter_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 400, 5, generator=g) * 4
    values = torch.rand(2, 400, 3, generator=g)
    ref = permutohedral_filter(feats, values)
    cuda = torch.device("cuda")
    got = permutohedral_filter(feats.to(cuda), values.to(cuda)).cpu()
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
