"""tools/export_pseudo_masks.py: the training split's CAM / LAM seeds as palette PNGs in the
SegmentationClassPseudo/ + <split>.txt layout, equal to infer_cam's / infer_lam's label PNGs of
the same settings, with their mIoU; resumable; nested tag-dataset names; sharded by torchrun."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import export_pseudo_masks, infer_cam, infer_lam
from tools.outputs import PSEUDO_DIR
from utils.config import ConfigError
from tests.tiny import tiny_checkpoint

K = 3
REPO = Path(__file__).resolve().parents[1]
FAST = ["size=64", "num_workers=0", "device=cpu", "crf_workers=0"]


def _has_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
        return True
    except ImportError:
        return False


def _checkpoint(root: Path, data: Path, *extra: str) -> Path:
    """A tiny random model saved as a training run's checkpoint on `data`."""
    return tiny_checkpoint(root, data, K, step=3, extra=extra)[0]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """Synthetic VOC layout (train_aug with masks) and a checkpoint trained on it."""
    from datasets.synthetic import SyntheticParams, make_synthetic

    root = tmp_path_factory.mktemp("export")
    data = root / "syn"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=K, num_train=6, num_val=2, size=48,
                                              seed=2), progress=False)
    return root, data, _checkpoint(root, data)


def _names(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _mean_row(log: Path) -> str:
    """The printed table's mean row."""
    return next(ln for ln in log.read_text().splitlines() if ln.startswith("mean"))


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("route, extra", [
    ("cam", ["multi_scale=true"]),
    pytest.param("lam", ["crf=true"], marks=pytest.mark.skipif(
        not _has_pydensecrf(), reason="crf=true needs pydensecrf2 here")),
])
def test_export_equals_the_seed_tool_and_prints_its_miou(voc, route, extra):
    root, data, ckpt = voc
    tool = {"cam": infer_cam, "lam": infer_lam}[route]
    seeds, out = root / f"seeds_{route}", root / f"export_{route}"
    want = tool.main([f"ckpt={ckpt}", "infer_set=train_aug", f"out_dir={seeds}", *extra, *FAST])
    got = export_pseudo_masks.main([f"ckpt={ckpt}", f"route={route}", f"out_dir={out}", *extra,
                                    *FAST])   # default split: the checkpoint's train_aug
    assert got == want and np.isfinite(got[route]["miou"])
    split = _names(data / "ImageSets" / "Segmentation" / "train_aug.txt")
    assert _names(out / "train_aug.txt") == split
    final = f"{route}_crf" if "crf=true" in extra else route
    for name in split:
        with Image.open(out / PSEUDO_DIR / f"{name}.png") as im, \
                Image.open(seeds / final / f"{name}.png") as ref:
            assert im.mode == "P" and im.getpalette() == ref.getpalette()
            assert np.array_equal(np.array(im), np.array(ref))
    assert _mean_row(out / f"pseudo_{route}{'_crf' if final != route else ''}.log") == _mean_row(
        seeds / f"infer_{route}.log")
    record = json.loads((out / "scores.json").read_text())
    assert record["split"] == "train_aug" and record["images"] == len(split)


def test_partial_export_resumes_to_the_same_files(voc, monkeypatch):
    """max_images=2, then resume=true: the same PNGs, list and scores as one run; only the
    missing images go through the route."""
    root, data, ckpt = voc
    args = [f"ckpt={ckpt}", "route=lam", *FAST]
    full, part = root / "resume_full", root / "resume_part"
    want = export_pseudo_masks.main([*args, f"out_dir={full}"])
    export_pseudo_masks.main([*args, f"out_dir={part}", "max_images=2"])
    assert len(_names(part / "train_aug.txt")) == 2
    from tools import evaluation, routes
    calls = []
    wrapped = {k: (lambda p, item, _f=f: calls.append(item.name) or _f(p, item))
               for k, f in routes.ROUTES.items()}
    monkeypatch.setattr(evaluation, "ROUTES", wrapped)
    got = export_pseudo_masks.main([*args, f"out_dir={part}", "resume=true"])
    n = len(_names(data / "ImageSets" / "Segmentation" / "train_aug.txt"))
    assert got == want and len(calls) == n - 2 and len(set(calls)) == n - 2
    assert _pngs(part / PSEUDO_DIR) == _pngs(full / PSEUDO_DIR)
    assert (part / "train_aug.txt").read_bytes() == (full / "train_aug.txt").read_bytes()
    scores = [json.loads((d / "scores.json").read_text())["scores"] for d in (full, part)]
    assert scores[0] == scores[1]


def test_tag_dataset_nested_names_without_masks(tmp_path):
    """The tag format's odd nested names land at SegmentationClassPseudo/<name>.png; its train
    split has no masks: no scores, said once; a stale temp file of a killed run is removed."""
    from datasets.synthetic import SyntheticParams, make_synthetic

    data = tmp_path / "tags"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=K, num_train=6, num_val=2, size=48,
                                              seed=3, fmt="tags"), progress=False)
    ckpt = _checkpoint(tmp_path, data, "data.name=tags", "data.train_split=train")
    out = tmp_path / "out"
    stale = out / PSEUDO_DIR / "nested dir" / "ünïcode" / ".x.png.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    got = export_pseudo_masks.main([f"ckpt={ckpt}", f"out_dir={out}", "resume=true", *FAST])
    assert got == {} and not stale.exists()
    split = _names(data / "ImageSets" / "Segmentation" / "train.txt")
    assert _names(out / "train.txt") == split
    assert any("/" in n and " " in n for n in split)
    want = {f"{n}.png" for n in split}
    assert set(_pngs(out / PSEUDO_DIR)) == want
    for name in split:
        with Image.open(out / PSEUDO_DIR / f"{name}.png") as im, \
                Image.open(data / "photos" / name) as photo:
            assert im.mode == "P" and im.size == photo.size
            assert np.array(im).max() <= K
    log = (out / "pseudo_cam.log").read_text()
    assert log.count("has no ground-truth masks") == 1
    assert f"img_path='{data / 'photos'}'" in log and "img_suffix=''" in log


def test_mmsegmentation_line_has_absolute_paths_and_resume_checks_the_route(voc, tmp_path,
                                                                             monkeypatch):
    """A relative data.root and out_dir: the lines to paste name absolute folders; resuming
    the export of another route into the same folder is refused."""
    root, data, ckpt = voc
    monkeypatch.chdir(root)
    args = [f"ckpt={ckpt}", f"data.root={data.name}", "max_images=2", *FAST]
    export_pseudo_masks.main([*args, "out_dir=rel_out"])
    log = (root / "rel_out" / "pseudo_cam.log").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("mmsegmentation:"))
    assert f"img_path='{data / 'JPEGImages'}'" in line
    assert f"seg_map_path='{root / 'rel_out' / PSEUDO_DIR}'" in line
    assert f"ann_file='{root / 'rel_out' / 'train_aug.txt'}'" in line
    with pytest.raises(ConfigError, match="route 'cam' there, 'lam' now"):
        export_pseudo_masks.main([*args, "out_dir=rel_out", "route=lam", "resume=true"])


def test_save_labels_false_is_refused(voc):
    _, _, ckpt = voc
    with pytest.raises(ConfigError, match="save_labels=false"):
        export_pseudo_masks.main([f"ckpt={ckpt}", "save_labels=false", *FAST])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_two_processes_shard_and_give_one_process_files(voc):
    root, _, ckpt = voc
    args = [f"ckpt={ckpt}", "route=cam", *FAST]
    one, two = root / "one", root / "two"
    want = export_pseudo_masks.main([*args, f"out_dir={one}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "-m", "tools.export_pseudo_masks",
                        *args, f"out_dir={two}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((two / "scores.json").read_text())
    assert record["processes"] == 2 and record["scores"] == json.loads(
        (one / "scores.json").read_text())["scores"]
    assert want["cam"]["miou"] == record["scores"]["cam"]["miou"]
    assert _pngs(two / PSEUDO_DIR) == _pngs(one / PSEUDO_DIR)
    assert (two / "train_aug.txt").read_bytes() == (one / "train_aug.txt").read_bytes()
