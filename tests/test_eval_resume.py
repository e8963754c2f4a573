"""Resumable evaluation (resume=true) and the VOC test-server archive: a run killed by SIGKILL
half-way and resumed gives the scores of an uninterrupted run; the archive holds the split's
palette PNGs under results/VOC2012/Segmentation/comp6_test_cls/."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import infer_cam, infer_lam, infer_seg_voc
from tools.outputs import SERVER_DIR, EvalWriter
from tools.routes import Output
from tools.submission import pack_voc_test
from utils.palette import save_label_png
from tests.tiny import tiny_checkpoint, tiny_data

K = 3
REPO = Path(__file__).resolve().parents[1]
FAST = ["size=64", "num_workers=0", "device=cpu", "crf_workers=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 val images (and a test list of the same names) and a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("evalresume")
    data = tiny_data(root, K, num_train=4, num_val=12, size=48, seed=1)
    lists = data / "ImageSets" / "Segmentation"
    (lists / "test.txt").write_text((lists / "val.txt").read_text())
    ckpt, _ = tiny_checkpoint(root, data, K, step=3)
    return root, ckpt


def _scores(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())["scores"]


def test_sigkilled_evaluation_resumes_to_the_same_scores(setup):
    root, ckpt = setup
    args = [f"ckpt={ckpt}", "crf=true", "save_overlays=true", *FAST]
    full = root / "full"
    want = infer_seg_voc.main([*args, f"out_dir={full}"])
    killed = root / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "tools.infer_seg_voc", *args,
                             f"out_dir={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:   # kill once 3 images are complete
        if len(list((killed / "seg_crf").glob("*.png"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the evaluation ended before it could be killed"
    done = len(list((killed / "seg_crf").glob("*.png")))
    assert 3 <= done < 12 and not (killed / "scores.json").exists()
    resumed = infer_seg_voc.main([*args, f"out_dir={killed}", "resume=true"])
    assert resumed == want and _scores(killed) == _scores(full)
    for variant in ("seg", "seg_crf", "overlays"):
        assert sorted(p.name for p in (killed / variant).iterdir()) == sorted(
            p.name for p in (full / variant).iterdir())
    assert not list(killed.rglob(".*.tmp"))


@pytest.mark.parametrize("tool, extra", [(infer_cam, ["multi_scale=true"]),
                                         (infer_lam, ["cam2seg=true"])])
def test_partial_run_then_resume_equals_one_run(setup, tool, extra, monkeypatch):
    """The seed tools and cam2seg: a run stopped after 2 images (max_images) and resumed; the
    resumed run computes only the images missing."""
    root, ckpt = setup
    name = tool.__name__.rsplit(".", 1)[1] + "_".join(extra)
    args = [f"ckpt={ckpt}", *extra, *FAST]
    full, part = root / f"{name}_full", root / f"{name}_part"
    want = tool.main([*args, f"out_dir={full}"])
    tool.main([*args, f"out_dir={part}", "max_images=2"])
    from tools import routes
    calls = []
    real = routes.ROUTES.copy()
    monkeypatch.setattr(routes, "ROUTES", {k: (lambda p, item, _f=f: calls.append(item.name)
                                               or _f(p, item)) for k, f in real.items()})
    import tools.evaluation as evaluation
    monkeypatch.setattr(evaluation, "ROUTES", routes.ROUTES)
    got = tool.main([*args, f"out_dir={part}", "resume=true"])
    n = json.loads((full / "scores.json").read_text())["images"]
    assert got == want and _scores(part) == _scores(full)
    assert len(calls) == n - 2 and len(set(calls)) == n - 2


def test_writer_done_needs_every_file_written_last(tmp_path):
    w = EvalWriter(tmp_path, ("lam", "lam_crf"), save_labels=True, save_arrays=True,
                   server_layout=True)
    label = np.zeros((4, 5), dtype=np.uint8)
    out = Output("a", {"lam": label, "lam_crf": label + 1}, arrays={"lam": label})
    assert not w.done("a")
    w.write(out)
    assert w.done("a")
    assert np.array_equal(np.array(Image.open(w.server_path("a"))), label + 1)   # the CRF map
    for path in (w.label_path("lam_crf", "a"), tmp_path / "arrays" / "a.npz", w.server_path("a")):
        data = path.read_bytes()
        path.unlink()
        assert not w.done("a")
        path.write_bytes(data)


def test_voc_test_split_writes_a_checked_archive(setup, capsys):
    root, ckpt = setup
    out = root / "test"
    assert infer_seg_voc.main([f"ckpt={ckpt}", "infer_set=test", f"out_dir={out}",
                               "multi_scale=false", *FAST]) == {}
    archive = out / "results.tar.gz"
    with tarfile.open(archive) as tar:
        members = sorted(tar.getnames())
        names = (root / "syn" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
        assert members == sorted("/".join((*SERVER_DIR, f"{n}.png")) for n in names)
        for m in tar.getmembers():
            with Image.open(tar.extractfile(m)) as im:
                assert im.mode == "P"
    printed = capsys.readouterr()
    line = [ln for ln in (printed.out + printed.err).splitlines() if "results.tar.gz" in ln]
    assert len(line) == 1 and f"upload {archive} (12 palette PNGs" in line[0]


def test_archive_checks_count_and_palette(tmp_path):
    folder = tmp_path.joinpath(*SERVER_DIR)
    for n in ("a", "b"):
        save_label_png(folder / f"{n}.png", np.zeros((3, 3), dtype=np.uint8))
    assert "holds 2 PNGs, the split lists 3" in pack_voc_test(tmp_path, 3)
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(folder / "c.png")   # mode L
    line = pack_voc_test(tmp_path, 3)
    assert "c.png is mode L" in line and not (tmp_path / "results.tar.gz").exists()
    save_label_png(folder / "c.png", np.zeros((3, 3), dtype=np.uint8))
    assert pack_voc_test(tmp_path, 3).startswith("upload ")


def test_preflight_checks_and_writes_nothing(setup, tmp_path, capsys):
    """preflight=true: config, checkpoint and data checked, nothing written."""
    root, ckpt = setup
    out = tmp_path / "out"
    assert infer_seg_voc.main([f"ckpt={ckpt}", f"out_dir={out}", "preflight=true", *FAST]) is None
    assert not out.exists()
    from tools.session import run
    with pytest.raises(SystemExit) as info:
        run(infer_seg_voc.main, [f"ckpt={ckpt}", f"out_dir={out}", "preflight=true",
                                 f"data.root={tmp_path / 'nowhere'}", *FAST])
    assert info.value.code == 2 and "nowhere" in capsys.readouterr().err and not out.exists()


def test_resume_with_other_settings_is_refused_in_one_line(setup, tmp_path, capsys):
    """settings.json stamps what shapes the label PNGs; resume=true with other settings into the
    same out_dir is one line (exit 2) before any image, the same settings resume."""
    from tools.session import SETTINGS_FILE, run
    root, ckpt = setup
    out = tmp_path / "out"
    args = [f"ckpt={ckpt}", f"out_dir={out}", "multi_scale=false", *FAST]
    infer_seg_voc.main([*args, "max_images=2"])
    stamp = json.loads((out / SETTINGS_FILE).read_text())
    assert stamp["scales"] == [1.0] and stamp["size"] == 64 and stamp["crf"] is False
    assert stamp["checkpoint"] == str(Path(ckpt).resolve()) and stamp["step"] == 3
    capsys.readouterr()
    for other, said in ((["scales=[1.0,1.25]"], "scales [1.0] there, [1.0, 1.25] now"),
                        (["size=96"], "size 64 there, 96 now"),
                        (["crf=true"], "crf False there, True now")):
        before = sorted(p.name for p in (out / "seg").iterdir())
        with pytest.raises(SystemExit) as info:
            run(infer_seg_voc.main, [*args, *other, "resume=true"])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and "\n" not in err and said in err, err
        assert err.startswith("error: resume=true, but") and str(out) in err
        assert sorted(p.name for p in (out / "seg").iterdir()) == before
    assert infer_seg_voc.main([*args, "resume=true"])["seg"]["pixels"] > 0
    # a run without resume starts over with its own settings
    infer_seg_voc.main([*args, "size=96", "max_images=1"])
    assert json.loads((out / SETTINGS_FILE).read_text())["size"] == 96
