"""The command line of every entry (scripts/train_*.py, tools/*.py): `key=value` overrides,
`-h` / `--help` (every key with its type, resolved default and the help of its field's metadata)
and `--print-config` (the resolved config as YAML); both exit 0 before any data or device is
touched. A bad key or value is one `error:` line (exit 2).

`train_entry` is the training scripts' entry, where the entries' rule (utils.errors.user_errors)
applies to the whole run.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from utils import dist as dist_utils
from utils.config import leaf_fields, merge_config
from utils.errors import EXIT_PEER_FAILED, user_errors
from wetr.config import TrainConfig
from wetr.engine import main

# The seed-style launcher of each entry, by file stem (the bash wrappers' argument order).
_LAUNCH = {
    "train_": "bash run_train.sh {prog} [gpu_device] [gpu_number] [master_port] {tag} [key=value ...]",
    "infer_seg_coco": "bash run_evaluate_seg_coco.sh {prog} [gpu_device] [gpu_number] [infer_set] "
                      "[checkpoint_path]",
    "infer_": "bash run_evaluate_voc.sh [gpu_device] [gpu_number] [checkpoint_path] [key=value ...]",
    "export_": "bash run_export_pseudo_masks.sh [gpu_device] [gpu_number] [checkpoint_path] "
               "[key=value ...]",
    "predict": "torchrun --nproc_per_node=[gpu_number] {prog} ckpt=PATH input=FILE_OR_DIR [key=value ...]",
}


def schema_keys(schema: type) -> list[tuple[str, str, str]]:
    """Every leaf key of a config dataclass, in order: (dotted key, type, help)."""
    return [(key, str(f.type), f.metadata.get("help", "")) for key, f in leaf_fields(schema)]


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
    """Usage, the seed-style launch line and every key with its type, resolved default and help."""
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


def parse_cli(argv: Sequence[str], schema: type, defaults: dict | None = None,
              prog: str | None = None) -> DictConfig:
    """Defaults of `schema` <- `defaults` <- `key=value` arguments; `-h` / `--help` prints the
    keys and `--print-config` the resolved config, then exit 0. Raises ConfigError (one line)."""
    argv = list(argv)
    prog = prog or (os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "entry.py")
    if "-h" in argv or "--help" in argv:
        print(format_help(merge_config(schema, defaults), schema, prog), end="")
        raise SystemExit(0)
    if "--print-config" in argv:
        cfg = merge_config(schema, defaults, [a for a in argv if a != "--print-config"])
        print(OmegaConf.to_yaml(cfg), end="")
        raise SystemExit(0)
    return merge_config(schema, defaults, argv)


def train_entry(recipe: dict, argv: Sequence[str] | None = None) -> None:
    """A training script's entry: parse `recipe` <- the command line, then `wetr.engine.main`.

    A user error (a bad key, a check, a non-finite loss, ...) is one `error: ...` line, printed
    once when every rank met it, and exit status 2. A process whose collective failed because
    another one died exits quietly with EXIT_PEER_FAILED: the other said why, and torchrun
    stops this one anyway.
    """
    with user_errors(cleanup=dist_utils.cleanup):
        cfg = parse_cli(sys.argv[1:] if argv is None else argv, TrainConfig, recipe)
        try:
            main(cfg)
        except RuntimeError as exc:
            if not dist_utils.peer_failed(exc):
                raise
            sys.exit(EXIT_PEER_FAILED)
