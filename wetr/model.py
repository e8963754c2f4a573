"""MoRe network: class-token ViT, classifiers, LargeFOV decoder and GCR (SPEC 1-3, 10)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wetr.encoder import ClassTokenViT
from wetr.gcr import GraphCategoryRepresentation

# width, depth, heads of the supported backbones (all patch 16, MLP ratio 4, qkv bias)
BACKBONES = {
    "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
    "vit_large_patch16_224": (1024, 24, 16),
}


class _Outputs(NamedTuple):
    cls_logits: torch.Tensor  # (B, K) from the global max-pool of the final patch map
    seg_logits: torch.Tensor  # (B, K+1, h, w)
    patch_map: torch.Tensor  # (B, D, h, w) final patch tokens (after the final norm)
    aux_logits: torch.Tensor  # (B, K) from the aux patch map
    class_tokens: torch.Tensor  # (B, K, D), after GCR when with_gcr
    attn_map: torch.Tensor  # (B, K, h, w) last block's raw class->patch attention, detached


class MoReOutput(_Outputs):
    """What `MoRe.forward` returns: a NamedTuple of the six maps above (it unpacks to six, as
    the reference's forward contract), plus one attribute that is not a field: `cams`, the
    (aux_cam, cam) of this very pass (each (B, K, h, w), detached) when forward was asked for
    them (`with_cams=True`), else None. An attribute, not a seventh field, so that code unpacking
    the six keeps working."""

    cams: tuple[torch.Tensor, torch.Tensor] | None = None


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two dilated 3x3 convs with ReLU, then a 1x1 classifier (no biases)."""

    def __init__(self, in_planes: int, out_planes: int, dilation: int = 5, mid_planes: int = 512) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(in_planes, mid_planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(mid_planes, mid_planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(mid_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, h, w) -> (B, K+1, h, w)."""
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))


class MoRe(nn.Module):
    """Args: num_classes: K+1 (background counted); encoder: a ClassTokenViT with K class tokens;
    decoder_dim / decoder_dilation: LargeFOV width and dilation (512 and 5 in the reference)."""

    def __init__(self, encoder: ClassTokenViT, num_classes: int, gcr_topk_ratio: float = 0.5,
                 gcr_gate_score: str = "reference", decoder_dim: int = 512,
                 decoder_dilation: int = 5) -> None:
        super().__init__()
        if encoder.num_fg_classes != num_classes - 1:
            raise ValueError(f"encoder has {encoder.num_fg_classes} class tokens, expected {num_classes - 1}")
        self.num_classes = num_classes
        self.patch_size = encoder.patch_size
        self.embed_dim = d = encoder.embed_dim
        self.encoder = encoder
        self.classifier = nn.Conv2d(d, num_classes - 1, 1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_classes - 1, 1, bias=False)
        self.decoder = LargeFOV(d, num_classes, dilation=decoder_dilation, mid_planes=decoder_dim)
        self.graph_layer = GraphCategoryRepresentation(d, topk_ratio=gcr_topk_ratio, gate_score=gcr_gate_score)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[backbone non-norm, backbone norms, classifiers + GCR, decoder] (SPEC 6)."""
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.encoder.named_parameters():
            groups[1 if "norm" in name else 0].append(param)
        groups[2] += [self.classifier.weight, self.aux_classifier.weight, *self.graph_layer.parameters()]
        groups[3] += list(self.decoder.parameters())
        return groups

    @torch.no_grad()
    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier weights at every position: x (B, 3, H, W) -> (aux_cam, cam), each (B, K, h, w)."""
        return self._cams_of(self.encoder(x))

    @torch.no_grad()
    def _cams_of(self, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux_cam, cam) from an encoder output: the classifiers at every token (SPEC 2)."""
        return F.conv2d(enc.aux_map, self.aux_classifier.weight), F.conv2d(enc.patch_map, self.classifier.weight)

    def forward(self, x: torch.Tensor, cam_only: bool = False, with_gcr: bool = True,
                with_cams: bool = False) -> MoReOutput:
        """x: (B, 3, H, W) normalised images -> MoReOutput.

        with_cams: also set the output's `cams` to this pass's (aux_cam, cam), detached, so that
        the training step need not run the same images through the network again for the
        scale-1.0 CAM (SPEC 4); asked through forward (not another method) so that DDP's hooks
        see the pass. cam_only: the reference's `model(x, cam_only=True) -> (aux_cam, cam)`,
        kept for outside code written against it (SPEC 11); this project calls `cams(x)`.
        """
        if cam_only:
            return self.cams(x)
        enc = self.encoder(x)
        cls_logits = self.classifier(F.adaptive_max_pool2d(enc.patch_map, 1)).flatten(1)
        aux_logits = self.aux_classifier(F.adaptive_max_pool2d(enc.aux_map, 1)).flatten(1)
        seg_logits = self.decoder(enc.patch_map)
        class_tokens = enc.class_tokens
        if with_gcr:
            class_tokens = self.graph_layer(class_tokens, enc.patch_map.flatten(2).transpose(1, 2))
        out = MoReOutput(cls_logits, seg_logits, enc.patch_map, aux_logits, class_tokens, enc.attn_map)
        if with_cams:
            out.cams = self._cams_of(enc)
        return out


def build_model(
        num_classes: int = 21,
        backbone: str = "vit_base_patch16_224",
        pretrained: bool | str | Path = False,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        patch_size: int | None = None,
        decoder_dim: int = 512,
        decoder_dilation: int = 5,
        aux_layer: int = -3,
        drop_path_rate: float = 0.0,
        gcr_topk_ratio: float = 0.5,
        gcr_gate_score: str = "reference",
) -> MoRe:
    """MoRe with K = num_classes - 1 class tokens; width/depth/heads/patch size override the
    backbone's (timm resamples a pretrained patch embedding to another patch size); decoder_dim and
    decoder_dilation are the LargeFOV width and dilation (512 and 5 in the reference, whose 5 is
    a sixth of VOC's 28-token grid; a small token grid wants a smaller one)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if patch_size is not None and patch_size < 1:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
    if decoder_dim < 1:
        raise ValueError(f"decoder_dim must be positive, got {decoder_dim}")
    if decoder_dilation < 1:
        raise ValueError(f"decoder_dilation must be positive, got {decoder_dilation}")
    d, n, h = BACKBONES[backbone]
    encoder = ClassTokenViT(num_classes - 1, backbone=backbone, pretrained=pretrained, embed_dim=embed_dim or d,
                            depth=depth or n, num_heads=num_heads or h,
                            patch_size=16 if patch_size is None else patch_size,
                            aux_layer=aux_layer, drop_path_rate=drop_path_rate)
    return MoRe(encoder, num_classes, gcr_topk_ratio=gcr_topk_ratio, gcr_gate_score=gcr_gate_score,
                decoder_dim=decoder_dim, decoder_dilation=decoder_dilation)
