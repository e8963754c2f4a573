"""Strict configuration machinery, schema-agnostic: a config is a tree of dataclasses whose leaf
fields carry their meaning (and optional rules) as metadata, written with `option(...)`.

`merge_config(schema, overrides, argv)` merges the schema's defaults <- a dict <- `key=value`
strings in OmegaConf's struct mode: a mistyped key, a value of the wrong type or one breaking a
field's rule is a one-line `ConfigError` (with a suggestion for a near key). The schemas
themselves live with what they configure, and the command line (`--help`, `--print-config`)
with the entries.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.errors import UserError, first_line


class ConfigError(UserError, ValueError):
    """Bad configuration (unknown key, wrong type, invalid value); message is one line."""
    all_ranks = True  # every rank parses the same arguments alike


def option(default: Any, help: str, choices: Sequence[Any] | None = None,
           check: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A leaf config field: its default, its `--help` text and its rules, as field metadata.

    choices: the allowed values; check: (predicate on the plain value, what it must be) for rules
    choices cannot say. A list default is copied for each config (a dataclass field needs that).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def leaf_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """Every leaf field of a config dataclass, in order, with its dotted key."""
    for f in dataclasses.fields(schema):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub):
            yield from leaf_fields(type(sub), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def _near_key(key: str, schema: type) -> str:
    keys = [k for k, _ in leaf_fields(schema)]
    keys += sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    near = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _explain(exc: OmegaConfBaseException, schema: type) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = first_line(exc)
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key {key!r}{_near_key(key, schema)}"
    return f"bad value for config key {key!r}: {msg}"


def _check_rules(cfg: DictConfig, schema: type) -> None:
    """The fields' `choices` and `check` rules, on the merged values."""
    for key, f in leaf_fields(schema):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if value is not None and choices and value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        if value is not None and check and not check[0](value):
            raise ConfigError(f"config key {key!r} must be {check[1]}; got {value!r}")


def merge_config(schema: type, overrides: dict | None = None,
                 argv: Sequence[str] | None = None) -> DictConfig:
    """Defaults of `schema` <- `overrides` (e.g. a script's dict) <- `argv` (`key=value`)."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        cfg = base
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
        if argv:
            bad = [a for a in argv if "=" not in a]
            if bad:
                raise ConfigError(f"arguments must be key=value, got {bad[0]!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, schema)) from None
    _check_rules(cfg, schema)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """Plain dict (for checkpoints that load with weights_only=True, and for JSON logs)."""
    return OmegaConf.to_container(cfg, resolve=True)
