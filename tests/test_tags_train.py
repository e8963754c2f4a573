"""Your own dataset end to end (slow: real trainings of a tiny model on CPU): the synthetic set in
the tag format through run_train.sh (2 processes), then the evaluation tools and predict.py with
its class names; K = 1, 2 and 30 train and evaluate; a val split without masks validates the
classifier; a class list that disagrees with the checkpoint is one line."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.synthetic import SyntheticParams, class_names as synthetic_names, make_synthetic
from tools import prepare_tags

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.crop_size=64", "model.pretrained=false", "model.embed_dim=32", "model.depth=3",
        "model.num_heads=2", "batch_size=2", "val.size=64", "cam.scales=[1.0,0.5]",
        "par.num_iter=2", "par.dilations=[1,2]", "loss.after.seg=1", "loss.after.reg=1",
        "log_every=3", "save_every=4", "eval_every=4", "max_iters=6", "log.images=1"]
EVAL = ["size=64", "num_workers=0", "device=cpu", "infer_set=val"]


def env() -> dict:
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def train_1(data: Path, work: Path, tag: str, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "scripts.train_voc", f"tag={tag}", "device=cpu",
                f"work_dir={work}", "data.name=tags", f"data.root={data}", "data.num_workers=0",
                *TINY, *extra])


def evaluate(tool: str, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"tools.{tool}", f"ckpt={ckpt}", *EVAL, *extra])


def random_tags(folder: Path, k: int, n: int, masks: int) -> Path:
    """n random images with random tags of k classes named with spaces ("class 07"), masks for
    the first `masks` images; imported with the CLI. Class k is never tagged in val."""
    rng = np.random.default_rng(k)
    names = [f"class {c:02d}" for c in range(1, k + 1)]
    rows = []
    for i in range(n):
        rel = f"set {i % 3}/img #{i}.{'png' if i % 2 else 'jpg'}"
        (folder / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48 + i % 5, 56, 3), dtype=np.uint8)).save(
            folder / "imgs" / rel)
        tags = sorted(set(rng.integers(0, k, 2).tolist())) if i % 7 else []   # some untagged
        rows.append(f'"{rel}",' + ";".join(names[t] for t in tags))
        if i < masks:
            mask = np.zeros((48 + i % 5, 56), np.uint8)
            for t in tags:
                mask[4 * t % 40:4 * t % 40 + 8, 10:30] = t + 1
            (folder / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(folder / "masks" / (rel + ".png"))
    (folder / "tags.csv").write_text("image,tags\n" + "\n".join(rows) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in names))
    val = [r.split('"')[1] for r in rows[:8] if names[-1] not in r]
    (folder / "val.txt").write_text("\n".join(val) + "\n")
    argv = ["--images", str(folder / "imgs"), "--csv", str(folder / "tags.csv"), "--classes",
            str(folder / "classes.txt"), "--val-list", str(folder / "val.txt"), "--out",
            str(folder / "out")]
    prepare_tags.main(argv + (["--masks", str(folder / "masks")] if masks else []))
    return folder / "out"


def test_synthetic_tags_run_train_sh_evaluate_predict(tmp_path):
    data = tmp_path / "syn"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=2, num_train=16, num_val=4, size=64,
                                              fmt="tags"), progress=False)
    work = tmp_path / "logs"
    r = run(["bash", "run_train.sh", "scripts/train_voc.py", "cpu", "2", str(free_port()), "tg",
             f"work_dir={work}", "data.name=tags", f"data.root={data}", "data.num_workers=1",
             *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = (work / "tg" / "config.yaml").read_text()
    assert "num_classes: 3" in cfg and "train_split: train" in cfg
    records = [json.loads(x) for x in (work / "tg" / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in records if "val/seg_miou" in x]
    names = synthetic_names(2)[1:]
    assert val and all(np.isfinite(x["val/seg_miou"]) for x in val)
    assert {f"val/cls_precision/{n}" for n in names} <= set(val[-1])
    ckpt = work / "tg" / "checkpoints" / "last.pth"
    for tool in ("infer_cam", "infer_seg_voc"):
        r = evaluate(tool, ckpt, f"out_dir={tmp_path / tool}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert all(n in r.stdout + r.stderr for n in names), tool     # the table's class names
    photos = data / "photos" / "nested dir"
    r = run([sys.executable, "tools/predict.py", f"ckpt={ckpt}", f"input={photos / 'ünïcode'}",
             f"out_dir={tmp_path / 'pred'}", "size=64", "device=cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "pred" / "seg").glob("*.png"))) == len(
        list((photos / "ünïcode").iterdir()))


@pytest.mark.parametrize("k,masks", [(1, 0), (30, 3)])
def test_k1_and_k30_train_and_evaluate(tmp_path, k, masks):
    data = random_tags(tmp_path, k, 24, masks)
    r = train_1(data, tmp_path / "logs", "t")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "logs" / "t" / "train.log").read_text()
    # without masks: the classifier is validated and the log says once that mIoU needs masks
    assert log.count("mIoU needs masks") == (0 if masks else 1)
    assert log.count("val classifier: F1") == 2 and f"class {k:02d} P " in log
    records = [json.loads(x) for x in (tmp_path / "logs" / "t" / "metrics.jsonl").read_text()
               .splitlines()]
    val = [x for x in records if "val/f1" in x]
    assert len(val) == 2 and all(np.isfinite(x["val/f1"]) for x in val)
    assert all(np.isfinite(x["val/seg_miou"]) == bool(masks) for x in val)
    assert all(np.isfinite(x["loss/total"]) for x in records if "loss/total" in x)
    # the val line: F1 instead of NaN mIoUs; best.pth by F1 without masks, by Seg mIoU with
    assert ("=nan" in log, log.count("none with a mask: no mIoU")) == (False, 0 if masks else 2)
    best = torch.load(tmp_path / "logs" / "t" / "checkpoints" / "best.pth", weights_only=False)
    key, score = ("best_miou", "val/seg_miou") if masks else ("best_f1", "val/f1")
    assert best["meta"][key] == max(x[score] for x in val) and ("best_f1" in best["meta"]) != bool(masks)
    ckpt = tmp_path / "logs" / "t" / "checkpoints" / "last.pth"
    if not masks:   # a resumed run keeps its best F1: a best no validation can beat stays
        last = torch.load(ckpt, weights_only=False)
        last["meta"]["best_f1"] = 2.0
        torch.save(last, ckpt)
        r = train_1(data, tmp_path / "logs", "t", "max_iters=8", "resume=auto")
        assert r.returncode == 0, r.stderr[-3000:]
        assert torch.load(ckpt, weights_only=False)["meta"]["best_f1"] == 2.0
        assert torch.load(tmp_path / "logs" / "t" / "checkpoints" / "best.pth",
                          weights_only=False)["step"] == best["step"]
    r = evaluate("infer_cam", ckpt, f"out_dir={tmp_path / 'cam'}")
    assert r.returncode == 0, r.stderr[-3000:]
    # without masks: no table of NaNs, one line that says why
    assert (f"class {k:02d}" in r.stdout + r.stderr) == bool(masks)
    assert ("val has no ground-truth masks" in r.stdout + r.stderr) != bool(masks)
    if masks:   # class k is absent from val: marked, and left out of the mean
        scores = json.loads((tmp_path / "cam" / "scores.json").read_text())["scores"]["cam"]
        assert not scores["present"][k] and np.isfinite(scores["miou"])


def test_class_list_that_disagrees_with_the_checkpoint(tmp_path):
    small = random_tags(tmp_path / "a", 2, 12, 2)
    r = train_1(small, tmp_path / "logs", "t", "max_iters=2", "eval_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    big = random_tags(tmp_path / "b", 3, 12, 2)
    r = evaluate("infer_cam", tmp_path / "logs" / "t" / "checkpoints" / "last.pth",
                 f"data.root={big}")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "class_names.txt" in err[0] and "3 classes" in err[0], err
    r = train_1(small, tmp_path / "logs", "u", "data.num_classes=5")
    assert r.returncode == 2 and "data.num_classes=5" in r.stderr and "lists 2" in r.stderr


def test_untagged_images_train_as_background_only(tmp_path):
    """Images with an empty tag cell are kept as background only: batches without any class
    train with finite losses (PAR, the token labels and the losses see zero present classes)."""
    data = random_tags(tmp_path, 2, 12, 0)
    csv = (tmp_path / "tags.csv").read_text().splitlines()
    (tmp_path / "tags.csv").write_text("\n".join([csv[0]] + [r.split(",")[0] + "," for r in csv[1:]])
                                       + "\n")
    prepare_tags.main(["--images", str(tmp_path / "imgs"), "--csv", str(tmp_path / "tags.csv"),
                       "--classes", str(tmp_path / "classes.txt"), "--out", str(data)])
    meta = json.loads((data / "tags.json").read_text())
    assert meta["counts"]["untagged"] == 12
    r = train_1(data, tmp_path / "logs", "t", "max_iters=4", "eval_every=4")
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "logs" / "t" / "metrics.jsonl").read_text()
               .splitlines()]
    losses = [x["loss/total"] for x in records if "loss/total" in x]
    assert losses and all(np.isfinite(losses))
