"""tools/predict.py on a folder of odd images: every readable one gets outputs at its own size,
a corrupt one is named on one line and makes the exit status non-zero."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.predict import main, output_names
from utils.palette import read_label_png
from tests.tiny import tiny_checkpoint, tiny_data

K = 3
REPO = Path(__file__).resolve().parents[1]
SIZES = {"tall.jpg": (70, 20), "wide.jpeg": (15, 90), "tiny.png": (3, 5), "grey.png": (33, 41),
         "rgba.png": (24, 24), "photo.JPG": (40, 30)}   # name -> (H, W)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets.synthetic import class_names

    root = tmp_path_factory.mktemp("predict")
    data = tiny_data(root, K, num_train=2, num_val=2, size=32, seed=0)
    ckpt, model = tiny_checkpoint(root, data, K)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(rgb)
        img = img.convert("L") if name == "grey.png" else img.convert("RGBA") if name == "rgba.png" else img
        img.save(images / name, format="JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    (images / "broken.jpg").write_bytes((images / "tall.jpg").read_bytes()[:200])
    (images / "notes.txt").write_text("not an image, not listed")
    return root, ckpt, images, class_names(K)


def test_odd_images_sizes_outputs_and_skip(setup, tmp_path, capsys):
    root, ckpt, images, names = setup
    out = tmp_path / "out"
    skipped = main([f"ckpt={ckpt}", f"input={images}", f"out_dir={out}", "size=64", "device=cpu",
                    "save_cam=true", "multi_scale=true"])
    assert skipped == 1
    err = capsys.readouterr().err
    bad = [line for line in err.splitlines() if "broken.jpg" in line]
    assert len(bad) == 1 and str(images / "broken.jpg") in bad[0]
    found = 0
    for name, (h, w) in SIZES.items():
        stem = Path(name).stem
        label = read_label_png(out / "seg" / f"{stem}.png")
        assert label.shape == (h, w) and label.max() <= K, name
        with Image.open(out / "overlay" / f"{stem}.jpg") as im:
            assert im.size == (w, h)
        present = [c for c in np.unique(label) if c > 0]
        found += len(present)
        for c in present:
            with Image.open(out / "cam" / f"{stem}_{names[c]}.jpg") as im:
                assert im.size == (w, h)
            assert (out / "lam" / f"{stem}_{names[c]}.jpg").is_file()
    assert found and len(list((out / "cam").iterdir())) == found
    assert not (out / "seg" / "broken.png").exists() and not (out / "seg" / "notes.png").exists()


def test_single_file_and_exit_status(setup, tmp_path):
    root, ckpt, images, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "tools.predict", f"ckpt={ckpt}",
                         f"input={images / 'wide.jpeg'}", f"out_dir={tmp_path / 'a'}", "size=64",
                         "device=cpu"], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert read_label_png(tmp_path / "a" / "seg" / "wide.png").shape == (15, 90)
    bad = subprocess.run([sys.executable, "-m", "tools.predict", f"ckpt={ckpt}",
                          f"input={images / 'broken.jpg'}", f"out_dir={tmp_path / 'b'}", "size=64",
                          "device=cpu"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"skipped {images / 'broken.jpg'}: cannot read image" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "tools.predict", f"ckpt={ckpt}",
                              f"input={tmp_path / 'nothing'}"], cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "input=" in missing.stderr


def test_output_names_keep_suffix_on_clash():
    files = [Path("a.jpg"), Path("a.png"), Path("b.jpeg")]
    assert output_names(files) == ["a_jpg", "a_png", "b"]


def test_default_output_folder_is_under_the_run(setup):
    """No out_dir: <run>/eval/<checkpoint stem>/predict_<input name> (the run is the folder
    above checkpoints/)."""
    root, ckpt, images, _ = setup
    assert main([f"ckpt={ckpt}", f"input={images / 'tiny.png'}", "size=64", "device=cpu"]) == 0
    out = root / "run" / "eval" / "last" / "predict_tiny"
    assert read_label_png(out / "seg" / "tiny.png").shape == SIZES["tiny.png"]
