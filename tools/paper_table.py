"""The paper's table for one run: every figure the paper and the issue threads compare, beside the
paper's and the authors' published training logs (METHOD.md §8 "Reference figures"), with the
difference. Markdown on stdout and in <run>/paper_table.md, JSON in <run>/paper_table.json.

    python tools/paper_table.py logs/train_voc                         # collect what exists
    python tools/paper_table.py logs/train_voc ckpt=best run=true gpus=0,1 nproc=2
    python tools/paper_table.py logs/demo run=true gpus=cpu nproc=2 size=96   # size=: to the tools

Rows. VOC: Seed (CAM on the seed split, no CRF) and Mask (the same + CRF); the seg head on val
(multi-scale, without and with CRF); LAM as segmentation on val (cam2seg, the paper's 76.4 route,
without and with CRF); the test-server figure (75.0, no local score). COCO: the seg head on the
full val and on val_part (its first 5000 images, the split validated during training), named
apart; the paper's 47.4 is full val. Both: the run's last validation during training (CAM, aux
CAM when logged, LAM, Fused, Seg; single scale, no CRF) beside the authors' logs.

Scores come only from the scores.json files under <run>/eval/<checkpoint stem>/ (matched by their
recorded tool and split) and from <run>/metrics.jsonl. A row without scores prints "not run" and
the command that produces it; run=true first runs those commands (bash run_evaluate_voc.sh /
run_evaluate_seg_coco.sh; rerun=true: every command). Any key=value that is not paper_table's
own goes to those commands, shown and run (the tools reject an unknown one).
"""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import OmegaConf

from tools.cli import parse_cli
from tools.data import is_labelled
from utils.config import ConfigError, option
from utils.errors import user_errors
from utils.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
# METHOD.md §8: the authors' training logs, validation during training (single scale, no CRF);
# VOC at 20 000 iterations on val, COCO at its last validation on val_part.
AUTHORS_LOG = {"voc": {"cam": 75.0, "aux_cam": 70.3, "lam": 73.4, "fused": 72.6, "seg": 72.1},
               "coco": {"cam": 49.1, "aux_cam": 41.0, "lam": 45.2, "fused": 48.5, "seg": 47.3}}
AUTHORS_BATCH = {"voc": "4 (1 GPU x 4 images)",
                 "coco": "8 in the published log (2 GPUs x 4 images); the script's 2 a GPU"}
VAL_MAPS = (("cam", "CAM"), ("aux_cam", "aux CAM"), ("lam", "LAM"), ("fused", "Fused"),
            ("seg", "Seg"))
ROUTE_KEYS = ("cam2seg", "infer_set", "out_dir", "crf", "multi_scale", "scales")  # set per row


@dataclass
class PaperTableConfig:
    ckpt: str = option("last", "checkpoint: a name under <run>/checkpoints (last, best, iter_N) or a path")
    run: bool = option(False, "first run the evaluations whose scores are missing or stale")
    rerun: bool = option(False, "with run=true, run every evaluation again")
    gpus: str = option("0", "GPU_DEVICE of the evaluation scripts (ids like 0,1, or cpu)")
    nproc: int = option(1, "GPU_NUMBER: processes of each evaluation")
    dataset: str = option("auto", "voc | coco | auto (the run's config.yaml data.name)")
    multi_scale_seeds: bool = option(True, "Seed / Mask rows from multi-scale seeds (else scale 1.0)")


@dataclass(frozen=True)
class Row:
    """One row read from a scores.json: `tool` and `split` as recorded there (split "seed":
    any split that is not val* or test*), `variant` its scores key (None: no local score),
    `route` the command that writes it, `paper` the paper's figure."""
    key: str
    label: str
    tool: str
    split: str
    variant: str | None
    route: str
    paper: float | None = None


ROWS = {
    "voc": [
        Row("seed", "Seed: CAM on the seed split, no CRF", "infer_cam", "seed", "cam", "seeds"),
        Row("mask", "Mask: CAM on the seed split + CRF", "infer_cam", "seed", "cam_crf", "seeds"),
        Row("seg_val", "Seg head on val, multi-scale, no CRF", "infer_seg_voc", "val", "seg", "seeds"),
        Row("seg_val_crf", "Seg head on val, multi-scale + CRF", "infer_seg_voc", "val", "seg_crf",
            "seeds"),
        Row("lam_seg_val", "LAM as segmentation on val (cam2seg), no CRF", "cam2seg", "val",
            "lam", "cam2seg"),
        Row("lam_seg_val_crf", "LAM as segmentation on val (cam2seg) + CRF: the paper's",
            "cam2seg", "val", "lam_crf", "cam2seg", 76.4),
        Row("lam_seg_test", "LAM as segmentation on test (server only)", "cam2seg", "test", None,
            "test", 75.0),
    ],
    "coco": [
        Row("seg_val", "Seg head on val (full, 40 137 images), multi-scale, no CRF",
            "infer_seg_coco", "val", "seg", "coco_val"),
        Row("seg_val_crf", "Seg head on val (full, 40 137 images), multi-scale + CRF",
            "infer_seg_coco", "val", "seg_crf", "coco_val", 47.4),
        Row("seg_val_part", "Seg head on val_part (first 5 000), multi-scale, no CRF",
            "infer_seg_coco", "val_part", "seg", "coco_val_part"),
        Row("seg_val_part_crf", "Seg head on val_part (first 5 000), multi-scale + CRF",
            "infer_seg_coco", "val_part", "seg_crf", "coco_val_part"),
    ],
}


@dataclass
class Target:
    """What a table is made for: run folder, checkpoint path, dataset, and the evaluation
    scripts' device arguments and extra key=value (for the commands shown and run)."""
    run: Path
    ckpt: Path
    dataset: str
    gpus: str = "0"
    nproc: int = 1
    extra: tuple[str, ...] = ()
    multi_scale_seeds: bool = True


def resolve_ckpt(run: Path, ckpt: str) -> Path:
    path = Path(ckpt)
    if "/" in ckpt or path.is_file():
        return path
    return run / "checkpoints" / (ckpt if ckpt.endswith(".pth") else f"{ckpt}.pth")


def run_config(run: Path) -> dict:
    path = run / "config.yaml"   # the resolved training config ({} for a bare folder)
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def detect_dataset(run: Path, wanted: str = "auto") -> str:
    if wanted != "auto":
        if wanted not in ROWS:
            raise ConfigError(f"config key 'dataset' must be voc, coco or auto; got {wanted!r}")
        return wanted
    name = run_config(run).get("data", {}).get("name")
    return name if name in ROWS else "voc"


def command(t: Target, route: str) -> list[str]:
    """The evaluation command (argument list, run from the repository root) behind a route."""
    ckpt, dev = str(t.ckpt), [t.gpus, str(t.nproc)]
    if route == "seeds":
        ms = ["multi_scale=true"] if t.multi_scale_seeds else []
        return ["bash", "run_evaluate_voc.sh", *dev, ckpt, *ms, "crf=true", *t.extra]
    if route == "cam2seg":
        return ["bash", "run_evaluate_voc.sh", *dev, ckpt, "cam2seg=true", "crf=true", *t.extra]
    if route == "test":
        return ["bash", "run_evaluate_voc.sh", *dev, ckpt, "infer_set=test",
                "data.root=PATH/TO/VOC2012_test", *t.extra]
    split = route.removeprefix("coco_")
    return ["bash", "run_evaluate_seg_coco.sh", "tools/infer_seg_coco.py", *dev, split, ckpt,
            "crf=true", *t.extra]


def read_scores(t: Target) -> list[dict]:
    """Every scores.json record of the checkpoint, with `_path` and `_mtime` added."""
    records = []
    for path in sorted((t.run / "eval" / t.ckpt.stem).glob("*/scores.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable scores.json ({exc}); delete it and rerun") from None
        records.append({**rec, "_path": str(path), "_mtime": path.stat().st_mtime})
    return records


def _matches(rec: dict, row: Row) -> bool:
    split = str(rec.get("split", ""))
    ok = {"seed": is_labelled(split) and not split.startswith("val"),
          "test": not is_labelled(split)}
    return rec.get("tool") == row.tool and ok.get(row.split, split == row.split)


def pick(records: list[dict], row: Row, multi_scale: bool) -> dict | None:
    """The record of a row: the wanted scale setting first (seeds), then the newest."""
    found = [r for r in records if _matches(r, row)]
    found.sort(key=lambda r: ((len(r.get("scales") or [1]) > 1) == multi_scale, r["_mtime"]))
    return found[-1] if found else None


def _pct(value) -> float | None:
    return 100 * value if isinstance(value, (int, float)) and math.isfinite(value) else None


def eval_row(t: Target, row: Row, records: list[dict]) -> dict:
    rec = pick(records, row, t.multi_scale_seeds or row.split != "seed")
    out = {"key": f"{t.dataset}/{row.key}", "label": row.label, "value": None,
           "paper": row.paper, "log": None, "status": "not run", "source": None,
           "command": shlex.join(command(t, row.route)), "protocol": "", "step": None}
    scores = (rec or {}).get("scores") or {}
    if rec is not None and row.variant is None:
        out.update(status="server", source=rec["_path"],
                   protocol=f"{rec.get('split')}: upload {Path(rec['_path']).parent}/results")
    if rec is None or row.variant not in scores:
        return out
    protocol = (f"{rec.get('split')}, {len(rec.get('scales') or [])} scale(s), "
                f"{rec.get('images')} images")
    status = "ok"
    if t.ckpt.is_file() and rec["_mtime"] < t.ckpt.stat().st_mtime:
        status = "stale"   # the checkpoint was written again after this evaluation
    elif 0 < (rec.get("config") or {}).get("max_images", 0) <= rec.get("images", 0):
        status = "partial"   # max_images cut the split (a cap above its size changes nothing)
    out.update(value=_pct(scores[row.variant].get("miou")), status=status, source=rec["_path"],
               protocol=protocol, step=rec.get("step"))
    return out


def last_validation(run: Path) -> dict | None:
    """The last validation record of <run>/metrics.jsonl (None: no validation yet)."""
    path = run / "metrics.jsonl"
    last = None
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "val/seg_miou" in record:
                last = record
    return last


def val_rows(t: Target) -> list[dict]:
    rec = last_validation(t.run)
    log = AUTHORS_LOG[t.dataset]
    rows = []
    for key, name in VAL_MAPS:
        if key == "aux_cam" and (rec is None or f"val/{key}_miou" not in rec):
            continue   # only logged by runs that validate the aux CAM
        value = _pct(rec.get(f"val/{key}_miou")) if rec else None
        rows.append({"key": f"train_val/{key}", "label": f"validation during training: {name}",
                     "value": value, "paper": None, "log": log[key],
                     "status": "ok" if value is not None else "not run",
                     "source": str(t.run / "metrics.jsonl") if rec else None,
                     "command": None if rec else "training validates on its schedule (eval_every)",
                     "protocol": f"step {rec['step']}, single scale, no CRF" if rec else "",
                     "step": rec["step"] if rec else None})
    return rows


def effective_batch(run: Path) -> dict:
    """batch_size x processes of the run (processes from train.log's `device ... x N`), or its
    `global_batch` when the config has one."""
    cfg = run_config(run)
    log = run / "train.log"
    found = re.findall(r"device \S+ x (\d+)", log.read_text()) if log.is_file() else []
    processes = int(found[-1]) if found else None
    batch = cfg.get("batch_size")
    accumulated = cfg.get("global_batch")
    value = accumulated or (batch * processes if batch and processes else None)
    return {"batch_size": batch, "processes": processes, "global_batch": accumulated,
            "effective": value}


def build_table(t: Target) -> dict:
    records = read_scores(t)
    rows = [eval_row(t, row, records) for row in ROWS[t.dataset]] + val_rows(t)
    for r in rows:   # Δ = ours − reference
        for ref in ("paper", "log"):
            r[f"diff_{ref}"] = None if None in (r["value"], r[ref]) else r["value"] - r[ref]
    cfg = run_config(t.run)
    return {"run": str(t.run), "checkpoint": str(t.ckpt), "dataset": t.dataset,
            "num_classes": cfg.get("data", {}).get("num_classes"),
            "batch": effective_batch(t.run), "authors_batch": AUTHORS_BATCH[t.dataset],
            "rows": rows}


def _num(v: float | None, signed: bool = False) -> str:
    return "" if v is None else f"{v:+.1f}" if signed else f"{v:.1f}"


def _cell(r: dict) -> str:
    if r["value"] is None:
        return r["status"]
    return _num(r["value"]) + ("" if r["status"] == "ok" else f" ({r['status']})")


def to_markdown(table: dict) -> str:
    b, k = table["batch"], table["num_classes"]
    lines = [f"# Paper table: {table['run']}", "",
             f"Checkpoint `{table['checkpoint']}`; dataset {table['dataset']}"
             f" (num_classes {k}); effective batch {b['effective']} (batch_size {b['batch_size']}"
             f" x {b['processes']} process(es){', global_batch' if b['global_batch'] else ''};"
             f" authors: {table['authors_batch']}).", "",
             "| row | ours | paper | Δ paper | authors' log | Δ log | protocol / command |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in table["rows"]:
        how = f"`{r['command']}`" if r["status"] == "not run" and r["command"] else r["protocol"]
        lines.append(f"| {r['label']} | {_cell(r)} | {_num(r['paper'])} | "
                     f"{_num(r['diff_paper'], True)} | {_num(r['log'])} | "
                     f"{_num(r['diff_log'], True)} | {how} |")
    expected = {"voc": 21, "coco": 81}[table["dataset"]]
    lines += ["", "mIoU %; Δ = ours − reference. Paper: ViT-B, the LAM-as-segmentation route on "
              "VOC (cam2seg + CRF), the seg head on COCO's full val. Authors' logs: validation "
              "during training, single scale, no CRF (METHOD.md §8). stale: the checkpoint is newer "
              "than its scores; partial: max_images cut the split."]
    if k is not None and k != expected:
        lines.append(f"This run has num_classes {k}, not {table['dataset']}'s {expected}: the "
                     "reference figures are for orientation only.")
    return "\n".join(lines) + "\n"


def run_missing(t: Target, table: dict, rerun: bool) -> None:
    """Run (once each) the commands of the rows without scores; rerun: of every row."""
    todo = []
    for spec, row in zip(ROWS[t.dataset], table["rows"]):
        cmd = command(t, spec.route)
        if spec.route != "test" and (rerun or row["status"] in ("not run", "stale")) \
                and cmd not in todo:
            todo.append(cmd)
    for cmd in todo:
        print(f">>> {shlex.join(cmd)}", flush=True)
        code = subprocess.run(cmd, cwd=REPO).returncode
        if code != 0:
            raise ConfigError(f"evaluation failed (exit status {code}): {shlex.join(cmd)}")


def split_argv(argv: Sequence[str]) -> tuple[Path, list[str], list[str]]:
    """RUN, this tool's key=value, and the rest (for the evaluation scripts)."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise ConfigError("usage: python tools/paper_table.py RUN_FOLDER [key=value ...]")
    own = {f.name for f in fields(PaperTableConfig)}
    mine, extra = [], []
    for arg in argv[1:]:
        key = arg.split("=", 1)[0]
        if key in ROUTE_KEYS:
            raise ConfigError(f"{key}= is set by paper_table itself for each row; leave it out")
        (mine if key in own or arg.startswith("-") else extra).append(arg)
    return Path(argv[0]), mine, extra


def main(argv: Sequence[str]) -> dict:
    if "-h" in argv or "--help" in argv:
        parse_cli(["--help"], PaperTableConfig, prog="tools/paper_table.py RUN_FOLDER")
    run, mine, extra = split_argv(argv)
    cfg = parse_cli(mine, PaperTableConfig)
    if not run.is_dir():
        raise ConfigError(f"no run folder {run} (expected logs/<tag>)")
    t = Target(run, resolve_ckpt(run, cfg.ckpt), detect_dataset(run, cfg.dataset), cfg.gpus,
               cfg.nproc, tuple(extra), cfg.multi_scale_seeds)
    if cfg.run:
        if not t.ckpt.is_file():
            raise ConfigError(f"checkpoint not found: {t.ckpt} (ckpt=last|best|iter_N|path)")
        run_missing(t, build_table(t), cfg.rerun)
    table = build_table(t)
    text = to_markdown(table)
    write_text_atomic(run / "paper_table.md", text)
    write_text_atomic(run / "paper_table.json", json.dumps(table, indent=1) + "\n")
    print(text, end="")
    return table


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
