"""DenseCRF mean-field inference in PyTorch (METHOD.md §8), equal to pydensecrf2's to float rounding.

What `utils.crf.crf_inference` asks of pydensecrf (`DenseCRF2D`, `setUnaryEnergy(-log p)`,
`addPairwiseGaussian(sxy=1, compat=3)`, `addPairwiseBilateral(sxy=67, srgb=3, compat=4)`,
`inference(10)`), read off its C++ (densecrf.cpp, pairwise.cpp, labelcompatibility.cpp):

    U    = -log(clip(p, 1e-5, 1))                         (pydensecrf.utils.unary_from_softmax)
    Q    = softmax_c(-U)                                  (expAndNormalize: max subtracted)
    repeat `iterations` times:
        Q = softmax_c(-U + sum_k w_k n_k * K_k(n_k * Q))  (Potts: compat applies -w Q, subtracted)
    return Q                                              (the marginals, not a labelling)

K_k is the permutohedral lattice filter (self term included, no exclusion of j = i) on the
features f_k: Gaussian (x/sxy, y/sxy) with d = 2; bilateral (x/sxy, y/sxy, r/srgb, g/srgb,
b/srgb) with d = 5, x the column, in float32 as the C++ (`i / sx`). DIAG_KERNEL with unit
parameters leaves the features as they are; NORMALIZE_SYMMETRIC gives
n_k = 1 / sqrt(K_k(1) + 1e-20), applied before and after the filter.

Each lattice is built once per image batch and filters the C channels of all iterations
(`wetr.permutohedral.PermutohedralLattice`); images of one size are one batched lattice (the
image index is part of the lattice key, so images never mix); the Gaussian kernel depends on
the image size only and is cached per size. Splat, blur and slice are sparse CSR matrix
products with the normalisation folded in (`PermutohedralLattice.sparse_operator`). Everything
runs on the inputs' device; the torch path imports no pydensecrf.

Measured (tests/test_densecrf.py and issue 29's checks): 100 % label agreement with
pydensecrf2 on demo-like and 500x375 natural-like images for CAM, LAM and segmentation stacks,
marginals within 1e-5; on the demo checkpoint's evaluation (60 val images) the CRF label maps of
CAM, LAM and Seg are identical to pydensecrf2's on every image
(logs/benchmarks/2026-12-04_crf_backend_demo.md). CPU, 1 thread, 500x375, 21 channels: 1.4-2.5x
pydensecrf2's time per image (logs/benchmarks/cpu_crf_voc_500x375_k20.md and
2026-12-04_cpu_crf_seg_route_vitb448_k20.md); the lattice build is ~0.5 s of it.

`crf_label` is this backend's label map of one image (the rule of `utils.crf.label_from`, as
pydensecrf's `utils.crf.crf_label`). `resolve_backend` turns `crf_backend` into "torch" or
"pydensecrf"; `tools.crf_step.CRFStep` does so once per run and calls the chosen function.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from utils.crf import CRFParams, check_available, label_from
from wetr.permutohedral import PermutohedralLattice

__all__ = ["BACKENDS", "resolve_backend", "pydensecrf_installed", "unary_from_probs", "mean_field",
           "normalized_kernel", "crf_features", "dense_crf", "crf_label"]

BACKENDS = ("auto", "torch", "pydensecrf")
Kernel = Callable[[Tensor], Tensor]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """crf_backend (alias crf.backend) -> "torch" or "pydensecrf".

    auto: torch on an accelerator; on the CPU pydensecrf2 if it is installed, else torch.
    "pydensecrf" without pydensecrf2 installed raises `utils.crf.CRFMissingError` (one line
    naming the install), so a run fails before its first image.
    """
    if name not in BACKENDS:
        raise ValueError(f"crf_backend={name!r} is not one of {'|'.join(BACKENDS)}")
    if name == "pydensecrf":
        check_available()
    if name != "auto":
        return name
    if torch.device(device).type != "cpu":
        return "torch"
    return "pydensecrf" if pydensecrf_installed() else "torch"


def pydensecrf_installed() -> bool:
    """Whether pydensecrf2 imports (its compiled module, not only the package)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def unary_from_probs(probs: Tensor) -> Tensor:
    """pydensecrf.utils.unary_from_softmax: -log(clip(p, 1e-5, 1)), float32, any shape."""
    return -torch.log(probs.to(torch.float32).clamp(1e-5, 1.0))


def mean_field(unary: Tensor, kernels: Sequence[tuple[float, Kernel]], iterations: int) -> Tensor:
    """pydensecrf's `DenseCRF::inference` with Potts compatibilities.

    Args:
        unary: (B, N, C) unary energies.
        kernels: (w_k, K_k) pairs; K_k maps (B, N, C) -> (B, N, C), normalisation included.
        iterations: mean-field steps (0 returns softmax(-unary)).
    Returns:
        (B, N, C) marginals Q.
    """
    neg_unary = -unary
    q = torch.softmax(neg_unary, dim=-1)
    for _ in range(iterations):
        energy = neg_unary
        for weight, kernel in kernels:
            # Potts: the pairwise term is -w K(Q), and the C++ subtracts it (one fused pass).
            energy = torch.sub(energy, kernel(q), alpha=-weight)
        q = torch.softmax(energy, dim=-1)
    return q


def normalized_kernel(lattice, batch: int, points: int, device) -> Kernel:
    """NORMALIZE_SYMMETRIC: Q -> n * K(n * Q), n = 1 / sqrt(K(1) + 1e-20), for Q (B, N, C).

    lattice: a `PermutohedralLattice` of B images of N points (its `sparse_filter` is K; the
    factors n are folded into its matrices by `sparse_operator(n)`).
    """
    ones = torch.ones(batch, points, 1, device=device, dtype=torch.float32)
    # The C++ adds the double 1e-20 and takes 1/sqrt in double before storing a float.
    norm = (1.0 / torch.sqrt(lattice.sparse_filter(ones).double() + 1e-20)).to(torch.float32)
    return lattice.sparse_operator(norm[..., 0])


def _div(x: Tensor, s: float) -> Tensor:
    """x / s with a tensor divisor: a true float32 division on CUDA too (as the C++ `i / sx`),
    where a Python scalar becomes a product with its reciprocal."""
    return x / torch.full((1,), s, dtype=torch.float32, device=x.device)


def _pixel_xy(H: int, W: int, device) -> Tensor:
    """(H*W, 2) float32 (x, y) of the pixels in row-major order, x the column."""
    ys, xs = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32),
                            torch.arange(W, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(H * W, 2)


def crf_features(images: Tensor, params: CRFParams) -> tuple[Tensor, Tensor]:
    """images: (B, H, W, 3) uint8 -> Gaussian (1, H*W, 2) (the same for every image) and
    bilateral (B, H*W, 5) float32 features, (x, y[, r, g, b]) as DenseCRF2D."""
    B, H, W, _ = images.shape
    xy = _pixel_xy(H, W, images.device)
    rgb = images.reshape(B, H * W, 3).to(torch.float32)
    gauss = _div(xy, params.pos_xy_std)[None]
    bilateral = torch.cat([_div(xy, params.bi_xy_std).expand(B, H * W, 2),
                           _div(rgb, params.bi_rgb_std)], dim=-1)
    return gauss, bilateral


@lru_cache(maxsize=4)
def _gaussian_kernel(H: int, W: int, sxy: float, device: torch.device) -> Kernel:
    """The normalised Gaussian kernel of an H x W image: it depends on the size only, so it is
    built once per size (and device) and filters every image's channels as one value set."""
    feats = _div(_pixel_xy(H, W, device), sxy)[None]
    kernel = normalized_kernel(PermutohedralLattice(feats), 1, H * W, device)

    def batched(q: Tensor) -> Tensor:  # (B, N, C) -> one (1, N, B C) filtering
        B, N, C = q.shape
        out = kernel(q.permute(1, 0, 2).reshape(1, N, B * C))
        return out.reshape(N, B, C).permute(1, 0, 2)
    return batched


def dense_crf(images: Tensor, probs: Tensor, params: CRFParams = CRFParams()) -> Tensor:
    """DenseCRF marginals for a batch of same-size images, on the device of `probs`.

    Args:
        images: (B, H, W, 3) uint8 RGB.
        probs: (B, C, H, W) probabilities (need not sum to one; clipped to [1e-5, 1]).
    Returns:
        (B, C, H, W) float32 marginals, as `utils.crf.crf_inference` image by image.
    """
    B, C, H, W = probs.shape
    if images.shape != (B, H, W, 3) or images.dtype != torch.uint8:
        raise ValueError(f"images must be ({B}, {H}, {W}, 3) uint8, got "
                         f"{tuple(images.shape)} {images.dtype}")
    device = probs.device
    _, bilateral = crf_features(images.to(device), params)
    lattice = PermutohedralLattice(bilateral)
    kernels = [(params.pos_w, _gaussian_kernel(H, W, params.pos_xy_std, device)),
               (params.bi_w, normalized_kernel(lattice, B, H * W, device))]
    unary = unary_from_probs(probs).flatten(2).transpose(1, 2)  # (B, N, C)
    q = mean_field(unary, kernels, params.iter_max)
    return q.transpose(1, 2).reshape(B, C, H, W)


def _argmax(image: np.ndarray, probs: np.ndarray | Tensor, params: CRFParams) -> np.ndarray:
    """`dense_crf` of one image on the device of `probs` (a numpy array: the CPU), argmax."""
    p = probs if isinstance(probs, Tensor) else torch.from_numpy(np.asarray(probs))
    img = torch.from_numpy(np.ascontiguousarray(image))
    return dense_crf(img[None], p.float()[None], params)[0].argmax(0).cpu().numpy()


def crf_label(image: np.ndarray, probs: np.ndarray | Tensor, keys: np.ndarray,
              params: CRFParams = CRFParams()) -> np.ndarray:
    """This backend's label map of one image (`utils.crf.label_from`).

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (C, H, W) probabilities, numpy (run on the CPU) or a tensor (run on its device).
        keys: (C,) class id of each channel; C == 0 gives all background.
    Returns:
        (H, W) uint8 label.
    """
    return label_from(_argmax, image, probs, keys, params)
