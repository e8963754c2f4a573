"""Seed spread of one recipe: mean ± sample standard deviation, min and max of every row of the
paper table (tools/paper_table.py) over several runs, beside the paper's or the authors' log's
figure.

    python tools/summarize.py logs/voc_s0 logs/voc_s1 logs/voc_s2            # Markdown
    python tools/summarize.py logs/demo_s* --json                             # JSON
    python tools/summarize.py logs/voc_s* --ckpt best --out logs/voc_spread.md

Each RUN is a run folder. Its rows are collected afresh from its metrics.jsonl and the scores.json
files of the checkpoint (`--ckpt`, default last) when it has them, else read from its
paper_table.json; nothing is evaluated here (paper_table.py run=true does that). A row missing
in some runs is summarised over the others (n says how many).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.paper_table import Target, build_table, detect_dataset, resolve_ckpt
from utils.config import ConfigError
from utils.errors import user_errors
from utils.io import write_text_atomic


def run_table(run: Path, ckpt: str) -> dict:
    """The paper table of one run (see the module docstring for where it comes from)."""
    path = resolve_ckpt(run, ckpt)
    if (run / "metrics.jsonl").is_file() or (run / "eval" / path.stem).is_dir():
        return build_table(Target(run, path, detect_dataset(run)))
    saved = run / "paper_table.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    raise ConfigError(f"{run}: no metrics.jsonl, eval/{path.stem}/ or paper_table.json "
                      f"(a run folder, logs/<tag>, is expected)")


def spread(tables: Sequence[dict]) -> list[dict]:
    """Per row key (first-seen order): n, mean, std (sample; None below 2 values), min, max,
    the reference (the paper's figure, else the authors' log) and mean − reference."""
    values: dict[str, list[float]] = {}
    first: dict[str, dict] = {}
    for table in tables:
        for row in table["rows"]:
            first.setdefault(row["key"], row)
            values.setdefault(row["key"], [])
            if row["value"] is not None:
                values[row["key"]].append(row["value"])
    out = []
    for key, vals in values.items():
        row = first[key]
        ref = row["paper"] if row["paper"] is not None else row["log"]
        mean = statistics.fmean(vals) if vals else None
        out.append({"key": key, "label": row["label"], "n": len(vals), "values": vals,
                    "mean": mean, "std": statistics.stdev(vals) if len(vals) > 1 else None,
                    "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                    "reference": ref,
                    "diff_mean": None if mean is None or ref is None else mean - ref})
    return out


def summarize(runs: Sequence[Path], ckpt: str = "last") -> dict:
    tables = [run_table(run, ckpt) for run in runs]
    datasets = {t["dataset"] for t in tables}
    if len(datasets) > 1:
        raise ConfigError(f"the runs mix datasets ({', '.join(sorted(datasets))}): summarise one "
                          f"recipe at a time")
    return {"runs": [str(r) for r in runs], "checkpoint": ckpt, "dataset": datasets.pop(),
            "rows": spread(tables)}


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "" if v is None else format(v, fmt)


def to_markdown(summary: dict) -> str:
    n = len(summary["runs"])
    lines = [f"# Seed spread: {n} runs ({summary['dataset']}, checkpoint {summary['checkpoint']})",
             "", "Runs: " + ", ".join(f"`{r}`" for r in summary["runs"]), "",
             "| row | n | mean ± std | min | max | reference | Δ mean |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        ms = "not run" if r["mean"] is None else (
            _f(r["mean"]) + ("" if r["std"] is None else f" ± {r['std']:.2f}"))
        lines.append(f"| {r['label']} | {r['n']}/{n} | {ms} | {_f(r['min'])} | {_f(r['max'])} | "
                     f"{_f(r['reference'])} | {_f(r['diff_mean'], '+.1f')} |")
    lines += ["", "mIoU %; std: sample standard deviation (n − 1); reference: the paper's figure, "
              "else the authors' training log (METHOD.md §8); Δ mean = mean − reference."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(prog="tools/summarize.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (logs/<tag>)")
    parser.add_argument("--ckpt", default="last", help="checkpoint name or path (default: last)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not run.is_dir():
            raise ConfigError(f"no run folder {run} (expected logs/<tag>)")
    summary = summarize(args.runs, args.ckpt)
    text = json.dumps(summary, indent=1) + "\n" if args.json else to_markdown(summary)
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")
    return summary


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
