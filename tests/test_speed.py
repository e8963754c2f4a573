"""Speed paths (issue 6): they give the plain paths' results, and the benchmark runs end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

from tools import benchmark
from tools.bench.energy import naive_gaussian_filter
from wetr import step as wetr_step
from wetr.cam import refine_label
from wetr.energy import exact_gaussian_filter
from wetr.factory import model_from_config
from wetr.par import PAR


def _refine_inputs(b=4, k=6, size=(18, 22), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, k)  # image 0 without foreground; at most 3 present classes
    y[1, [0, 3, 5]] = 1.0
    y[2, 4] = 1.0
    y[3, [1, 2]] = 1.0
    images = torch.rand(b, 3, *size, generator=g)
    cam = F.interpolate(torch.rand(b, k, 4, 5, generator=g) ** 2, size=size, mode="bilinear",
                        align_corners=False) * y[:, :, None, None]
    return images, cam, y


def refine_label_all_channels(par, images, cam, y, high, low):
    """Every class channel through PAR, absent ones as zero probability (the uncompacted form)."""
    b, k, h, w = cam.shape
    half = (h // 2, w // 2)
    labels = []
    for thre in (high, low):
        stack = torch.cat([torch.full((b, 1, h, w), thre), cam], dim=1)
        stack = F.interpolate(stack, size=half, mode="bilinear", align_corners=False)
        present = torch.cat([torch.ones(b, 1), y], dim=1)[:, :, None, None] != 0
        probs = stack.masked_fill(~present, float("-inf")).softmax(dim=1)
        small = F.interpolate(images, size=half, mode="bilinear", align_corners=False)
        refined = F.interpolate(par(small, probs), size=(h, w), mode="bilinear", align_corners=False)
        labels.append(refined.argmax(dim=1))
    hi, lo = labels
    return hi.masked_fill(hi == 0, 255).masked_fill(hi + lo == 0, 0)


@pytest.mark.parametrize("num_present", [None, 3, 4, 6])
def test_refine_label_compaction_equals_all_channels(num_present):
    images, cam, y = _refine_inputs()
    assert int(y.sum(1).max()) == 3
    par = PAR(num_iter=4, dilations=(1, 2, 4))
    want = refine_label_all_channels(par, images, cam, y, 0.7, 0.25)
    got = refine_label(par, images, cam, y, num_present=num_present)
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) - {0, 255}  # some class labels, not only bkg / ignore


def test_par_affinity_in_place_equals_formula():
    images = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    par = PAR(dilations=(1, 3))
    nb = torch.stack(par._neighbours(images), dim=2)
    aff = -((nb - images.unsqueeze(2)).abs() / (nb.std(dim=2, keepdim=True) + 1e-8) / par.w1) ** 2
    want = aff.mean(dim=1).softmax(dim=1) + par.pos_weight
    assert torch.equal(par.affinity(images), want)


def test_naive_filter_of_the_benchmark_is_the_gaussian_sum():
    g = torch.Generator().manual_seed(2)
    f, v = torch.randn(2, 30, 5, generator=g), torch.rand(2, 30, 3, generator=g)
    loop = torch.zeros_like(v)
    for b in range(2):
        for i in range(30):
            for j in range(30):
                loop[b, i] += torch.exp(-0.5 * ((f[b, i] - f[b, j]) ** 2).sum()) * v[b, j]
    torch.testing.assert_close(naive_gaussian_filter(f, v), loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exact_gaussian_filter(f, v), loop, rtol=1e-4, atol=1e-6)


def test_benchmark_tiny_run_writes_every_stage(tmp_path):
    res = benchmark.run(["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "data.crop_size=32",
                         "batch_size=2", "data.num_classes=4", "bench.warmup=1", "bench.steps=2",
                         "bench.infer_images=1", "bench.energy_sizes=[8,16]", "bench.naive_max_gib=0.0001",
                         "bench.crf_size=[24,32]",   # not VOC's 375 x 500: 2.5x faster, nothing asserted on it
                         f"bench.out_dir={tmp_path}", "bench.name=tiny", "device=cpu"])
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert (tmp_path / "tiny.md").read_text().startswith("# Benchmark tiny")
    stages = saved["step"]["stages_s"]
    wanted = {*wetr_step.STAGES, "network passes (CAM)", "step"}
    assert wanted <= set(stages) and all(stages[k] > 0 for k in wanted)
    s = res["step"]
    assert 0 < s["outside_network_share"] < 1 and s["flops_per_step"] > 0
    assert s["stages_s"]["multi-scale CAM"] >= s["stages_s"]["network passes (CAM)"]
    assert all(v["images_per_s"] > 0 for k, v in saved["infer"].items() if isinstance(v, dict))
    small, large = saved["energy"]
    assert "ms" in small["naive N x N"] and "ms_extrapolated" in large["naive N x N"]
    assert small["exact_vs_naive_max_rel_err"] < 1e-4
    assert saved["torch"] == torch.__version__ and saved["config"]["data"]["crop_size"] == 32


def test_benchmark_bad_model_config_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                        f"bench.out_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: aux_layer=-3 does not index one of the 2 blocks") and "\n" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("step", [150, 3000])  # before / after cam2mask, every term on
def test_training_forward_cams_replace_the_scale_one_pass(step):
    from wetr.config import make_config
    cfg = make_config(argv=["model.pretrained=false", "model.embed_dim=32", "model.depth=3",
                            "model.num_heads=2", "data.num_classes=4", "cam.cam2mask=2000",
                            "loss.after.seg=100", "loss.after.reg=100"])
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    par = wetr_step.build_par(cfg)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 80, generator=g)
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch_sizes = []
    model.encoder.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))

    def run(reuse):
        cfg.cam.reuse_forward = reuse
        batch_sizes.clear()
        torch.manual_seed(1)  # UNE draws tokens at random
        total, terms = wetr_step.compute_losses(wetr_step.Training(model, model, None, None, par),
                                                 wetr_step.Batch(images, cls_label), step, cfg)
        return total, terms, list(batch_sizes)

    total, terms, passes = run(True)
    want_total, want_terms, want_passes = run(False)
    n_scales = len(cfg.cam.scales)
    assert passes == [2, 2] + [4] * (n_scales - 1)      # forward, flips at 1.0, other scales
    assert want_passes == [2] + [4] * n_scales          # forward, then every scale with flips
    for k, v in want_terms.items():
        torch.testing.assert_close(terms[k], v, atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(total, want_total, atol=1e-5, rtol=1e-4)
    assert terms["seg"] > 0 and terms["cle"] > 0
    total.backward()  # the graph of the training forward is intact
    assert model.decoder.conv8.weight.grad is not None


def test_profiler_ranges_name_every_stage_and_change_nothing():
    """The benchmark times the step through its labelled profiler ranges: they are entered in
    step order, and the losses under the profiler are bit-identical to those without it."""
    from torch.autograd import DeviceType

    from utils.profiling import profiled
    from wetr.config import make_config
    cfg = make_config(argv=["model.pretrained=false", "model.embed_dim=32", "model.depth=3",
                            "model.num_heads=2", "data.num_classes=4", "cam.scales=[1.0,0.5]"])
    step = max(cfg.loss.after.values()) + 1  # every term on
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    par = wetr_step.build_par(cfg)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t, batch = wetr_step.Training(model, model, None, None, par), wetr_step.Batch(images, cls_label)
    torch.manual_seed(1)
    with profiled(torch.device("cpu")) as prof:
        total, terms = wetr_step.compute_losses(t, batch, step, cfg)
    ranges = sorted((e for e in prof.events() if e.device_type == DeviceType.CPU
                     and e.name in wetr_step.STAGES), key=lambda e: e.time_range.start)
    names = [e.name for e in ranges]
    torch.manual_seed(1)
    want_total, want_terms = wetr_step.compute_losses(t, batch, step, cfg)
    assert torch.equal(total, want_total)
    assert all(torch.equal(terms[k], want_terms[k]) for k in wetr_step.LOSS_TERMS)
    assert names == ["forward", "multi-scale CAM", "refined labels (PAR)", "token labels",
                     "loss cls + cls_aux", "loss tokens", "loss CLE", "loss UNE", "loss PTC",
                     "loss seg", "loss reg (dense energy)"]
    assert set(names) <= set(wetr_step.STAGES)
