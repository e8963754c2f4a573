"""The README's command lines, as written: every line of its ```bash blocks names an entry that
exists and passes only keys (and flags) that entry accepts (checked in-process through the
entry's own `--print-config` / argument parser, which exit before any data or device is
touched); and COCO's chain (prepare_coco -> run_train.sh -> run_evaluate_seg_coco.sh, both
forms) runs end to end on a tiny generated COCO (slow: a real training of a tiny model)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.coco import CLASS_NAMES
from datasets.voc import read_cls_labels, read_mask, read_name_list

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- README's commands
def readme_commands(text: str) -> list[list[str]]:
    """The command lines of the ```bash blocks of a Markdown text, backslash continuations
    joined, comments dropped, each split as the shell would (shlex)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [tokens for tokens in (shlex.split(line, comments=True) for line in lines) if tokens]


def _placeholder(token: str) -> bool:
    """`[gpu_device]`, `[key=value ...]`, `data.root=...`: shown for the reader to fill in."""
    return token.startswith("[") or "..." in token


class _Parsed(Exception):
    """An argparse entry parsed its arguments: stop before it does any work."""


def _module(path: str) -> str:
    return os.path.splitext(os.path.normpath(path))[0].replace(os.sep, ".")


def _entry_problems(module: str, args: list[str]) -> list[str]:
    """Run entry `module` in this process on `args` (placeholders dropped) up to its parsed
    arguments: key=value entries with `--print-config` (or the `--help` given), argparse ones
    stopped right after `parse_args`. -> the error lines it printed, if it refused them."""
    path = REPO / (module.replace(".", os.sep) + ".py")
    if not path.is_file():
        return [f"no such entry: {module}"]
    args = [a for a in args if not _placeholder(a)]
    argparse_entry = re.search(r"^(import|from) argparse", path.read_text(), re.M)
    if not argparse_entry and not {"-h", "--help", "--print-config"} & set(args):
        args.append("--print-config")
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        real(self, *a, **kw)
        raise _Parsed

    err, saved = io.StringIO(), sys.argv
    sys.argv = [str(path.relative_to(REPO)), *args]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():   # runpy: an entry other tests imported already
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        return [f"{module} {shlex.join(args)}: ran past its argument parsing"]
    except _Parsed:
        return []
    except SystemExit as exc:
        if exc.code in (0, None):
            return []
        return [f"{module} {shlex.join(args)}: exit {exc.code}: {err.getvalue().strip()[-300:]}"]
    finally:
        argparse.ArgumentParser.parse_args = real
        sys.argv = saved


def _kv(key: str, value: str) -> list[str]:
    """A positional argument the launcher passes on as key=value (nothing for a placeholder)."""
    return [] if _placeholder(value) else [f"{key}={value}"]


def _launcher_problems(script: str, args: list[str]) -> list[str]:
    """A run_*.sh line -> the problems of what it launches (its positional arguments as the
    script reads them; key=value arguments checked by the entries it starts)."""
    if script == "run_train.sh":   # SCRIPT GPU_DEVICE GPU_NUMBER MASTER_PORT TAG key=value...
        if len(args) < 5:
            return [f"run_train.sh needs 5 arguments: {shlex.join(args)}"]
        return _entry_problems(_module(args[0]), [*_kv("tag", args[4]), *args[5:]])
    if script == "run_evaluate_seg_coco.sh":   # SCRIPT GPU NPROC [INFER_SET] CHECKPOINT kv...
        if len(args) < 4:
            return [f"run_evaluate_seg_coco.sh needs 4 or 5 arguments: {shlex.join(args)}"]
        entry, rest = args[0], args[3:]
        if rest[0].endswith(".pth") or rest[0] == "[checkpoint_path]":
            rest = ["val", *rest]   # no INFER_SET: the full val list, as the script does
        if len(rest) < 2:
            return [f"run_evaluate_seg_coco.sh: no checkpoint in {shlex.join(args)}"]
        return _entry_problems(_module(entry), [*_kv("infer_set", rest[0]),
                                                *_kv("ckpt", rest[1]), *rest[2:]])
    tools = {"run_evaluate_voc.sh": ["tools.infer_cam", "tools.infer_lam", "tools.infer_seg_voc"],
             "run_export_pseudo_masks.sh": ["tools.export_pseudo_masks"]}.get(script)
    if tools is not None:   # GPU_DEVICE GPU_NUMBER CHECKPOINT key=value...
        if len(args) < 3:
            return [f"{script} needs 3 arguments: {shlex.join(args)}"]
        return [p for t in tools for p in _entry_problems(t, [*_kv("ckpt", args[2]), *args[3:]])]
    return []   # run_demo.sh, run_tests.sh: no key=value arguments


def _python_problems(module: str, args: list[str]) -> list[str]:
    """An entry's own keys; paper_table passes the keys that are not its own to the evaluation
    tools (InferConfig), so those are checked there."""
    problems = _entry_problems(module, args)
    if module == "tools.paper_table" and not problems and "--help" not in args:
        from tools.paper_table import split_argv
        extra = split_argv([a for a in args if not _placeholder(a)])[2]
        problems = _entry_problems("tools.infer_seg_voc", extra)
    return problems


def command_problems(tokens: list[str]) -> list[str]:
    """What is wrong with one README command line (tokens): a missing file or module, a key or
    flag its entry refuses. Programs other than bash / source / python / torchrun are refused,
    so that a new kind of command gets a check here."""
    program, args = tokens[0], tokens[1:]
    if program in ("bash", "source"):
        if not (REPO / args[0]).is_file():
            return [f"no such file: {args[0]}"]
        return _launcher_problems(args[0], args[1:]) if program == "bash" else []
    if program in ("python", "torchrun"):
        while program == "torchrun" and args and args[0].startswith("-") and args[0] != "-m":
            args = args[1:]   # torchrun's own flags
        if not args:
            return [f"no entry in: {shlex.join(tokens)}"]
        if args[0] == "-m":
            return _python_problems(args[1], args[2:])
        if not (REPO / args[0]).is_file():
            return [f"no such file: {args[0]}"]
        return _python_problems(_module(args[0]), args[1:])
    return [f"unknown program {program!r} in: {shlex.join(tokens)}"]


def test_every_readme_command_names_real_entries_and_keys():
    commands = readme_commands((REPO / "README.md").read_text())
    programs = {c[0] for c in commands}
    assert {"bash", "python"} <= programs and len(commands) >= 20
    problems = [p for c in commands for p in command_problems(c)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", ["USAGE.md", "OWN_DATASET.md", "PAPER_TABLE.md"])
def test_every_docs_command_names_real_entries_and_keys(page):
    """The docs pages the README sends readers to hold commands too: the same check."""
    commands = readme_commands((REPO / "docs" / page).read_text())
    assert commands
    problems = [p for c in commands for p in command_problems(c)]
    assert not problems, "\n".join(problems)


GOOD = """
```bash
bash run_train.sh scripts/train_coco.py 0,1 2 29501 train_coco data.root=data/COCO batch_size=4 \\
    loss.weights.cle=0.05 eval_late_from=-1   # a comment
# a comment line
bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0 1 best.pth size=64
python -m tools.prepare_coco --root data/COCO --workers 8
torchrun --nproc_per_node=2 scripts/train_voc.py data.root=...
bash run_evaluate_voc.sh [gpu_device] [gpu_number] [checkpoint_path] [key=value ...]
```
"""


@pytest.mark.parametrize("line, words", [
    ("bash run_train.sh scripts/train_coco.py 0,1 2 29501 train_coco loss.weights.clee=0.05",
     ["scripts.train_coco", "loss.weights.clee"]),
    ("bash run_train.sh scripts/train_coco.py 0 1 29501 train_coco \\\n    eval_every=often",
     ["eval_every"]),
    ("bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0 1 val best.pth szie=64", ["szie"]),
    ("bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0 1 best.pth crf=maybe", ["crf"]),
    ("bash run_evaluate_voc.sh 0 1 best.pth cam2seg=true infer_sett=test", ["infer_sett"]),
    ("bash run_export_pseudo_masks.sh 0 1 best.pth multiscale=true", ["multiscale"]),
    ("python -m tools.prepare_coco --root data/COCO --wrkers 8", ["--wrkers"]),
    ("python tools/predict.py ckpt=best.pth inputs=photos/", ["inputs"]),
    ("python tools/paper_table.py logs/train_voc run=true gpu=0,1", ["gpu"]),
    ("python scripts/train_cocoa.py --print-config", ["scripts/train_cocoa.py"]),
    ("bash run_evaluate.sh 0 1 best.pth", ["run_evaluate.sh"]),
    ("torchrun --nproc_per_node=2 -m tools.infer_seg_vok ckpt=x", ["tools.infer_seg_vok"]),
    ("pip install moré", ["unknown program"]),
])
def test_a_bad_readme_command_is_reported(line, words):
    """README-like good lines (test below) with one bad line: that line is named."""
    bad = GOOD[:GOOD.rindex("```")] + line + "\n```\n"
    problems = [p for c in readme_commands(bad) for p in command_problems(c)]
    assert len(problems) >= 1, line
    assert all(w in "\n".join(problems) for w in words), problems


def test_good_readme_like_lines_pass():
    assert len(readme_commands(GOOD)) == 5
    assert [p for c in readme_commands(GOOD) for p in command_problems(c)] == []


# ------------------------------------------------------------------------- COCO's chain
# the 80 official category ids (1..90 with gaps), in the json's order; classes 1..80 by id
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
TINY = ["work_dir={work}", "model.pretrained=false", "model.embed_dim=32", "model.depth=3",
        "model.num_heads=2", "model.patch_size=8", "data.crop_size=64", "data.num_workers=0",
        "val.size=64", "cam.scales=[1.0,0.5]", "cam.cam2mask=2", "par.num_iter=2",
        "par.dilations=[1,2]", "loss.after.cle=0", "loss.after.une=0", "loss.after.ptc=0",
        "loss.after.seg=1", "loss.after.reg=1", "max_iters=4", "log_every=2", "save_every=2",
        "eval_every=2", "eval_late_from=3", "eval_every_late=1", "log.images=1",
        "global_batch=4"]


def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def fake_coco(root: Path) -> dict[str, np.ndarray]:
    """COCO/JPEGImages/{train2014,val2014} (4 + 3 tiny JPEGs, one val image without any
    annotation) and COCO/annotations/instances_*.json with the 80 official categories; objects of
    person (id 1), car (3) and dog (18) as polygons and one compressed RLE, each painted in its
    own colour. -> the expected masks by name (values: classes 1, 3, 17)."""
    from pycocotools import mask as mask_utils
    colour = {1: (220, 40, 40), 3: (40, 200, 60), 18: (50, 70, 230)}
    index = {cid: i + 1 for i, cid in enumerate(COCO_IDS)}
    rng = np.random.default_rng(0)
    expected = {}
    (root / "annotations").mkdir(parents=True)
    for subset, n in (("train2014", 4), ("val2014", 3)):
        images, anns = [], []
        (root / "JPEGImages" / subset).mkdir(parents=True)
        for i in range(1, n + 1):
            h, w = 48 + 8 * i, 64
            name = f"COCO_{subset}_{i:012d}"
            rgb = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            objects = [] if subset == "val2014" and i == n else \
                [(1 if i % 2 else 18, (4, 4, 30, 28)), (3, (34, 20, 60, h - 4))]
            for cid, (x0, y0, x1, y1) in objects:
                segm = _polygon(x0, y0, x1, y1)
                if cid == 18:   # compressed RLE, as crowd and some instances are in the files
                    box = np.zeros((h, w), np.uint8, order="F")
                    box[y0:y1, x0:x1] = 1
                    segm = mask_utils.encode(box)
                    segm["counts"] = segm["counts"].decode("ascii")
                rle = segm if cid == 18 else mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
                drawn = mask_utils.decode(rle).astype(bool)   # pycocotools' own, as annToMask
                rgb[drawn] = colour[cid]
                mask[drawn] = index[cid]   # the two objects are disjoint: no rule applies
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid,
                             "iscrowd": 0, "segmentation": segm, "area": float(drawn.sum())})
            Image.fromarray(rgb).save(root / "JPEGImages" / subset / f"{name}.jpg", quality=95)
            images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
            if objects:
                expected[name] = mask
        cats = [{"id": cid, "name": CLASS_NAMES[index[cid]]} for cid in COCO_IDS]
        (root / "annotations" / f"instances_{subset}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run(tokens: list[str]) -> subprocess.CompletedProcess:
    """A command line as the README shows it, from the repository root (`python` is this venv's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable if t == "python" else t for t in tokens]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _readme_line(pattern: str) -> list[str]:
    """The one README command whose text matches `pattern` (a regex, whole line)."""
    found = [c for c in readme_commands((REPO / "README.md").read_text())
             if re.fullmatch(pattern, shlex.join(c))]
    assert len(found) == 1, (pattern, found)
    return found[0]


def _swap(tokens: list[str], old: str, new: str) -> list[str]:
    """`old` -> `new` inside each token (a path or a value), checked to be there."""
    assert any(old in t for t in tokens), (old, tokens)
    return [t.replace(old, new) for t in tokens]


@pytest.mark.slow
def test_readme_coco_chain_on_tiny_generated_coco(tmp_path):
    """README's COCO commands, as written but for the data folder, the devices (cpu, 1 process),
    the port and tiny-model overrides: prepare_coco, run_train.sh, then both forms of
    run_evaluate_seg_coco.sh, which evaluate the full val list alike."""
    coco, work = tmp_path / "COCO", tmp_path / "logs"
    masks = fake_coco(coco)
    prepare = _readme_line(r"python -m tools.prepare_coco --root data/COCO --workers 8")
    prepare = _swap(prepare, "data/COCO", str(coco))
    prepare[prepare.index("--workers") + 1] = "2"
    r = _run(prepare)
    assert r.returncode == 0, r.stderr[-3000:]
    lists = coco / "ImageSets" / "Segmentation"
    names = {s: read_name_list(str(lists / f"{s}.txt")) for s in ("train", "val", "val_part")}
    assert names["train"] == [f"COCO_train2014_{i:012d}" for i in (1, 2, 3, 4)]
    assert names["val"] == names["val_part"] == [f"COCO_val2014_{i:012d}" for i in (1, 2)]
    for name, want in masks.items():
        subset, image_id = name.split("_")[1:]
        got = read_mask(str(coco / "SegmentationClass" / subset / f"{image_id}.png"))
        np.testing.assert_array_equal(got, want, err_msg=name)
    label_names, labels = read_cls_labels(str(lists / "cls_labels.npz"))
    assert label_names == sorted(masks) and labels.shape == (6, 80)
    assert {CLASS_NAMES[c + 1] for c in np.flatnonzero(labels.any(0))} == {"person", "car", "dog"}

    train = _readme_line(r"bash run_train.sh scripts/train_coco.py 0,1 2 29501 train_coco "
                         r"data.root=data/COCO")
    train = _swap(train, "data/COCO", str(coco))
    train[3:6] = ["cpu", "1", str(_free_port())]
    r = _run(train + [a.format(work=work) for a in TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    log = (work / "train_coco" / "train.log").read_text()
    assert "effective batch 4 = 2 image(s) x 1 process(es) x 2 micro-batch(es)" in log
    records = [json.loads(x) for x in (work / "train_coco" / "metrics.jsonl").read_text()
               .splitlines()]
    val_steps = [x["step"] for x in records if "val/seg_miou" in x]
    assert val_steps == [2, 3, 4]   # every 2, then every step from eval_late_from
    ckpt = work / "train_coco" / "checkpoints" / "best.pth"
    assert ckpt.is_file()

    evaluate = _readme_line(r"bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0,1 2 val "
                            r"logs/train_coco/checkpoints/best.pth")
    shown = [c for c in readme_commands((REPO / "README.md").read_text())
             if c[1] == "run_evaluate_seg_coco.sh" and len(c) == 6 and not _placeholder(c[-1])]
    assert shown in ([], [evaluate[:5] + evaluate[6:]])   # the README's line without INFER_SET
    evaluate = _swap(evaluate, "logs/", f"{work}/")
    evaluate[3:5] = ["cpu", "1"]
    out = work / "train_coco" / "eval" / "best" / "infer_seg_coco_val"
    fast = ["size=64", "num_workers=0"]
    scores = []
    for form in (evaluate, evaluate[:5] + evaluate[6:]):   # with INFER_SET, then without
        r = _run(form + fast)
        assert r.returncode == 0, r.stderr[-3000:]
        record = json.loads((out / "scores.json").read_text())
        assert (record["split"], record["images"], record["dataset"]) == ("val", 2, "coco")
        assert record["config"]["multi_scale"] is True and record["scales"] == [1.0, 1.25, 1.5]
        scores.append(record["scores"])
        (out / "scores.json").rename(out / f"scores_{len(scores)}.json")
    assert scores[0] == scores[1] and np.isfinite(scores[0]["seg"]["miou"])
