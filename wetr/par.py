"""Pixel-adaptive refinement (PAR, from AFA/ToCo; SPEC section 4).

Propagates a stack of per-class maps along dilated 8-neighbourhoods whose weights come from
colour similarity (image affinity) plus a small fixed position prior.
"""
import math
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
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 w1: float = 0.3, w2: float = 0.01):
        super().__init__()
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

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W); masks: (B, C, h, w) -> refined masks (B, C, H, W)."""
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(images).unsqueeze(1)  # (B, 1, n, H, W), shared by all channels
        for _ in range(self.num_iter):
            # Accumulate neighbour by neighbour rather than stacking (B, C, n, H, W): memory stays
            # O(B*C*H*W), which matters when refine_label runs all K+1 channels of a batch at once.
            views = self._neighbours(masks)
            out = views[0] * aff[:, :, 0]
            for i in range(1, len(views)):
                out = out.addcmul_(views[i], aff[:, :, i])
            masks = out
        return masks
