"""tools/paper_table.py: the paper's table of a run, on fake run folders with hand-written
metrics.jsonl and scores.json files (numbers, differences, missing rows, Markdown and JSON), the
commands run=true starts, and (slow) the real chain on a tiny trained checkpoint."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import paper_table

ROOT = Path(__file__).resolve().parents[1]
SEVEN = [1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0]
# METHOD.md §8 reference figures
PAPER_VOC_VAL, PAPER_VOC_TEST, PAPER_COCO_VAL = 76.4, 75.0, 47.4
LOG_VOC = {"cam": 75.0, "aux_cam": 70.3, "lam": 73.4, "fused": 72.6, "seg": 72.1}
LOG_COCO = {"cam": 49.1, "aux_cam": 41.0, "lam": 45.2, "fused": 48.5, "seg": 47.3}


def write_scores(run: Path, folder: str, tool: str, split: str, scales: list, mious: dict,
                 max_images: int = 0) -> Path:
    path = run / "eval" / "last" / folder / "scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"tool": tool, "checkpoint": str(run / "checkpoints" / "last.pth"), "step": 20000,
           "dataset": "voc", "split": split, "images": 7, "scales": scales,
           "scores": {v: {"miou": m, "iou": [m]} for v, m in mious.items()},
           "config": {"max_images": max_images}}
    path.write_text(json.dumps(rec))
    return path


def make_run(tmp_path: Path, dataset: str = "voc", aux: bool = True) -> Path:
    run = tmp_path / f"run_{dataset}"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.pth"
    ckpt.write_bytes(b"weights")
    old = time.time() - 100
    os.utime(ckpt, (old, old))   # written before its evaluations
    k = {"voc": 21, "coco": 81}[dataset]
    (run / "config.yaml").write_text(f"batch_size: 2\ndata:\n  name: {dataset}\n  num_classes: {k}\n")
    (run / "train.log").write_text("12:00 MoRe-py abc | torch 2 | device cuda:0 x 2 | H200\n")
    last = {"step": 20000, "val/cam_miou": 0.7312, "val/lam_miou": 0.7021,
            "val/fused_miou": 0.7133, "val/seg_miou": 0.6987, "val/f1": 0.9}
    if aux:
        last["val/aux_cam_miou"] = 0.6544
    lines = [{"step": 10000, "loss/total": 1.0},
             {"step": 10000, "val/cam_miou": 0.5, "val/lam_miou": 0.5, "val/fused_miou": 0.5,
              "val/seg_miou": 0.5, "val/f1": 0.5}, {"step": 20000, "loss/total": 0.5}, last]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def target(run: Path, **kw) -> paper_table.Target:
    ds = paper_table.detect_dataset(run)
    return paper_table.Target(run, run / "checkpoints" / "last.pth", ds, **kw)


def rows_by_key(table: dict) -> dict:
    return {r["key"]: r for r in table["rows"]}


@pytest.fixture
def voc_run(tmp_path):
    run = make_run(tmp_path)
    write_scores(run, "infer_cam_train_ms", "infer_cam", "train", SEVEN, {"cam": 0.7766, "cam_crf": 0.8012})
    write_scores(run, "infer_cam_train", "infer_cam", "train", [1.0], {"cam": 0.7011, "cam_crf": 0.7222})
    write_scores(run, "infer_lam_train_ms", "infer_lam", "train", SEVEN, {"lam": 0.1})
    write_scores(run, "infer_seg_voc_val", "infer_seg_voc", "val", [1.0, 1.25, 1.5], {"seg": 0.7455})
    write_scores(run, "cam2seg_val", "cam2seg", "val", SEVEN, {"lam": 0.7401, "lam_crf": 0.7633})
    return run


def test_voc_rows_numbers_differences_and_missing_rows(voc_run):
    table = paper_table.build_table(target(voc_run, gpus="0,1", nproc=2))
    rows = rows_by_key(table)
    assert rows["voc/seed"]["value"] == pytest.approx(100 * 0.7766)     # multi-scale preferred
    assert rows["voc/mask"]["value"] == pytest.approx(100 * 0.8012)
    assert rows["voc/seg_val"]["value"] == pytest.approx(100 * 0.7455)
    lam = rows["voc/lam_seg_val_crf"]
    assert lam["value"] == pytest.approx(100 * 0.7633) and lam["paper"] == PAPER_VOC_VAL
    assert lam["diff_paper"] == pytest.approx(100 * 0.7633 - PAPER_VOC_VAL)
    assert rows["voc/lam_seg_val"]["paper"] is None and rows["voc/lam_seg_val"]["diff_paper"] is None
    # scores.json of the seg head has no CRF variant: not run, with the command that writes it
    missing = rows["voc/seg_val_crf"]
    assert missing["value"] is None and missing["status"] == "not run"
    assert missing["command"] == (f"bash run_evaluate_voc.sh 0,1 2 {voc_run}/checkpoints/last.pth "
                                  "multi_scale=true crf=true")
    test = rows["voc/lam_seg_test"]
    assert test["status"] == "not run" and test["paper"] == PAPER_VOC_TEST
    assert "infer_set=test" in test["command"]
    # validation during training: the last record (step 20000), aux CAM included
    for k, ref in LOG_VOC.items():
        r = rows[f"train_val/{k}"]
        want = 100 * {"cam": 0.7312, "aux_cam": 0.6544, "lam": 0.7021, "fused": 0.7133,
                      "seg": 0.6987}[k]
        assert r["value"] == pytest.approx(want) and r["log"] == ref
        assert r["diff_log"] == pytest.approx(want - ref) and r["step"] == 20000
    assert table["batch"] == {"batch_size": 2, "processes": 2, "global_batch": None, "effective": 4}
    assert all(r["status"] == "ok" for k, r in rows.items()
               if k not in ("voc/seg_val_crf", "voc/lam_seg_test"))


def test_single_scale_seeds_stale_and_partial(voc_run):
    rows = rows_by_key(paper_table.build_table(target(voc_run, multi_scale_seeds=False)))
    assert rows["voc/seed"]["value"] == pytest.approx(100 * 0.7011)
    assert rows["voc/mask"]["value"] == pytest.approx(100 * 0.7222)
    assert "multi_scale" not in rows["voc/seed"]["command"]
    write_scores(voc_run, "cam2seg_val", "cam2seg", "val", SEVEN, {"lam_crf": 0.5}, max_images=3)
    ckpt = voc_run / "checkpoints" / "last.pth"
    later = time.time() + 100
    os.utime(ckpt, (later, later))   # the checkpoint was saved again after its evaluations
    rows = rows_by_key(paper_table.build_table(target(voc_run)))
    assert rows["voc/seed"]["status"] == "stale" and rows["voc/lam_seg_val_crf"]["status"] == "stale"
    os.utime(ckpt, (1, 1))
    rows = rows_by_key(paper_table.build_table(target(voc_run)))
    assert rows["voc/lam_seg_val_crf"]["status"] == "partial"
    # a cap above the split's size (7 images here) leaves the whole split: not partial
    write_scores(voc_run, "cam2seg_val", "cam2seg", "val", SEVEN, {"lam_crf": 0.5}, max_images=100)
    rows = rows_by_key(paper_table.build_table(target(voc_run)))
    assert rows["voc/lam_seg_val_crf"]["status"] == "ok"
    assert rows["voc/lam_seg_val"]["status"] == "not run"   # that record has no "lam"


def test_effective_batch_is_global_batch_when_the_config_has_one(tmp_path):
    run = make_run(tmp_path)
    (run / "config.yaml").write_text("batch_size: 2\nglobal_batch: 8\ndata:\n  name: voc\n")
    assert paper_table.effective_batch(run) == {"batch_size": 2, "processes": 2,
                                                "global_batch": 8, "effective": 8}
    (run / "train.log").unlink()
    assert paper_table.effective_batch(run)["processes"] is None


def test_coco_val_and_val_part_are_named_apart(tmp_path):
    run = make_run(tmp_path, "coco", aux=False)
    seg = [1.0, 1.25, 1.5]
    write_scores(run, "infer_seg_coco_val", "infer_seg_coco", "val", seg, {"seg": 0.45, "seg_crf": 0.4678})
    write_scores(run, "infer_seg_coco_val_part", "infer_seg_coco", "val_part", seg, {"seg": 0.44})
    table = paper_table.build_table(target(run))
    rows = rows_by_key(table)
    full, part = rows["coco/seg_val_crf"], rows["coco/seg_val_part"]
    assert full["value"] == pytest.approx(46.78) and full["paper"] == PAPER_COCO_VAL
    assert full["diff_paper"] == pytest.approx(46.78 - PAPER_COCO_VAL)
    assert part["value"] == pytest.approx(44.0) and part["paper"] is None
    assert "40 137" in full["label"] and "5 000" in part["label"]
    assert rows["coco/seg_val_part_crf"]["status"] == "not run"
    assert rows["coco/seg_val_part_crf"]["command"].startswith(
        "bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0 1 val_part ")
    assert "train_val/aux_cam" not in rows   # not logged by this run
    assert rows["train_val/seg"]["diff_log"] == pytest.approx(69.87 - LOG_COCO["seg"])


def test_markdown_and_json_written_into_the_run(voc_run, capsys):
    table = paper_table.main([str(voc_run)])
    saved = json.loads((voc_run / "paper_table.json").read_text())
    assert saved == json.loads(json.dumps(table))
    md = (voc_run / "paper_table.md").read_text()
    assert md == capsys.readouterr().out
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    lam = rows_by_key(table)["voc/lam_seg_val_crf"]
    cells = [c.strip() for c in lines[lam["label"]].split("|")[1:-1]]
    assert cells[1:4] == [f"{100 * 0.7633:.1f}", f"{PAPER_VOC_VAL:.1f}",
                          f"{100 * 0.7633 - PAPER_VOC_VAL:+.1f}"]
    cam = [c.strip() for c in lines["validation during training: CAM"].split("|")[1:-1]]
    assert cam[1] == f"{73.12:.1f}" and cam[4:6] == [f"{LOG_VOC['cam']:.1f}", f"{73.12 - 75.0:+.1f}"]
    crf = [c.strip() for c in lines["Seg head on val, multi-scale + CRF"].split("|")[1:-1]]
    assert crf[1] == "not run" and crf[6] == f"`{rows_by_key(table)['voc/seg_val_crf']['command']}`"
    assert "effective batch 4 (batch_size 2 x 2 process(es);" in md


def test_other_keys_go_to_the_commands_shown(voc_run, capsys):
    table = paper_table.main([str(voc_run), "size=96", "data.root=/d"])
    row = rows_by_key(table)["voc/seg_val_crf"]
    assert row["command"].endswith("multi_scale=true crf=true size=96 data.root=/d")


def test_run_true_runs_each_missing_command_once(voc_run, monkeypatch, capsys):
    ran = []

    def fake_run(cmd, cwd):
        ran.append(cmd)
        write_scores(voc_run, "infer_seg_voc_val", "infer_seg_voc", "val", [1.0], {"seg": 0.7, "seg_crf": 0.72})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(paper_table.subprocess, "run", fake_run)
    table = paper_table.main([str(voc_run), "run=true", "gpus=cpu", "size=96"])
    ckpt = str(voc_run / "checkpoints" / "last.pth")
    assert ran == [["bash", "run_evaluate_voc.sh", "cpu", "1", ckpt, "multi_scale=true", "crf=true",
                    "size=96"]]   # the test row is never run; the other rows had scores
    assert rows_by_key(table)["voc/seg_val_crf"]["value"] == pytest.approx(72.0)
    ran.clear()
    paper_table.main([str(voc_run), "run=true", "rerun=true"])
    assert [c[5] for c in ran] == ["multi_scale=true", "cam2seg=true"]


@pytest.mark.parametrize("argv, words", [
    (["run=true", "crf=false"], ["crf=", "set by paper_table"]),
    (["ckpt=best", "run=true"], ["checkpoint not found", "best.pth"]),
    (["dataset=ade"], ["dataset", "voc, coco or auto"]),
])
def test_user_errors_are_one_line(voc_run, argv, words):
    proc = subprocess.run([sys.executable, "tools/paper_table.py", str(voc_run), *argv], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert all(w in err[0] for w in words), err[0]


@pytest.mark.slow
def test_real_chain_on_a_tiny_checkpoint(tmp_path):
    """Synthetic data, 2 training steps through run_train.sh, then run=true: the real
    evaluation scripts write the scores.json files the table reads."""
    from datasets.synthetic import SyntheticParams, make_synthetic
    data = tmp_path / "syn"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=4, num_train=4, num_val=2, size=48),
                   progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    train = ["bash", "run_train.sh", "scripts/train_demo.py", "cpu", "1", str(port), "tiny",
             f"data.root={data}", f"work_dir={tmp_path}", "max_iters=2", "batch_size=2",
             "model.embed_dim=32", "model.depth=3", "model.num_heads=2", "data.crop_size=48",
             "val.size=48", "eval_every=2", "data.num_workers=0"]
    assert subprocess.run(train, cwd=ROOT, env=env, capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "tools/paper_table.py", str(tmp_path / "tiny"),
                           "run=true", "gpus=cpu", "size=32", "max_images=2", "num_workers=0",
                           "crf_workers=0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((tmp_path / "tiny" / "paper_table.json").read_text())
    rows = rows_by_key(table)
    for key in ("seed", "mask", "seg_val", "seg_val_crf", "lam_seg_val", "lam_seg_val_crf"):
        assert rows[f"voc/{key}"]["status"] == "partial", key   # max_images=2
        assert 0 <= rows[f"voc/{key}"]["value"] <= 100
    rec = json.loads(Path(rows["voc/lam_seg_val_crf"]["source"]).read_text())
    assert rows["voc/lam_seg_val_crf"]["value"] == pytest.approx(100 * rec["scores"]["lam_crf"]["miou"])
    assert rows["train_val/seg"]["step"] == 2 and rows["voc/lam_seg_test"]["status"] == "not run"
