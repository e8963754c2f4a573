"""Every entry answers --help with every config key (type, resolved default, meaning from the
fields' metadata) and --print-config with the resolved YAML, without touching data."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tools.cli import parse_cli, schema_keys
from utils.config import option
from wetr.config import TrainConfig, make_config

REPO = Path(__file__).resolve().parents[1]


def _schemas():
    from tools.benchmark import DEFAULTS as BENCH, BenchConfig
    from tools.config import InferConfig
    from tools.export_pseudo_masks import ExportConfig
    from tools.paper_table import PaperTableConfig
    from tools.predict import PredictConfig
    from scripts.train_coco import COCO
    from scripts.train_demo import DEMO
    from scripts.train_voc import VOC
    return {"scripts/train_voc.py": (TrainConfig, VOC), "scripts/train_coco.py": (TrainConfig, COCO),
            "scripts/train_demo.py": (TrainConfig, DEMO),
            **{f"tools/{t}.py": (InferConfig, None) for t in
               ("infer_cam", "infer_lam", "infer_seg_voc", "infer_seg_coco")},
            "tools/benchmark.py": (BenchConfig, BENCH), "tools/predict.py": (PredictConfig, None),
            "tools/export_pseudo_masks.py": (ExportConfig, None),
            "tools/paper_table.py": (PaperTableConfig, None)}


LAUNCH = {"scripts/train_voc.py": "bash run_train.sh scripts/train_voc.py [gpu_device] [gpu_number] "
                                  "[master_port] train_voc",
          "scripts/train_coco.py": "bash run_train.sh scripts/train_coco.py [gpu_device] "
                                   "[gpu_number] [master_port] train_coco",
          "tools/infer_seg_voc.py": "bash run_evaluate_voc.sh [gpu_device] [gpu_number] "
                                    "[checkpoint_path]",
          "tools/infer_seg_coco.py": "bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py",
          "tools/predict.py": "torchrun --nproc_per_node=[gpu_number] tools/predict.py",
          "tools/export_pseudo_masks.py": "bash run_export_pseudo_masks.sh [gpu_device] "
                                          "[gpu_number] [checkpoint_path]"}


@pytest.mark.parametrize("prog", list(_schemas()))
def test_help_lists_every_key_with_meaning(prog, capsys):
    schema, defaults = _schemas()[prog]
    outs = []
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as info:
            parse_cli(["max_iters=3", flag], schema, defaults, prog=prog)
        assert info.value.code == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    text = outs[0].split("keys (type, default, meaning):\n")
    assert text[0].startswith(f"usage: python {prog} [key=value ...]")
    assert LAUNCH.get(prog, "") in text[0]
    rows = {line.split()[0]: line for line in text[1].splitlines()}
    keys = schema_keys(schema)
    assert len(rows) == len(keys)
    for key, typ, meaning in keys:
        assert meaning, f"{prog}: config key {key} has no help"
        assert key in rows and typ in rows[key] and rows[key].rstrip().endswith(meaning), key


def test_help_shows_the_entrys_resolved_defaults(capsys):
    from scripts.train_coco import COCO
    with pytest.raises(SystemExit):
        parse_cli(["--help"], TrainConfig, COCO, prog="scripts/train_coco.py")
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[8:]}
    assert rows["data.num_classes"][2] == "81" and rows["max_iters"][2] == "80000"
    assert rows["cam.scales"][2:7] == ["[1.0,", "0.5,", "0.75,", "1.25,", "1.5]"]
    assert rows["log.tensorboard"][1:3] == ["bool", "true"]


@dataclass
class _Inner:
    ratio: float = option(0.5, "how much")


@dataclass
class _Schema:
    mode: str = option("a", "which mode", choices=("a", "b"))
    sizes: list[int] = option([1, 2], "some sizes")
    inner: _Inner = field(default_factory=_Inner)


def test_help_is_the_fields_metadata(capsys):
    """A key's help line is its `option(...)` help, with its type and the resolved default."""
    with pytest.raises(SystemExit):
        parse_cli(["--help"], _Schema, {"inner": {"ratio": 0.25}}, prog="tools/x.py")
    rows = {line.split()[0]: line.split(None, 3) for line in
            capsys.readouterr().out.split("meaning):\n")[1].splitlines()}
    assert rows == {"mode": ["mode", "str", "a", "which mode"],
                    "sizes": ["sizes", "list[int]", "[1,", "2]  some sizes"],
                    "inner.ratio": ["inner.ratio", "float", "0.25", "how much"]}


def test_print_config_is_the_resolved_yaml(capsys):
    from scripts.train_coco import COCO
    with pytest.raises(SystemExit) as info:
        parse_cli(["--print-config", "max_iters=5", "log.tensorboard=false"], TrainConfig, COCO,
                  prog="scripts/train_coco.py")
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = dict(make_config(COCO, ["max_iters=5", "log.tensorboard=false"]))
    from omegaconf import OmegaConf
    assert printed == OmegaConf.to_container(OmegaConf.create(want))
    assert printed["max_iters"] == 5 and printed["data"]["num_classes"] == 81
    assert printed["log"]["tensorboard"] is False


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_entries_run_as_modules_and_print_config_touches_nothing(tmp_path):
    r = _run("-m", "scripts.train_voc", "--print-config", f"data.root={tmp_path / 'none'}",
             f"work_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["data"]["root"] == str(tmp_path / "none")
    assert list(tmp_path.iterdir()) == []
    r = _run("-m", "scripts.train_voc", "--print-config", "maxiters=1")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: unknown config key 'maxiters' (did you mean 'max_iters'?)")


def _installed() -> bool:
    try:
        importlib.metadata.distribution("more-py")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(), reason="project not installed: source tools/venv.sh")
@pytest.mark.parametrize("entry", ["scripts/train_demo.py", "tools/infer_lam.py",
                                   "tools/benchmark.py", "tools/predict.py", "tools/prepare_voc.py",
                                   "tools/prepare_tags.py", "tools/export_pseudo_masks.py",
                                   "tools/paper_table.py", "tools/summarize.py"])
def test_entries_run_as_files(entry):
    """`python path/file.py` (no sys.path edits: the editable install finds the packages)."""
    r = _run(entry, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")
