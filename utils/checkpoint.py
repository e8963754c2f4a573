"""Atomic, unwrapped, resumable checkpoints.

A checkpoint is a plain dict that loads with `torch.load(weights_only=True)`:
    model      unwrapped state_dict (keys as in METHOD.md §10, no `module.` prefix)
    optimizer  optimizer state_dict (training checkpoints only)
    scaler     GradScaler state_dict or {}
    step       number of optimisation steps done
    config     resolved config as plain containers
    meta       {"num_classes", "embed_dim", "depth", "num_heads", "backbone", "best_miou", ...}
    rng        per-rank RNG states (lists of plain tensors / ints), training checkpoints only
    log        {"count": int, "sums": per-rank loss sums} since the last log line (exact logs
               after a resume), training checkpoints only
A reference checkpoint (the authors' code) is a bare state_dict, possibly `module.`-prefixed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError, first_line
from utils.io import remove_stale_tmp, write_atomic

__all__ = ["CheckpointError", "save_atomic", "remove_stale_tmp", "load_file", "model_state",
           "rng_state", "set_rng_state"]


class CheckpointError(UserError, RuntimeError):
    """Unreadable or incompatible checkpoint; the message is one line naming the file."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through utils.io.write_atomic: a crash mid-save leaves the previous file intact."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _load_error(path: Path, exc: Exception) -> str:
    """One line for a failed weights-only load. torch's own message for an unpickling failure
    opens with advice to set weights_only=False, which is wrong for a corrupt file and unsafe for
    a foreign one; keep only its "WeightsUnpickler error:" detail."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation")[0].split())
        if "Unsupported global" in detail:
            return (f"checkpoint {path} holds Python objects other than tensors and plain "
                    f"containers ({detail.split('. ')[0][:200]}); checkpoints are loaded with "
                    f"weights_only=True: save the state_dict (or our checkpoint dict) instead")
        return f"cannot read checkpoint {path} (not a PyTorch file?): {detail[:200]}"
    return (f"cannot read checkpoint {path} (truncated or not a PyTorch file?): "
            f"{first_line(exc)[:200]}")


def load_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint or reference state_dict safely (weights_only) with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code objects, not a torch file ...
        raise CheckpointError(_load_error(path, exc)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def model_state(obj: Mapping) -> dict[str, torch.Tensor]:
    """The model weights of our checkpoint dict or of a bare (reference) state_dict, unprefixed."""
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def rng_state(device: torch.device) -> dict:
    import random

    import numpy as np
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    import random

    import numpy as np
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]),
                     None if py[-1] == 0 else py[-1]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"),
                         state["numpy_pos"], int(state["numpy_gauss"][0]),
                         float(state["numpy_gauss"][1])))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
