"""Inference tools (METHOD.md §8): multi-scale + flip maps against loop references, checkpoint loading,
and a 2-process gloo evaluation that must equal the 1-process one."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tools import infer_cam, infer_lam, infer_seg_voc, routes
from tools.config import SEED_SCALES, SEG_SCALES, parse_config, resolve_scales
from tools.routes import to_uint8_rgb
from utils.checkpoint import load_file, model_state
from utils.config import ConfigError
from utils.palette import read_label_png
from wetr import build_model
from wetr.cam import maps_to_label
from wetr import infer
from wetr.factory import checkpoint_spec, model_from_checkpoint
from wetr.infer import multi_scale_seg, seed_crf_stack, seed_maps
from tests.tiny import tiny_checkpoint, tiny_data

K = 3


class FakeModel(nn.Module):
    """The MoRe interface on a patchify conv: CAMs, class tokens that depend on the image and on
    with_gcr, patch map and seg logits at 1/16 resolution."""

    def __init__(self, k=K, d=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Conv2d(3, d, 16, stride=16)
        self.cls = nn.Conv2d(d, k, 1, bias=False)
        self.dec = nn.Conv2d(d, k + 1, 1)
        self.tokens = nn.Parameter(torch.randn(k, d, generator=g))

    def forward(self, x, cam_only=False, with_gcr=True):
        p = self.proj(x)
        if cam_only:
            return self.cls(p).mul(0.5), self.cls(p)
        tokens = self.tokens[None] * (1 + x.mean((1, 2, 3)))[:, None, None]
        if with_gcr:
            tokens = torch.tanh(tokens)
        cls = self.cls(F.adaptive_max_pool2d(p, 1)).flatten(1)
        return SimpleNamespace(cls_logits=cls, seg_logits=self.dec(p), patch_map=p, class_tokens=tokens)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def loop_minmax(m):
    out = m.clone()
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            v = m[b, c] - m[b, c].min()
            out[b, c] = v / (v.max() + 1e-5)
    return out


def loop_seed_maps(one_map, x, scales, relu):
    """Per image and scale: map of the image and of its flip (separate forwards), flipped back,
    element-wise max, optional ReLU; summed over scales (1.0 first); min-max normalised."""
    h, w = x.shape[-2:]
    out = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        total = 0
        for s in [1.0] + [s for s in scales if s != 1.0]:
            xs = xb if s == 1.0 else up(xb, (int(s * h), int(s * w)))
            m = up(one_map(xs), (h, w))
            mf = up(one_map(xs.flip(-1)), (h, w)).flip(-1)
            m = torch.maximum(m, mf)
            total = total + (m.clamp(min=0) if relu else m)
        out.append(total)
    return loop_minmax(torch.cat(out))


@pytest.mark.parametrize("scales", [(1.0,), SEED_SCALES])
def test_cam_and_lam_maps_match_loop(scales):
    torch.manual_seed(0)
    model = FakeModel().eval()
    x = torch.randn(2, 3, 32, 32)
    cam = seed_maps("cam", model, x, scales, with_gcr=True)
    want = loop_seed_maps(lambda v: model(v, cam_only=True)[1], x, scales, relu=True)
    assert cam.shape == (2, K, 32, 32)
    assert torch.allclose(cam, want, atol=1e-5)
    for gcr in (True, False):
        got = seed_maps("lam", model, x, scales, with_gcr=gcr)
        lam_one = lambda v: torch.einsum("kd,dhw->khw", model(v, with_gcr=gcr).class_tokens[0],
                                         model(v, with_gcr=gcr).patch_map[0])[None]
        want = loop_seed_maps(lam_one, x, scales, relu=False)   # no ReLU for LAMs
        assert torch.allclose(got, want, atol=1e-5)


def test_seed_kind_and_scales_resolution():
    with pytest.raises(ValueError, match="cam, lam"):
        seed_maps("seg", FakeModel(), torch.randn(1, 3, 32, 32), (1.0,), with_gcr=True)
    spec = infer_cam.TOOL
    cfg = parse_config(["ckpt=x.pth"])
    assert resolve_scales(cfg, spec) == (1.0,)
    assert resolve_scales(parse_config(["ckpt=x.pth", "multi_scale=true"]), spec) == SEED_SCALES
    assert resolve_scales(parse_config(["ckpt=x.pth", "scales=[0.5,2]"]), spec) == (0.5, 2.0)
    assert resolve_scales(parse_config(["ckpt=x.pth"], infer_seg_voc.TOOL.defaults),
                          infer_seg_voc.TOOL) == SEG_SCALES


def test_seg_logits_match_loop():
    torch.manual_seed(1)
    model = FakeModel().eval()
    image = torch.randn(1, 3, 37, 53)
    got = multi_scale_seg(model, image, 64, (1.0, 1.25, 1.5), (37, 53))
    best = None
    for s in (1.0, 1.25, 1.5):
        x = up(image, (int(64 * s), int(64 * s)))
        a = up(model(x).seg_logits, (37, 53))
        b = up(model(x.flip(-1)).seg_logits, (37, 53)).flip(-1)
        best = a + b if best is None else torch.maximum(best, a + b)
    assert got.shape == (1, K + 1, 37, 53)
    assert torch.allclose(got, best, atol=1e-5)


def test_seed_label_and_crf_stack_match_loop():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(1, 4, 5, 6, generator=g)
    cls = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    label = maps_to_label(maps, cls, 0.5)
    probs, keys = seed_crf_stack(maps, cls)
    assert keys.tolist() == [0, 1, 3, 4]
    for y in range(5):
        for x in range(6):
            vals = [maps[0, c, y, x].item() * cls[0, c].item() for c in range(4)]
            best = max(range(4), key=lambda c: vals[c])
            assert label[0, y, x].item() == (0 if vals[best] <= 0.5 else best + 1)
            present = [maps[0, c, y, x].item() for c in (0, 2, 3)]
            assert abs(probs[0, y, x].item() - (1 - max(present))) < 1e-6
            assert [probs[i, y, x].item() for i in (1, 2, 3)] == pytest.approx(present)
    empty, no_keys = seed_crf_stack(maps, torch.zeros(1, 4))
    assert empty.shape[0] == 0 and len(no_keys) == 0


def test_uint8_image_recovered_from_normalised():
    from datasets.transforms import normalise

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    assert np.array_equal(to_uint8_rgb(normalise(rgb)), rgb)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Synthetic VOC-layout data and a tiny random MoRe checkpoint in our format."""
    root = tmp_path_factory.mktemp("infer")
    data = tiny_data(root, K, num_train=4, num_val=5, size=48, seed=0)
    ckpt, model = tiny_checkpoint(root, data, K, step=7)
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, model=model.eval())


def _from_ckpt(cfg):
    """The tools' checkpoint -> model call."""
    return model_from_checkpoint(cfg.ckpt, torch.device("cpu"), cfg.data.num_classes, cfg.model)


FAST = ["size=64", "num_workers=0", "device=cpu"]


def test_reference_checkpoint_and_class_mismatch(run_dir):
    ref = run_dir.root / "reference.pth"
    torch.save({f"module.{k}": v for k, v in run_dir.model.state_dict().items()}, ref)
    obj = load_file(ref)
    spec = checkpoint_spec(obj, model_state(obj))
    assert (spec.num_classes, spec.embed_dim, spec.depth) == (K + 1, 64, 4)
    cfg = parse_config([f"ckpt={ref}", "model.num_heads=4"])
    model, _ = _from_ckpt(cfg)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x).seg_logits, run_dir.model(x).seg_logits)
    with pytest.raises(ConfigError) as err:
        _from_ckpt(parse_config([f"ckpt={run_dir.ckpt}", "data.num_classes=21"]))
    assert "K=20" in str(err.value) and "K=3" in str(err.value) and "\n" not in str(err.value)


def test_patch_size_and_decoder_width_read_from_the_weights(tmp_path):
    """A bare state_dict carries no config: patch size and decoder width come from the shapes."""
    model = build_model(num_classes=K + 1, embed_dim=64, depth=4, num_heads=4, patch_size=8,
                        decoder_dim=32).eval()
    ref = tmp_path / "p8.pth"
    torch.save(model.state_dict(), ref)
    from utils.checkpoint import load_file
    obj = load_file(ref)
    spec = checkpoint_spec(obj, model_state(obj))
    assert (spec.patch_size, spec.decoder_dim) == (8, 32)
    loaded, _ = _from_ckpt(parse_config([f"ckpt={ref}", "model.num_heads=4"]))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x).seg_logits, model(x).seg_logits)


def test_decoder_dilation_read_from_the_checkpoint_meta(tmp_path):
    """The dilation leaves no trace in the weights' shapes: our checkpoints carry it in meta (a
    bare state_dict is the reference's, dilation 5)."""
    model = build_model(num_classes=K + 1, embed_dim=64, depth=4, num_heads=4, decoder_dim=32,
                        decoder_dilation=2).eval()
    ck = tmp_path / "d2.pth"
    torch.save({"model": model.state_dict(), "meta": {"decoder_dilation": 2, "num_heads": 4}}, ck)
    loaded, info = _from_ckpt(parse_config([f"ckpt={ck}"]))
    assert info["decoder_dilation"] == 2 and loaded.decoder.conv6.dilation == (2, 2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x).seg_logits, model(x).seg_logits)
    torch.save(model.state_dict(), ck)
    assert checkpoint_spec(load_file(ck), model.state_dict()).decoder_dilation == 5
    cfg = parse_config([f"ckpt={ck}", "model.num_heads=4", "model.decoder_dilation=2"])
    bare, _ = _from_ckpt(cfg)
    with torch.no_grad():
        assert torch.equal(bare(x).seg_logits, model(x).seg_logits)


@pytest.mark.parametrize("override, expect", [
    ("model.decoder_dilation=0", "decoder_dilation must be positive, got 0"),
    ("model.aux_layer=7", "aux_layer=7 does not index one of the 4 blocks"),
])
def test_bad_model_override_is_one_line(run_dir, override, expect):
    with pytest.raises(ConfigError) as err:
        _from_ckpt(parse_config([f"ckpt={run_dir.ckpt}", override]))
    msg = str(err.value)
    assert expect in msg and str(run_dir.ckpt) in msg and "\n" not in msg


def test_cam_seeds_tool_matches_manual_pipeline(run_dir):
    out = run_dir.root / "cam"
    result = infer_cam.main([f"ckpt={run_dir.ckpt}", f"out_dir={out}", "crf=true", "crf_workers=0",
                             "save_arrays=true", *FAST])
    saved = json.loads((out / "scores.json").read_text())
    assert set(result) == {"cam", "cam_crf"} and saved["split"] == "train_aug"
    assert saved["scores"]["cam"]["miou"] == pytest.approx(result["cam"]["miou"])
    # one image by hand: resize to 64x64, CAM (scale 1 + flip), upsample to the label, bkg 0.5
    from datasets import build_dataset
    ds = build_dataset(SimpleNamespace(name="voc", root=str(run_dir.data), num_classes=K + 1),
                       "train_aug", "val")
    name, image, label, cls = ds[1]
    x = up(image[None], (64, 64))
    with torch.no_grad():
        maps = up(loop_seed_maps(lambda v: run_dir.model(v, cam_only=True)[1], x, (1.0,), True),
                  label.shape)
    valid = maps * cls[None, :, None, None]
    value, index = valid.max(1)
    want = torch.where(value <= 0.5, 0, index + 1)[0]
    assert np.array_equal(read_label_png(out / "cam" / f"{name}.png"), want.numpy())
    arrays = np.load(out / "arrays" / f"{name}.npz")
    present = cls.nonzero()[:, 0]
    assert arrays["classes"].tolist() == (present + 1).tolist()
    assert np.allclose(arrays["cam"], maps[0, present].numpy(), atol=1e-3)
    assert (out / "cam_crf" / f"{name}.png").is_file()


def test_two_process_gloo_equals_one_process(run_dir):
    one, two = run_dir.root / "seg1", run_dir.root / "seg2"
    args = [f"ckpt={run_dir.ckpt}", "crf=true", "crf_workers=0", "scales=[1.0,1.25]", *FAST]
    result = infer_seg_voc.main([*args, f"out_dir={one}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tools.infer_seg_voc", *args, f"out_dir={two}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "scores.json").read_text())
    b = json.loads((two / "scores.json").read_text())
    assert b["processes"] == 2 and a["images"] == b["images"] == 5
    assert a["scores"] == b["scores"] and a["scores"]["seg"]["pixels"] > 0
    assert a["scores"]["seg_crf"]["miou"] == pytest.approx(result["seg_crf"]["miou"])
    for variant in ("seg", "seg_crf"):
        names = sorted(p.name for p in (one / variant).iterdir())
        assert names == sorted(p.name for p in (two / variant).iterdir()) and len(names) == 5
        for n in names:
            assert np.array_equal(read_label_png(one / variant / n), read_label_png(two / variant / n))


def test_test_split_writes_server_layout(run_dir):
    lists = run_dir.data / "ImageSets" / "Segmentation"
    (lists / "test.txt").write_text((lists / "val.txt").read_text())
    out = run_dir.root / "test"
    assert infer_seg_voc.main([f"ckpt={run_dir.ckpt}", "infer_set=test", f"out_dir={out}",
                               "max_images=2", "multi_scale=false", *FAST]) == {}
    server = out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert len(list(server.glob("*.png"))) == 2
    assert json.loads((out / "scores.json").read_text())["scores"] == {}
    with pytest.raises(Exception, match="cls_labels=pred"):
        infer_cam.main([f"ckpt={run_dir.ckpt}", "infer_set=test", f"out_dir={out}", *FAST])


# --------------------------------------------------------------------------- cam2seg (METHOD.md §8)
def classifier_first_loop(logits, argmax, k):
    """Classifier's classes; if none, argmax foreground classes with >= 5 pixels, except the
    first one when background is absent (reference quirk, as the test order)."""
    cls = [c for c in range(k) if logits[c] > 0]
    if cls:
        return set(cls)
    present = sorted(set(argmax.ravel().tolist()))
    return {c - 1 for i, c in enumerate(present)
            if c != 0 and (i == 0 or sum(int(v == c) for v in argmax.ravel()) >= 5)}


def seg_first_loop(logits, argmax, k):
    """Argmax classes (sorted); none in the foreground: the classifier's. Each foreground class
    needs >= 4 pixels, except the first one when background is absent (reference quirk)."""
    present = sorted(set(argmax.ravel().tolist()))
    if present == [0]:
        return {c for c in range(k) if logits[c] > 0}
    keep = set()
    for i, c in enumerate(present):
        if c == 0:
            continue
        unchecked = i == 0   # no background: the reference skips the first class's check
        if unchecked or sum(int(v == c) for v in argmax.ravel()) >= 4:
            keep.add(c - 1)
    return keep


def _one_hot_logits(argmax, k):
    """(h, w) class ids -> (1, K+1, h, w) logits whose argmax is `argmax`."""
    return F.one_hot(torch.as_tensor(argmax), k + 1).permute(2, 0, 1)[None].float()


CASES = [   # classifier logits, argmax grid drawing, val labels, test labels (0-based classes)
    ([1.0, -1, -1], {2: 6, 3: 4}, {0}, {1, 2}),               # both orders differ
    ([-1.0, -1, -1], {2: 5, 3: 4}, {1}, {1, 2}),               # 5 vs 4 pixels
    ([-1.0, -1, -1], {2: 4}, set(), {1}),                      # nothing passes 5
    ([-1.0, 2, -1], {}, {1}, {1}),                             # no foreground: classifier
    ([-1.0, 2, -1], {1: 2}, {1}, set()),                       # foreground too small: no fallback
    ([-1.0, -1, -1], {"all": 2, 1: 3}, {0, 1}, {0, 1}),        # no background: 3 pixels kept
    ([-1.0, -1, -1], {"all": 3, 2: 2}, {1, 2}, {1, 2}),        # first = class 2 of {2, 3}
]


@pytest.mark.parametrize("logits, draw, want_val, want_test", CASES)
def test_cam2seg_label_orders(logits, draw, want_val, want_test):
    grid = np.zeros((6, 6), dtype=np.int64)
    flat = grid.ravel()
    pos = 0
    if "all" in draw:
        flat[:] = draw["all"]
    for c, n in draw.items():
        if c != "all":
            flat[pos:pos + n] = c
            pos += n
    cls, seg = torch.tensor([logits]), _one_hot_logits(grid, K)
    got_val = infer.classifier_first_labels(cls, seg)
    got_test = infer.seg_first_labels(cls, seg)
    as_set = lambda t: set(t[0].nonzero()[:, 0].tolist())
    assert as_set(got_val) == want_val == classifier_first_loop(logits, grid, K)
    assert as_set(got_test) == want_test == seg_first_loop(logits, grid, K)
    assert got_val.shape == got_test.shape == (1, K) and got_val.dtype == torch.float32


def test_cam2seg_label_orders_match_loops_batched():
    """Random logits on a batch (one image per row) against the loops."""
    g = torch.Generator().manual_seed(5)
    k = 4
    for _ in range(20):
        cls = torch.randn(6, k, generator=g) - 1.5
        seg = torch.randn(6, k + 1, 5, 5, generator=g)
        seg[:2, 0] -= 3                      # some images without background
        seg[2:4, 0] += 2                     # some nearly all background
        val = infer.classifier_first_labels(cls, seg)
        test = infer.seg_first_labels(cls, seg)
        for b in range(6):
            argmax = seg[b].argmax(0).numpy()
            assert set(val[b].nonzero()[:, 0].tolist()) == classifier_first_loop(cls[b], argmax, k)
            assert set(test[b].nonzero()[:, 0].tolist()) == seg_first_loop(cls[b], argmax, k)


def _cam2seg_by_hand(model, image, label_size, order):
    x = up(image[None], (64, 64))
    with torch.no_grad():
        out = model(x)
        cls = order(out.cls_logits, out.seg_logits)
        maps = up(infer.multi_scale_lam(model, x, SEED_SCALES, with_gcr=True), label_size)
    return maps_to_label(maps, cls, 0.5)[0].numpy()


@pytest.mark.parametrize("split", ["val", "test"])
def test_cam2seg_route(run_dir, split, monkeypatch):
    """cam2seg=true alone: val (or the test split), 7 scales, CRF, predicted labels in the split's
    order; the test route writes the server layout in its own folder."""
    from datasets import build_dataset
    lists = run_dir.data / "ImageSets" / "Segmentation"
    (lists / "test.txt").write_text((lists / "val.txt").read_text())
    orders = []
    for fn in ("classifier_first_labels", "seg_first_labels"):
        real = getattr(routes, fn)
        monkeypatch.setattr(routes, fn, lambda *a, _r=real, _n=fn: orders.append(_n) or _r(*a))
    out = run_dir.root / f"cam2seg_{split}"
    extra = [] if split == "val" else ["infer_set=test"]
    result = infer_lam.main([f"ckpt={run_dir.ckpt}", "cam2seg=true", f"out_dir={out}",
                             "crf_workers=0", *extra, *FAST])
    saved = json.loads((out / "scores.json").read_text())
    assert saved["split"] == split and saved["scales"] == list(SEED_SCALES)
    assert saved["config"]["crf"] and saved["config"]["cls_labels"] == "pred"
    want_order = "classifier_first_labels" if split == "val" else "seg_first_labels"
    assert set(orders) == {want_order} and len(orders) == 5
    ds = build_dataset(SimpleNamespace(name="voc", root=str(run_dir.data), num_classes=K + 1),
                       split, "val" if split == "val" else "test")
    name, image, label, _ = ds[2]
    want = _cam2seg_by_hand(run_dir.model, image, label.shape, getattr(infer, want_order))
    assert np.array_equal(read_label_png(out / "lam" / f"{name}.png"), want)
    if split == "val":
        assert set(result) == {"lam", "lam_crf"} and result["lam_crf"]["pixels"] > 0
    else:
        assert result == {}
        server = out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
        assert sorted(p.name for p in server.glob("*.png")) == sorted(
            p.name for p in (out / "lam_crf").glob("*.png")) and len(list(server.glob("*.png"))) == 5


def test_run_evaluate_voc_rejects_a_bad_cam2seg_value(run_dir):
    proc = subprocess.run(["bash", "run_evaluate_voc.sh", "cpu", "1", str(run_dir.ckpt),
                           "cam2seg=yes"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: cam2seg must be true or false, got 'yes'"


@pytest.mark.parametrize("case", ["bad_key", "rank_0_check"])
def test_run_evaluate_voc_two_processes_one_line(run_dir, tmp_path, case):
    """Two processes under torchrun, no check before it: a config error every rank meets and a
    layout error that only rank 0 checks (a missing mask of train_aug, the first tool's seed
    split) both end the run with exit 2 and one line, printed once; rank 1 does not go on
    alone."""
    import shutil

    data = tmp_path / "syn"
    shutil.copytree(run_dir.data, data)
    extra = ["no_such_key=1"]
    if case == "rank_0_check":
        name = (data / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()[1]
        (data / "SegmentationClassAug" / f"{name}.png").unlink()
        extra = []
    proc = subprocess.run(["bash", "run_evaluate_voc.sh", "cpu", "2", str(run_dir.ckpt),
                           f"data.root={data}", f"out_dir={tmp_path / 'out'}", "size=64", *extra],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("*")
             and "OMP_NUM_THREADS" not in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    want = "unknown config key 'no_such_key'" if case == "bad_key" else f"{name}.png"
    assert lines[0].startswith("error: ") and want in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_corrupt_image_in_evaluation_is_one_line_naming_it(run_dir, tmp_path, capsys):
    """A JPEG cut short after its header, met by an inference tool's loader: exit 2, one line with its path."""
    import shutil

    from tools.session import run
    data = tmp_path / "syn"
    shutil.copytree(run_dir.data, data)
    name = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[1]
    image = data / "JPEGImages" / f"{name}.jpg"
    raw = image.read_bytes()
    image.write_bytes(raw[:len(raw) * 2 // 3])   # header intact: the layout check passes it
    with pytest.raises(SystemExit) as info:
        run(infer_seg_voc.main, [f"ckpt={run_dir.ckpt}", f"data.root={data}", "multi_scale=false",
                                 f"out_dir={tmp_path / 'out'}", *FAST])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and str(image) in err[0]
