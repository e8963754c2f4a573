"""`--help` text generated from the config dataclasses (utils.config.parse_cli prints it).

Each key's meaning is its field's comment in the source (or `field(metadata={"help": ...})`), read
with tokenize, so a key added to a config shows up in every entry's help with what its comment
says; tests/test_cli.py checks that no key lacks one.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import textwrap
import tokenize
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.config import TrainConfig
# The seed-style launcher of each entry, by file stem (the bash wrappers' argument order).
_LAUNCH = {
    "train_": "bash run_train.sh {prog} [gpu_device] [gpu_number] [master_port] {tag} [key=value ...]",
    "infer_seg_coco": "bash run_evaluate_seg_coco.sh {prog} [gpu_device] [gpu_number] [infer_set] "
                      "[checkpoint_path]",
    "infer_": "bash run_evaluate_voc.sh [gpu_device] [gpu_number] [checkpoint_path] [key=value ...]",
    "predict": "torchrun --nproc_per_node=[gpu_number] {prog} ckpt=PATH input=FILE_OR_DIR [key=value ...]",
}


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its source comment: the comment lines right above the field, the one on its
    line, and comment lines right below it when a blank line or the class end follows them."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    notes: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            notes[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()

    def comment_only(n: int) -> bool:
        return n in notes and 1 <= n <= len(lines) and lines[n - 1].lstrip().startswith("#")

    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while comment_only(n):
            above.insert(0, notes[n])
            n -= 1
        below, n = [], node.end_lineno + 1
        while comment_only(n):
            below.append(notes[n])
            n += 1
        if n <= len(lines) and lines[n - 1].strip() and below:
            below = []  # the block belongs to the next field
        parts = above + [notes.get(ln, "") for ln in range(node.lineno, node.end_lineno + 1)] + below
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def schema_keys(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf key of a config dataclass, in order: (dotted key, type, meaning). A field with
    no comment of its own takes the meaning of the same key in TrainConfig."""
    meaning: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        meaning.update(_comments(cls))
    rows = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub):
            rows += schema_keys(type(sub), key + ".")
            continue
        text = f.metadata.get("help") or meaning.get(f.name, "")
        if not text and schema is not TrainConfig and prefix.count(".") <= 1:
            text = next((m for k, _, m in schema_keys(TrainConfig) if k == key), "")
        rows.append((key, str(f.type), text))
    return rows


def _show(value: Any) -> str:
    """A default as it is typed on the command line (YAML-like: null, true, [1.0, 0.5], "")."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return '""' if value == "" else str(value)


def format_help(cfg: DictConfig, schema: type, prog: str) -> str:
    """Usage, the seed-style launch line and every key with its type, resolved default and
    meaning (from the dataclasses' field comments, so help and config cannot drift)."""
    stem = os.path.splitext(os.path.basename(prog))[0]
    module = os.path.splitext(prog)[0].replace(os.sep, ".")
    launch = next((v for k, v in _LAUNCH.items() if stem.startswith(k)), "")
    lines = [f"usage: python {prog} [key=value ...] [--print-config] [-h]",
             f"       python -m {module} [key=value ...]"]
    if launch:
        lines.append("       " + launch.format(prog=prog, tag=OmegaConf.select(cfg, "tag")))
    lines += ["", "Arguments are key=value overrides (strict: an unknown key is an error);",
              "--print-config prints the resolved config as YAML and exits.", "",
              "keys (type, default, meaning):"]
    rows = [(k, t, _show(OmegaConf.select(cfg, k)), m) for k, t, m in schema_keys(schema)]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += [f"  {k:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {m}" for k, t, d, m in rows]
    return "\n".join(lines) + "\n"
