"""CUDA against CPU: the same weights and batch give the same losses, gradients and filters.

Skipped where no GPU is visible (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
TF32 is switched off for the comparison, so both devices compute in float32 and only the
summation order differs. Tolerances: loss terms 1e-3 relative (+1e-4 absolute), gradients 1e-3 of
the largest entry per tensor, lattice filter 1e-4 of the largest output, PAR and CAMs 1e-5.
The CUDA twins of tests/test_fastpaths.py (bf16 autocast, regional compile against eager, with
that file's tolerances) and a check that the lattice, PAR, refine_label, the dense energy and
the CAM post-processing never synchronise with the host (sync debug mode "error") are here too.
"""
import copy

import pytest
import torch

import torch.nn.functional as F

from tools.bench.step import synthetic_batch
from wetr.config import make_config
from wetr import step as wetr_step
from wetr.cam import multi_scale_cam, refine_label
from wetr.compile import compile_regions
from wetr.energy import dense_energy_loss
from wetr.factory import model_from_config
from wetr.par import PAR
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
    total, terms = wetr_step.compute_losses(wetr_step.Training(model, model, None, None, par),
                                            wetr_step.Batch(images.to(device), cls_label.to(device)),
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


def tiny_setup():
    cfg = make_config(None, ["model.embed_dim=64", "model.depth=4", "model.num_heads=4",
                             "model.pretrained=false", "data.num_classes=5", "data.crop_size=64",
                             "batch_size=2", "device=cuda"])
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    images, cls_label = synthetic_batch(2, 64, 4, seed=0)
    return cfg, model, images, cls_label, max(cfg.loss.after.values()) + 1


def test_permutohedral_fixed_capacity_cuda_equals_unique():
    g = torch.Generator().manual_seed(1)
    feats = (torch.rand(2, 999, 5, generator=g) * 4).to("cuda")
    values = torch.rand(2, 999, 3, generator=g).to("cuda")
    fixed = permutohedral_filter(feats, values)  # the default on CUDA
    unique = permutohedral_filter(feats, values, fixed_capacity=False)
    assert (fixed - unique).abs().max() <= 1e-5 * unique.abs().max()


def test_par_and_multi_scale_cam_cuda_match_cpu():
    g = torch.Generator().manual_seed(2)
    images, masks = torch.rand(2, 3, 40, 52, generator=g), torch.rand(2, 5, 20, 26, generator=g)
    par = PAR()
    ref = par(images, masks)
    got = par.to("cuda")(images.to("cuda"), masks.to("cuda")).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    _, model, _, _, _ = tiny_setup()
    x = torch.randn(2, 3, 64, 48, generator=g)
    with torch.no_grad():
        want = multi_scale_cam(model, x, (1.0, 0.5, 0.75, 1.5))
        got = multi_scale_cam(model.to("cuda"), x.to("cuda"), (1.0, 0.5, 0.75, 1.5))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


class _PooledCams(torch.nn.Module):
    """CAMs without a network (1x1 conv of 16x16-pooled images): the post-processing alone."""

    def __init__(self, k: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2 * k, 3, 1, 1))

    def forward(self, x, cam_only=True):
        return F.conv2d(F.avg_pool2d(x, 16), self.w).chunk(2, dim=1)


def test_step_pieces_never_sync_with_host():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 64, generator=g).to(dev)
    cam = torch.rand(2, 4, 64, 64, generator=g).to(dev)
    cls_label = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]]).to(dev)
    logits = torch.randn(2, 5, 64, 64, generator=g).to(dev).requires_grad_(True)
    label = torch.randint(0, 5, (2, 64, 64), generator=g).to(dev)
    feats = torch.rand(2, 300, 5, generator=g).to(dev) * 4
    cams, par = _PooledCams(4).to(dev), PAR().to(dev)

    def pieces():
        permutohedral_filter(feats, feats[..., :3])
        refine_label(par, images, cam * cls_label[:, :, None, None], cls_label, num_present=2)
        dense_energy_loss(images * 255, logits, label).backward()
        with torch.no_grad():
            multi_scale_cam(cams, images, (1.0, 0.5, 0.75, 1.5))

    pieces()  # lazy initialisation (handles, allocator) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pieces()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_bf16_autocast_step_cuda_within_tolerance_of_fp32():
    cfg, model, images, cls_label, step = tiny_setup()
    par = wetr_step.build_par(cfg).to("cuda")
    runs = []
    for amp in (None, torch.bfloat16):
        m = copy.deepcopy(model).to("cuda")
        torch.manual_seed(1)
        total, terms = wetr_step.compute_losses(
            wetr_step.Training(m, m, None, None, par, amp),
            wetr_step.Batch(images.to("cuda"), cls_label.to("cuda"), int(cls_label.sum(1).max())), step, cfg)
        total.backward()
        runs.append(({k: float(v.detach()) for k, v in terms.items()},
                     {n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.grad is not None}))
    (ref_terms, ref_grads), (terms, grads) = runs
    for k, v in ref_terms.items():  # tests/test_fastpaths.py's tolerances
        assert terms[k] == pytest.approx(v, rel=0.02, abs=1e-4), k
    for n, g in ref_grads.items():
        if g.norm() > 0:
            assert float((grads[n] - g).norm() / g.norm()) <= 0.15, n
            assert float(F.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0)) >= 0.99, n


def test_regional_compile_cuda_matches_eager():
    cfg, model, images, cls_label, step = tiny_setup()
    torch._dynamo.reset()
    eager = copy.deepcopy(model).to("cuda")
    compiled = compile_regions(copy.deepcopy(model).to("cuda"))
    par = wetr_step.build_par(cfg).to("cuda")
    results = []
    for m in (eager, compiled):
        torch.manual_seed(1)
        total, terms = wetr_step.compute_losses(
            wetr_step.Training(m, m, None, None, par),
            wetr_step.Batch(images.to("cuda"), cls_label.to("cuda"), int(cls_label.sum(1).max())), step, cfg)
        total.backward()
        results.append(({k: float(v.detach()) for k, v in terms.items()},
                        {n: p.grad.detach().cpu() for n, p in m.named_parameters() if p.grad is not None}))
    (ref_terms, ref_grads), (terms, grads) = results
    for k, v in ref_terms.items():
        assert terms[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for n, g in ref_grads.items():
        assert (grads[n] - g).abs().max() <= 1e-4 * g.abs().max().clamp_min(1e-8), n
    torch._dynamo.reset()
