"""Bad input, as a new user meets it: one `error: ...` line, exit code 2, nothing written and
nothing existing overwritten.

Most cases call the training entry point in-process (`scripts.train_voc` main: the same code as
`python -m scripts.train_voc` and as run_train.sh's preflight); the launcher checks (port, GPU
count) and an error found only mid-run (a corrupt JPEG) go through run_train.sh.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.sampler import ResumableSampler, SampleError
from datasets.synthetic import SyntheticParams, make_synthetic
from scripts.train_voc import VOC
from tools.cli import train_entry
from utils.checkpoint import CheckpointError, load_file
from wetr.config import make_config
from wetr import engine
from wetr.factory import model_from_config
from wetr.run import save_checkpoint
from wetr.step import Training
from wetr.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.num_classes=5", "data.crop_size=128", "data.num_workers=0", "model.pretrained=false",
        "model.embed_dim=32", "model.depth=3", "model.num_heads=2", "batch_size=2", "val.size=64",
        "val.max_images=2", "cam.scales=[1.0]", "par.num_iter=1", "par.dilations=[1]",
        "max_iters=2", "log_every=1", "save_every=1", "eval_every=100", "device=cpu", "tag=run"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors") / "data"
    make_synthetic(str(root), SyntheticParams(num_fg_classes=4, num_train=8, num_val=2, size=64),
                   progress=False)
    return root


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def argv(data: Path, work: Path, *extra: str) -> list[str]:
    return [f"work_dir={work}", f"data.root={data}", *TINY, *extra]


def fails(args: list[str], capsys) -> str:
    """Run main; assert exit code 2 and exactly one stderr line; return it."""
    with pytest.raises(SystemExit) as exc:
        train_entry(VOC, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def names(data: Path, split: str = "train_aug") -> list[str]:
    return (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def make_checkpoint(path: Path, *extra: str, optimizer: bool = True) -> Path:
    cfg = make_config(VOC, [*TINY, *extra])
    model = model_from_config(cfg)
    opt = build_optimizer(model.param_groups(), cfg) if optimizer else None
    ranks = {"rng": [], "sums": [], "count": 0}
    t = Training(model, model, opt, None, par=None)
    save_checkpoint(path, t, 1, cfg, {"best_miou": -1.0}, ranks if optimizer else None)
    return path


# ----------------------------------------------------------------------------- dataset
def test_missing_dataset_root(tmp_path, capsys):
    line = fails(argv(tmp_path / "nowhere", tmp_path), capsys)
    assert "nowhere: data root not found" in line and "python -m tools.prepare_voc" in line
    assert not (tmp_path / "run").exists()


def test_missing_sub_folder(data, tmp_path, capsys):
    shutil.rmtree(data / "SegmentationClassAug")
    line = fails(argv(data, tmp_path / "logs"), capsys)
    assert "SegmentationClassAug: folder not found" in line
    assert not (tmp_path / "logs").exists()


def test_list_names_a_missing_image(data, tmp_path, capsys):
    gone = names(data)[3]
    (data / "JPEGImages" / f"{gone}.jpg").unlink()
    line = fails(argv(data, tmp_path / "logs"), capsys)
    assert f"{gone}.jpg: image listed in" in line and "train_aug.txt not found" in line
    assert not (tmp_path / "logs").exists()


def test_undecodable_jpeg_is_caught_before_start(data, tmp_path, capsys):
    bad = data / "JPEGImages" / f"{names(data)[0]}.jpg"
    bad.write_bytes(b"this is not a JPEG")
    line = fails(argv(data, tmp_path / "logs"), capsys)
    assert str(bad) in line
    assert not (tmp_path / "logs").exists()


def test_mask_value_outside_classes(data, tmp_path, capsys):
    mask_path = data / "SegmentationClassAug" / f"{names(data)[1]}.png"
    mask = np.array(Image.open(mask_path))
    mask[:4, :4] = 7  # K = 4: valid values are 0..4 and 255
    Image.fromarray(mask).save(mask_path)
    line = fails(argv(data, tmp_path / "logs"), capsys)
    assert "mask values [7] outside 0..4 and 255" in line and str(mask_path) in line
    assert not (tmp_path / "logs").exists()


def test_corrupt_jpeg_mid_run_is_one_line_through_torchrun(data, tmp_path):
    # A truncated JPEG keeps a valid header, so only decoding it (in a DataLoader worker of
    # rank 1, at step 1) finds it.
    train = names(data)
    victim = train[ResumableSampler(len(train), 2, 1, 2, seed=0).epoch_indices(0)[2]]
    path = data / "JPEGImages" / f"{victim}.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    work = tmp_path / "logs"
    r = launch("cpu", "2", free_port(), *argv(data, work, "data.num_workers=1", "max_iters=4"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, lines  # rank 1's line; no traceback from rank 0 or torchrun
    assert lines[0].startswith(f"error: cannot decode image {path}") and "stopped at step 1" in lines[0]
    ckpt = work / "run" / "checkpoints"
    assert load_file(ckpt / "last.pth")["step"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_1.pth", "last.pth"]
    assert "[rank 1] " + lines[0] in (work / "run" / "train.log").read_text()


def test_sample_error_is_one_line_from_a_worker():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise SampleError("cannot decode image x.jpg: broken data stream")
    with pytest.raises(SampleError) as exc:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(exc.value) == "cannot decode image x.jpg: broken data stream"


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("arg, expect", [
    ("modle.depth=3", "unknown config key 'modle' (did you mean 'model'?)"),
    ("max_iters=ten", "bad value for config key 'max_iters'"),
    ("nan_policy=ignore", "config key 'nan_policy' must be one of stop, skip; got 'ignore'"),
    ("model.patch_size=0", "patch_size must be a positive number of pixels, got 0"),
    ("model.decoder_dim=0", "decoder_dim must be positive, got 0"),
    ("model.decoder_dilation=0", "decoder_dilation must be positive, got 0"),
])
def test_bad_config(pristine, tmp_path, capsys, arg, expect):
    line = fails(argv(pristine, tmp_path / "logs", arg), capsys)
    assert expect in line
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("trained_with, expect", [
    ("data.num_classes=3", "was trained with num_classes=3 but the config gives num_classes=5"),
    ("model.embed_dim=48", "was trained with embed_dim=48 but the config gives embed_dim=32"),
    ("model.depth=4", "was trained with depth=4 but the config gives depth=3"),
    ("model.patch_size=8", "was trained with patch_size=8 but the config gives patch_size=16"),
    ("model.decoder_dim=64", "was trained with decoder_dim=64 but the config gives decoder_dim=512"),
    ("model.decoder_dilation=2",
     "was trained with decoder_dilation=2 but the config gives decoder_dilation=5"),
])
def test_checkpoint_of_another_model(pristine, tmp_path, capsys, trained_with, expect):
    ck = make_checkpoint(tmp_path / "other.pth", trained_with)
    line = fails(argv(pristine, tmp_path / "logs", f"resume={ck}"), capsys)
    assert expect in line
    assert not (tmp_path / "logs").exists()


def test_checkpoint_without_spec_is_checked_by_shape(pristine, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "other.pth", "data.num_classes=3")
    obj = load_file(ck)
    del obj["spec"], obj["meta"]
    torch.save(obj, ck)
    line = fails(argv(pristine, tmp_path / "logs", f"resume={ck}"), capsys)
    assert "does not fit the configured model: encoder.cls_token is (1, 6, 32) there but " \
           "(1, 8, 32) here" in line


def test_weights_only_checkpoint_cannot_resume(pristine, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "iter_1.pth", optimizer=False)
    line = fails(argv(pristine, tmp_path / "logs", f"resume={ck}"), capsys)
    assert "holds weights only" in line


def test_truncated_checkpoint(pristine, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "last.pth")
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    line = fails(argv(pristine, tmp_path / "logs", f"resume={ck}"), capsys)
    assert f"cannot read checkpoint {ck} (truncated or not a PyTorch file?)" in line
    assert not (tmp_path / "logs").exists()


def test_not_a_checkpoint(pristine, tmp_path, capsys):
    ck = tmp_path / "last.pth"
    ck.write_text("not a checkpoint\n")
    line = fails(argv(pristine, tmp_path / "logs", f"resume={ck}"), capsys)
    assert f"cannot read checkpoint {ck} (not a PyTorch file?)" in line
    assert "weights_only` set to `False`" not in line      # torch's advice, wrong here
    assert not (tmp_path / "logs").exists()


class _Foreign:
    pass


def test_checkpoint_with_code_objects(tmp_path):
    ck = tmp_path / "foreign.pth"
    torch.save({"model": {}, "extra": _Foreign}, ck)
    with pytest.raises(CheckpointError) as err:
        load_file(ck)
    msg = str(err.value)
    assert "\n" not in msg and "holds Python objects other than tensors" in msg
    assert "_Foreign" in msg and "weights_only=True" in msg


def test_missing_resume_checkpoint(pristine, tmp_path, capsys):
    line = fails(argv(pristine, tmp_path / "logs", f"resume={tmp_path / 'nope.pth'}"), capsys)
    assert "resume checkpoint not found" in line



def test_missing_pretrained_weight_file(pristine, tmp_path, capsys):
    """A mistyped model.pretrained path stops before the run folder is made, in one line."""
    work = tmp_path / "logs"
    line = fails(argv(pristine, work, f"model.pretrained={tmp_path / 'jx.pth'}"), capsys)
    assert "pretrained weight file not found" in line and "jx.pth" in line
    assert not work.exists()


# ----------------------------------------------------------------------------- run folder
class _ChecksPassed(Exception):
    pass


def checks_passed(cfg, dist):
    """Stands in for the first thing `train` does after its checks (wetr.run.open_run_dir)."""
    raise _ChecksPassed
def test_existing_run_is_never_overwritten(pristine, tmp_path, capsys, monkeypatch):
    run = tmp_path / "logs" / "run"
    make_checkpoint(run / "checkpoints" / "last.pth")
    (run / "train.log").write_text("an earlier run\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(run)

    line = fails(argv(pristine, tmp_path / "logs"), capsys)
    assert f"log folder {run} already holds a run; pass resume=auto" in line
    assert snapshot(run) == before
    # the two ways on pass the checks (stopped right after them: nothing is started or changed)
    monkeypatch.setattr(engine.run, "open_run_dir", checks_passed)
    for extra in ("resume=auto", "overwrite=true"):
        with pytest.raises(_ChecksPassed):
            train_entry(VOC, argv(pristine, tmp_path / "logs", extra))
        assert capsys.readouterr().err == ""
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(gpus: str, nproc: str, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "run_train.sh", "scripts/train_voc.py", gpus, nproc, str(port),
                           "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def test_port_in_use(pristine, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        line = one_line(launch("cpu", "2", s.getsockname()[1], *argv(pristine, tmp_path / "logs")))
    assert "is in use; pick another port" in line
    assert not (tmp_path / "logs").exists()


def test_more_processes_than_gpus(pristine, tmp_path):
    args = argv(pristine, tmp_path / "logs")
    line = one_line(launch("0,1", "3", free_port(), *args))
    assert "GPU_NUMBER=3 but GPU_DEVICE=0,1 lists 2 GPU(s)" in line
    visible = min(torch.cuda.device_count(), 2)
    if visible < 2:  # no silent CPU fallback for more than one process
        line = one_line(launch("0,1", "2", free_port(), *args))
        assert f"GPU_NUMBER=2 but only {visible} GPU(s) visible for GPU_DEVICE=0,1" in line
    assert not (tmp_path / "logs").exists()


def test_bad_key_through_run_train_sh_is_one_line(pristine, tmp_path):
    """Every rank parses the same command line: rank 0 alone reports the mistyped key."""
    line = one_line(launch("cpu", "2", free_port(), *argv(pristine, tmp_path / "logs"),
                           "no_such_key=1"))
    assert "unknown config key 'no_such_key'" in line
    assert not (tmp_path / "logs").exists()


def test_preflight_error_through_run_train_sh(tmp_path):
    line = one_line(launch("cpu", "2", free_port(), *argv(tmp_path / "nowhere", tmp_path / "logs")))
    assert "data root not found" in line
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- shell scripts
@pytest.mark.skipif(not (ROOT / ".venv" / ".requirements.sha").is_file(),
                    reason="needs the set-up .venv/ that run_tests.sh makes")
@pytest.mark.parametrize("errexit, reached", [(True, False), (False, True)])
def test_venv_helper_keeps_the_callers_errexit(errexit, reached):
    """run_demo.sh sources tools/venv.sh under `set -e`: a failed training must stop the script
    (not go on to evaluate a stale checkpoint), so the helper must not switch `set -e` off."""
    script = ("set -e; " if errexit else "") + "source tools/venv.sh; false; echo reached"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert ("reached" in out.stdout) == reached
