"""tools/summarize.py: the seed spread of several runs, against mean / sample std / min / max
computed here from the hand-written scores."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import paper_table, summarize

ROOT = Path(__file__).resolve().parents[1]
LAM_CRF = [0.7512, 0.7633, 0.7301]       # cam2seg lam_crf of each seed
VAL_SEG = [0.701, 0.688, 0.715]          # last validation Seg of each seed


def make_run(root: Path, i: int, dataset: str = "voc", with_cam2seg: bool = True) -> Path:
    run = root / f"s{i}"
    run.mkdir()
    (run / "config.yaml").write_text(f"batch_size: 4\ndata:\n  name: {dataset}\n")
    (run / "metrics.jsonl").write_text(json.dumps(
        {"step": 100, "val/cam_miou": 0.6, "val/lam_miou": 0.6, "val/fused_miou": 0.6,
         "val/seg_miou": VAL_SEG[i]}) + "\n")
    if with_cam2seg:
        scores = run / "eval" / "last" / "cam2seg_val" / "scores.json"
        scores.parent.mkdir(parents=True)
        scores.write_text(json.dumps({"tool": "cam2seg", "split": "val", "scales": [1.0, 0.5],
                                      "scores": {"lam_crf": {"miou": LAM_CRF[i]}}}))
    return run


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_mean_std_min_max_of_every_row(tmp_path):
    runs = [make_run(tmp_path, i) for i in range(3)]
    rows = {r["key"]: r for r in summarize.summarize(runs)["rows"]}
    lam = rows["voc/lam_seg_val_crf"]
    want = [100 * x for x in LAM_CRF]
    m, s = mean_std(want)
    assert lam["n"] == 3 and lam["mean"] == pytest.approx(m) and lam["std"] == pytest.approx(s)
    assert lam["min"] == pytest.approx(min(want)) and lam["max"] == pytest.approx(max(want))
    assert lam["reference"] == 76.4 and lam["diff_mean"] == pytest.approx(m - 76.4)
    seg = rows["train_val/seg"]
    m2, s2 = mean_std([100 * x for x in VAL_SEG])
    assert seg["mean"] == pytest.approx(m2) and seg["std"] == pytest.approx(s2)
    assert seg["reference"] == 72.1   # the authors' VOC log
    assert rows["voc/seed"]["n"] == 0 and rows["voc/seed"]["mean"] is None
    assert rows["train_val/cam"]["std"] == pytest.approx(0.0)


def test_missing_rows_and_the_saved_table_fallback(tmp_path):
    runs = [make_run(tmp_path, 0), make_run(tmp_path, 1, with_cam2seg=False)]
    # a third run known only by its paper_table.json (e.g. copied from another machine)
    third = make_run(tmp_path, 2)
    table = paper_table.build_table(paper_table.Target(third, third / "checkpoints" / "last.pth", "voc"))
    (third / "paper_table.json").write_text(json.dumps(table))
    (third / "metrics.jsonl").unlink()
    (third / "eval" / "last" / "cam2seg_val" / "scores.json").unlink()
    (third / "eval" / "last" / "cam2seg_val").rmdir()
    (third / "eval" / "last").rmdir()
    rows = {r["key"]: r for r in summarize.summarize([*runs, third])["rows"]}
    lam = rows["voc/lam_seg_val_crf"]
    want = [100 * LAM_CRF[0], 100 * LAM_CRF[2]]
    assert lam["n"] == 2 and lam["values"] == pytest.approx(want)
    assert lam["std"] == pytest.approx(mean_std(want)[1])
    one = summarize.summarize([runs[0]])["rows"]
    assert next(r for r in one if r["key"] == "voc/lam_seg_val_crf")["std"] is None


def test_markdown_json_and_errors(tmp_path, capsys):
    runs = [make_run(tmp_path, i) for i in range(3)]
    summary = summarize.main([str(r) for r in runs])
    md = capsys.readouterr().out
    m, s = mean_std([100 * x for x in LAM_CRF])
    line = next(ln for ln in md.splitlines() if ln.startswith("| LAM as segmentation on val (cam2seg) + CRF"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1:] == ["3/3", f"{m:.1f} ± {s:.2f}", f"{100 * min(LAM_CRF):.1f}",
                         f"{100 * max(LAM_CRF):.1f}", "76.4", f"{m - 76.4:+.1f}"]
    out = tmp_path / "spread.json"
    assert json.loads(json.dumps(summary)) == summarize.main(
        [str(r) for r in runs] + ["--json", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    other = tmp_path / "coco"
    other.mkdir()
    c = make_run(other, 0, dataset="coco", with_cam2seg=False)
    proc = subprocess.run([sys.executable, "tools/summarize.py", str(runs[0]), str(c)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "mix datasets (coco, voc)" in err[0]
