"""DenseCRF post-processing (METHOD.md §8) with pydensecrf2 (import name `pydensecrf`): the CPU
reference of the tools' `crf_backend=pydensecrf` (the torch backend is `wetr.densecrf`).

pydensecrf2 is optional: it is imported only when this backend runs, and its absence is a
one-line RuntimeError naming the install. CRF runs on the CPU, one image at a time; `CRFPool`
spreads images over worker processes so that a rank keeps feeding its accelerator while the CRF
works. `label_from` is the label rule of both backends (class keys, empty stack).
"""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.errors import UserError

CRF_MISSING = ("crf_backend=pydensecrf needs pydensecrf2: pip install pydensecrf2, or use "
               "crf_backend=torch (no extra package)")


class CRFMissingError(UserError, RuntimeError):
    """pydensecrf2 is not installed (message: CRF_MISSING)."""


@dataclass(frozen=True)
class CRFParams:
    """METHOD.md §8: 10 mean-field iterations, Gaussian (sxy 1, compat 3), bilateral (sxy 67, srgb 3,
    compat 4)."""
    iter_max: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dutils
    except ImportError:
        raise CRFMissingError(CRF_MISSING) from None
    return dcrf, dutils


def check_available() -> None:
    """Raise the one-line RuntimeError now rather than after the first image."""
    _densecrf()


def crf_inference(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field DenseCRF on a probability stack.

    image: (H, W, 3) uint8 RGB; probs: (C, H, W) probabilities (need not sum to one; the unary
    is −log(clip(p, 1e-5)) as in pydensecrf's `unary_from_softmax`).
    Returns (C, H, W) float32 marginals.
    """
    dcrf, dutils = _densecrf()
    probs = np.asarray(probs, dtype=np.float32)
    c, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({h}, {w}, 3) uint8, got {image.shape} {image.dtype}")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(dutils.unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std,
                           rgbim=np.ascontiguousarray(image), compat=params.bi_w)
    return np.asarray(d.inference(params.iter_max), dtype=np.float32).reshape(c, h, w)


# (image (H, W, 3) uint8, probs (C, H, W), params) -> (H, W) channel of each pixel's largest
# mean-field marginal: what a backend adds to the label rule of `label_from`
ChannelArgmax = Callable[[np.ndarray, Any, CRFParams], np.ndarray]


def label_from(argmax: ChannelArgmax, image: np.ndarray, probs: Any, keys: np.ndarray,
               params: CRFParams) -> np.ndarray:
    """The CRF label map of either backend: the channel `argmax` picks, mapped to its class.

    probs: (C, H, W) (numpy, or a tensor for the torch backend); keys: (C,) class id of each
    channel (e.g. [0, present classes + 1] for seeds, arange(C) for segmentation logits). An
    empty stack (C == 0: no class present) gives all background, without running the CRF.
    Returns (H, W) uint8.
    """
    if probs.shape[0] == 0:
        return np.zeros(tuple(probs.shape[1:]), dtype=np.uint8)
    return np.asarray(keys)[argmax(image, probs, params)].astype(np.uint8)


def _argmax(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    return crf_inference(image, probs, params).argmax(0)


def crf_label(image: np.ndarray, probs: np.ndarray, keys: np.ndarray,
              params: CRFParams = CRFParams()) -> np.ndarray:
    """pydensecrf's label map of one image (`label_from`): (H, W) uint8."""
    return label_from(_argmax, image, probs, keys, params)


class CRFPool:
    """Run `crf_label` on `workers` (>= 1) spawned processes: submit(image, probs, keys) ->
    Future of the (H, W) uint8 label. Spawned, not forked, so that the workers inherit no CUDA
    context or torch thread pool. (In the calling process, call `crf_label` itself.)
    """

    def __init__(self, workers: int, params: CRFParams = CRFParams()):
        check_available()
        if workers < 1:
            raise ValueError(f"CRFPool needs at least one worker process, got {workers}")
        self.params = params
        self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(self, image: np.ndarray, probs: np.ndarray, keys: np.ndarray) -> Future:
        return self._pool.submit(crf_label, image, probs, keys, self.params)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "CRFPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
