"""Pixel-adaptive refinement (PAR, from AFA/ToCo; METHOD.md §4).

Propagates a stack of per-class maps along dilated 8-neighbourhoods whose weights come from
colour similarity (image affinity) plus a small fixed position prior.
"""
import math
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# 8-neighbour offsets (dy, dx) in the reference kernel order: row-major over a 3x3 window
# without its centre. The order fixes the summation order, hence float rounding.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class PAR(nn.Module):
    """Refine masks with image-guided affinities over dilated neighbourhoods.

    Args:
        num_iter: propagation steps.
        dilations: neighbourhood dilations; each contributes 8 neighbours.
        w1: temperature of the image and position affinities.
        w2: weight of the (image-independent) position affinity.
        sparse: propagate with one sparse CSR product an iteration (`operator`) instead of the
            8 * len(dilations) multiply-adds of shifted views. Equal within float rounding
            (1.5e-6 relative), but the CPU (MKL) product's rounding depends on memory
            alignment, which breaks bit-exact resume across processes: off by default.
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 w1: float = 0.3, w2: float = 0.01, sparse: bool = False):
        super().__init__()
        self.sparse = sparse
        self.num_iter = num_iter
        self.dilations = tuple(int(d) for d in dilations)
        self.w1 = w1
        self.w2 = w2
        self.pad = max(self.dilations)
        self.offsets = tuple((dy * d, dx * d) for d in self.dilations for dy, dx in _NEIGHBOURS)
        # Position affinity is the same at every pixel: distance d (axial) or d*sqrt(2)
        # (diagonal), scaled by the unbiased std over all neighbours, softmaxed over neighbours.
        ring = torch.tensor([math.sqrt(2) if dy and dx else 1.0 for dy, dx in _NEIGHBOURS])
        dist = torch.cat([ring * d for d in self.dilations])
        pos_aff = -(dist / (dist.std() + 1e-8) / w1) ** 2
        self.register_buffer("pos_weight", (w2 * pos_aff.softmax(0)).view(-1, 1, 1), persistent=False)
        # On the module's device, so building the neighbour index copies nothing from the host.
        self.register_buffer("offset_table", torch.tensor(self.offsets), persistent=False)

    def _neighbours(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, C, H, W) -> one (B, C, H, W) view per neighbour, replicate-padded borders."""
        h, w = x.shape[-2:]
        p = self.pad
        # Replicate padding by the largest dilation once equals per-dilation replicate padding
        # (both clamp coordinates to the image), and every neighbour is then a strided view.
        xp = F.pad(x, [p, p, p, p], mode="replicate")
        return [xp[..., p + dy:p + dy + h, p + dx:p + dx + w] for dy, dx in self.offsets]

    def affinity(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> aff (B, n, H, W), n = 8 * len(dilations)."""
        nb = torch.stack(self._neighbours(images), dim=2)  # (B, 3, n, H, W)
        std = nb.std(dim=2, keepdim=True)  # unbiased, over the neighbours of all dilations
        # -(|nb - I| / (std + 1e-8) / w1)^2, the same operations in the same order, in place:
        # the (B, 3, n, H, W) temporaries are the bulk of PAR's memory traffic on a CPU.
        aff = nb.sub_(images.unsqueeze(2)).abs_().div_(std + 1e-8).div_(self.w1).pow_(2).neg_()
        aff = aff.mean(dim=1)  # average over RGB
        return aff.softmax(dim=1) + self.pos_weight

    def neighbour_index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(n, h*w) long: flat index of neighbour i of every pixel, coordinates clamped to the
        image (replicate padding), in the order of `offsets`."""
        offsets = self.offset_table.to(device)
        ys = (torch.arange(h, device=device) + offsets[:, :1]).clamp_(0, h - 1)
        xs = (torch.arange(w, device=device) + offsets[:, 1:]).clamp_(0, w - 1)
        return (ys[:, :, None] * w + xs[:, None, :]).flatten(1)

    def operator(self, aff: torch.Tensor) -> torch.Tensor:
        """aff: (B, n, H, W) -> sparse CSR (B*H*W, B*H*W) with n entries per row: row p holds
        aff[:, i, p] at the column of its neighbour i, so one iteration is one product."""
        b, n, h, w = aff.shape
        # int32 indices where they fit: the CPU (MKL) product is ~1.5x faster with them.
        itype = torch.int32 if b * h * w * n < 2**31 else torch.int64
        index = self.neighbour_index(h, w, aff.device).t().to(itype)  # (H*W, n)
        base = torch.arange(b, device=aff.device, dtype=itype)[:, None, None] * (h * w)
        cols = (index[None] + base).flatten()
        rows = torch.arange(0, b * h * w * n + 1, n, device=aff.device, dtype=itype)
        values = aff.flatten(2).transpose(1, 2).flatten()  # (B, H*W, n), neighbours in order
        with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(rows, cols, values, size=(b * h * w, b * h * w),
                                           check_invariants=False)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W); masks: (B, C, h, w) -> refined masks (B, C, H, W)."""
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(images)
        if self.sparse:
            return self._propagate_sparse(aff, masks)
        aff = aff.unsqueeze(1)  # (B, 1, n, H, W), shared by all channels
        for _ in range(self.num_iter):
            # Accumulate neighbour by neighbour rather than stacking (B, C, n, H, W): memory stays
            # O(B*C*H*W), which matters when refine_label runs all K+1 channels of a batch at once.
            views = self._neighbours(masks)
            out = views[0] * aff[:, :, 0]
            for i in range(1, len(views)):
                out = out.addcmul_(views[i], aff[:, :, i])
            masks = out
        return masks

    def _propagate_sparse(self, aff: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Each iteration, mask <- sum_i mask_i * aff_i, as one sparse (n nonzeros a row) matrix
        product, the same for every channel: one kernel an iteration and O(B*C*H*W) memory."""
        b, c, h, w = masks.shape
        op = self.operator(aff)
        x = masks.permute(0, 2, 3, 1).reshape(b * h * w, c)
        for _ in range(self.num_iter):
            x = op @ x
        return x.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
