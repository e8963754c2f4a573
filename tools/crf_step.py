"""The CRF stage of the image loop (METHOD.md §8): `CRFStep` turns a route's CRF input into its
"<variant>_crf" label map with the backend `crf_backend` names, resolved once per run."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future

import numpy as np
import torch

from utils import crf as pydensecrf
from wetr import densecrf

from .routes import Output


def _on_host(probs: torch.Tensor | np.ndarray) -> np.ndarray:
    """pydensecrf and the worker processes take host arrays."""
    if isinstance(probs, torch.Tensor):
        return np.ascontiguousarray(probs.cpu().numpy())
    return probs


def _pydensecrf_label(rgb: np.ndarray, probs: torch.Tensor | np.ndarray,
                      keys: np.ndarray) -> np.ndarray:
    return pydensecrf.crf_label(rgb, _on_host(probs), keys)


class CRFStep:
    """The CRF of every route: rgb (H, W, 3) uint8 + probs (C, H, W) -> label map (H, W) uint8
    (channel c -> class keys[c]).

    backend: `crf_backend` (auto | torch | pydensecrf; None: no CRF, `label_map` None), resolved
    here, once (`wetr.densecrf.resolve_backend`, on `device`), into `label_map`, the function
    every image goes through: "torch" runs `wetr.densecrf.crf_label` in this process on the
    probs' device (the route's tensor: no host round trip on a GPU); "pydensecrf" runs
    `utils.crf.crf_label` on host arrays, in a process pool of `workers` (0: in this process).
    Outputs come back in their input order once their CRF is done; at most 4 x workers wait."""

    def __init__(self, backend: str | None, device: torch.device | str = "cpu", workers: int = 0):
        self.backend = None if backend is None else densecrf.resolve_backend(backend, device)
        self.label_map = {"torch": densecrf.crf_label,
                          "pydensecrf": _pydensecrf_label}.get(self.backend)
        self.pool = (pydensecrf.CRFPool(workers)
                     if self.backend == "pydensecrf" and workers > 0 else None)
        self.limit = 4 * max(1, workers if self.pool is not None else 0)
        self.queue: deque[tuple[Output, Future | None]] = deque()

    def put(self, out: Output) -> list[Output]:
        """Queue `out` (its CRF run, or started in the pool, when it carries a CRF input);
        return the outputs done."""
        future = None
        if out.crf is not None and self.pool is not None:
            probs, keys = out.crf
            future = self.pool.submit(out.rgb, _on_host(probs), keys)
        elif out.crf is not None:
            self._finish(out, self.label_map(out.rgb, *out.crf))
        self.queue.append((out, future))
        return self._ready(block=len(self.queue) > self.limit)

    @staticmethod
    def _finish(out: Output, label: np.ndarray) -> None:
        out.labels[f"{next(iter(out.labels))}_crf"] = label
        out.crf = None   # free the probability stack now

    def _ready(self, block: bool) -> list[Output]:
        done = []
        while self.queue:
            out, future = self.queue[0]
            if future is not None and not (block or future.done()):
                break
            block = False   # wait for the oldest one only
            self.queue.popleft()
            if future is not None:
                self._finish(out, future.result())
            done.append(out)
        return done

    def drain(self) -> list[Output]:
        done = []
        while self.queue:
            done += self._ready(block=True)
        self.close()
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def crf_workers(asked: int, world_size: int) -> int:
    """CRF processes per rank: `asked`, or (-1) 60 % of the cores shared by the local ranks."""
    if asked >= 0:
        return asked
    # as the reference, which gives CRF 60 % of the cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, int(0.6 * (os.cpu_count() or 1)) // max(1, local))
