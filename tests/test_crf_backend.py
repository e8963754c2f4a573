"""The CRF backend switch of the evaluation tools and predict.py (issue 29): `crf_backend`
(alias `crf.backend`), resolved once per run, the torch backend in-process through `CRFStep`,
the pydensecrf path unchanged, and every route working with pydensecrf2 missing."""
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tools import infer_cam, infer_seg_voc, predict
from tools.config import crf_backend_alias, parse_config
from tools.crf_step import CRFStep
from tools.session import run
from utils import crf
from utils.config import ConfigError
from utils.palette import read_label_png
from wetr import densecrf
from tests.tiny import tiny_checkpoint, tiny_data

K = 3
NO_PYDENSECRF = "pydensecrf2 not installed (optional; the torch backend needs none)"
FAST = ["size=64", "num_workers=0", "device=cpu", "crf_workers=0", "infer_set=val", "crf=true"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Synthetic VOC-layout data (5 val images of 48 px) and a tiny random MoRe checkpoint."""
    root = tmp_path_factory.mktemp("crf_backend")
    data = tiny_data(root, K, num_train=4, num_val=5, size=48, seed=0)
    ckpt, _ = tiny_checkpoint(root, data, K, step=3, with_meta=False)
    return SimpleNamespace(root=root, data=data, ckpt=ckpt)


@pytest.fixture
def no_pydensecrf(monkeypatch):
    """pydensecrf2 cannot be imported in this process (as on a machine without it)."""
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", None)
    assert not densecrf.pydensecrf_installed()


def test_crf_dot_backend_alias_on_every_command_line(capsys):
    argv = ["ckpt=x", "crf=true", "crf.backend=torch", "size=64"]
    assert crf_backend_alias(argv) == ["ckpt=x", "crf=true", "crf_backend=torch", "size=64"]
    assert crf_backend_alias(["+crf.backend=pydensecrf"]) == ["crf_backend=pydensecrf"]
    assert parse_config(argv).crf_backend == "torch"
    assert parse_config(["ckpt=x"]).crf_backend == "auto"
    with pytest.raises(ConfigError, match="crf_backend.*auto, torch, pydensecrf.*'gpu'"):
        parse_config(["ckpt=x", "crf.backend=gpu"])
    # the entries themselves: an evaluation tool and predict.py
    for main, argv in ((infer_seg_voc.main, ["ckpt=x"]), (predict.main, ["ckpt=x", "input=y"])):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "crf.backend=pydensecrf", "--print-config"])
        assert exit_.value.code == 0
        assert "crf_backend: pydensecrf" in capsys.readouterr().out


def test_crf_step_backends_equal_their_functions():
    """torch: `wetr.densecrf.crf_label` on the route's tensor; pydensecrf: `utils.crf.crf_label`
    gets the same host array the routes passed before the switch (probs.float().cpu().numpy());
    the backend is resolved once, when the step is built."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = torch.from_numpy(rng.dirichlet(np.ones(3), (20, 24)).astype(np.float32)).permute(2, 0, 1)
    keys = np.array([0, 2, 3])
    step = CRFStep("torch")
    assert step.pool is None
    got = step.label_map(rgb, probs, keys)
    assert step.label_map is densecrf.crf_label
    assert np.array_equal(got, densecrf.crf_label(rgb, probs.numpy(), keys))
    assert set(np.unique(got)) <= {0, 2, 3}
    assert CRFStep("auto", "cuda").backend == "torch" and CRFStep(None).backend is None
    with pytest.raises(ValueError, match="crf_backend='gpu'"):
        CRFStep("gpu")
    if densecrf.pydensecrf_installed():
        step = CRFStep("pydensecrf", workers=0)
        want = crf.crf_label(rgb, np.ascontiguousarray(probs.float().cpu().numpy()), keys)
        assert step.pool is None and np.array_equal(step.label_map(rgb, probs, keys), want)
        step.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_crf_step_torch_runs_on_the_probs_device():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    probs = torch.from_numpy(rng.dirichlet(np.ones(4), (40, 30)).astype(np.float32)).permute(2, 0, 1)
    keys = np.arange(4)
    on_gpu = CRFStep("torch").label_map(rgb, probs.to("cuda"), keys)
    on_cpu = CRFStep("torch").label_map(rgb, probs, keys)
    assert (on_gpu == on_cpu).mean() >= 0.999


def _scores(out):
    return json.loads((out / "scores.json").read_text())


def test_tool_runs_crf_with_torch_backend_when_pydensecrf_is_missing(run_dir, no_pydensecrf):
    out = run_dir.root / "seg_no_pydensecrf"
    result = infer_seg_voc.main([f"ckpt={run_dir.ckpt}", f"out_dir={out}", "scales=[1.0]", *FAST])
    saved = _scores(out)
    assert saved["config"]["crf"] and saved["config"]["crf_backend"] == "torch"   # auto -> torch
    assert "crf True (torch backend)" in (out / "infer_seg_voc.log").read_text()
    assert set(result) == {"seg", "seg_crf"} and result["seg_crf"]["pixels"] > 0
    names = sorted(p.name for p in (out / "seg_crf").glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in (out / "seg").glob("*.png"))
    # the CRF acted (the tiny random model's argmax is blotchy at 1/16 resolution)
    changed = [(read_label_png(out / "seg" / n) != read_label_png(out / "seg_crf" / n)).mean()
               for n in names]
    assert max(changed) > 0


def test_pydensecrf_backend_asked_but_missing_is_one_line(run_dir, no_pydensecrf, capsys):
    argv = [f"ckpt={run_dir.ckpt}", f"out_dir={run_dir.root / 'never'}", "crf.backend=pydensecrf",
            *FAST]
    with pytest.raises(SystemExit) as exit_:
        run(infer_seg_voc.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err == f"error: {crf.CRF_MISSING}" and "pip install pydensecrf2" in err
    assert not (run_dir.root / "never").exists()   # before any image


@pytest.mark.parametrize("tool, variant", [(infer_cam, "cam"), (infer_seg_voc, "seg")])
def test_torch_and_pydensecrf_backends_agree_through_the_tools(run_dir, tool, variant):
    """Issue 29's contract through the whole route: >= 99.9 % of each image's pixels, mIoU
    within 0.1 (CAM seeds: a stack of the present classes; segmentation: the softmax)."""
    pytest.importorskip("pydensecrf.densecrf", reason=NO_PYDENSECRF)
    outs = {}
    for backend in ("pydensecrf", "torch"):
        outs[backend] = run_dir.root / f"{variant}_{backend}"
        tool.main([f"ckpt={run_dir.ckpt}", f"out_dir={outs[backend]}", f"crf_backend={backend}",
                   "scales=[1.0,1.25]", *FAST])
        assert _scores(outs[backend])["config"]["crf_backend"] == backend
    a, b = (_scores(outs[k])["scores"] for k in ("pydensecrf", "torch"))
    assert a[variant] == b[variant]   # the CRF-free row is the same run
    assert abs(a[f"{variant}_crf"]["miou"] - b[f"{variant}_crf"]["miou"]) <= 0.001
    changed = 0.0
    for png in sorted((outs["torch"] / f"{variant}_crf").glob("*.png")):
        ref = read_label_png(outs["pydensecrf"] / f"{variant}_crf" / png.name)
        assert (read_label_png(png) == ref).mean() >= 0.999, png.name
        changed += (ref != read_label_png(outs["pydensecrf"] / variant / png.name)).mean()
    assert changed > 0   # the CRF moved labels, so agreeing is not trivial


def test_benchmark_times_the_seg_route_with_each_backend(tmp_path):
    from tools import benchmark

    res = benchmark.run(["model.embed_dim=32", "model.depth=3", "model.num_heads=2",
                         "data.crop_size=32", "batch_size=2", "data.num_classes=4",
                         "bench.warmup=0", "bench.steps=1", "bench.flops=false",
                         "bench.infer=false", "bench.energy=false", "bench.crf=false",
                         "bench.crf_size=[30,40]", "bench.route_images=2",
                         f"bench.out_dir={tmp_path}", "bench.name=route", "device=cpu"])
    route = res["seg_route"]
    backends = ["torch"] + (["pydensecrf"] if densecrf.pydensecrf_installed() else [])
    assert list(route["backends"]) == backends and route["size"] == "40x30"
    for r in route["backends"].values():
        assert r["route_s"] > 0 and r["crf_s"] > 0
        assert r["total_s"] == pytest.approx(r["route_s"] + r["crf_s"])
        assert r["coco_val_h"] == pytest.approx(40137 * r["total_s"] / 3600)
    text = (tmp_path / "route.md").read_text()
    assert "## Segmentation route per image" in text and "a CPU figure" in text
