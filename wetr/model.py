"""MoRe network: class-token ViT, classifiers, LargeFOV decoder and GCR (METHOD.md §1-3, 10).

Built from a `MoReSpec` (`MoRe(spec)`, or `build_model(...)` with its fields as keyword
arguments); from a training config or a checkpoint through wetr/factory.py."""
from __future__ import annotations

from dataclasses import Field, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import option
from wetr.backbones import backbone_facts, is_supported, supported_backbones
from wetr.encoder import ClassTokenViT
from wetr.gcr import GraphCategoryRepresentation


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
    (cam, aux_cam) of this very pass (each (B, K, h, w), detached) when forward was asked for
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


@dataclass(frozen=True)
class MoReSpec:
    """Which MoRe: every argument that decides its weights' shapes and what it computes in eval
    mode (timm style: the keyword arguments of `build_model`, less the weights' source
    `pretrained` and the training-only `drop_path_rate`). A built model keeps its resolved spec
    (`model.spec`, no None left); checkpoints save it as a plain dict under "spec" and the tools
    rebuild the model from it (wetr/factory.py).

    The one definition of the model's fields: each is an `option` (default and help), and the
    config schemas take them from here (`options`: wetr.config.ModelConfig and the tools'
    InferModel).
    """
    num_classes: int = option(21, "K + 1 (background counted)")
    backbone: str = option("vit_base_patch16_224", "timm ViT name, optionally with a .tag of its "
                                                   "weights (sets width, depth, heads, patch, "
                                                   "block options; docs/BACKBONES.md)",
                           check=(is_supported, "a timm name of a supported family ("
                                                + supported_backbones() + ")"))
    embed_dim: int | None = option(None, "width; None: the backbone's own (768 for ViT-B)")
    depth: int | None = option(None, "transformer blocks; None: the backbone's own (12)")
    num_heads: int | None = option(None, "attention heads; None: the backbone's own (12)")
    patch_size: int | None = option(None, "None: the backbone's own (16); 8 for small images")
    decoder_dim: int = option(512, "LargeFOV width (the reference's 512)")
    decoder_dilation: int = option(5, "LargeFOV dilation (the reference's 5, on a 28-token grid; "
                                      "a small token grid wants a smaller one)")
    aux_layer: int = option(-3, "block whose patch tokens feed the aux classifier (-3: third "
                                "last)")
    gcr_topk_ratio: float = option(0.5, "GCR neighbours per class token: int(ratio x K) (METHOD.md §3)")
    gcr_gate_score: str = option("reference", "GCR gate score: reference (sum_D Nb x sum_D g, "
                                              "the reference's code) | dot (the paper's formula)",
                                 choices=("reference", "dot"))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order (the keys of a saved spec)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def options(cls, skip: tuple[str, ...] = ("num_classes",), unset: str | None = None
                ) -> list[tuple[str, str, Field]]:
        """The fields less `skip` as `(name, type, option)` for `dataclasses.make_dataclass`
        (a config schema; the type as written here). unset: the fields default to None, which
        means `unset`."""
        out = []
        for f in fields(cls):
            if f.name in skip:
                continue
            text, choices, check = f.metadata["help"], f.metadata["choices"], f.metadata["check"]
            if unset is None:
                out.append((f.name, f.type, option(f.default, text, choices, check)))
            else:
                optional = f.type if f.type.endswith("| None") else f"{f.type} | None"
                out.append((f.name, optional, option(None, f"{text}; null: {unset}", choices, check)))
        return out

    def resolved(self) -> MoReSpec:
        """The same spec with the backbone's width / depth / heads / patch for what is None.
        Raises ValueError (one line) on an unknown backbone or a non-positive size."""
        facts = backbone_facts(self.backbone)
        for name, must in (("patch_size", "a positive number of pixels"),
                           ("decoder_dim", "positive"), ("decoder_dilation", "positive")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be {must}, got {value}")
        return replace(self, embed_dim=self.embed_dim or facts.embed_dim,
                       depth=self.depth or facts.depth, num_heads=self.num_heads or facts.num_heads,
                       patch_size=facts.patch_size if self.patch_size is None else self.patch_size)


class MoRe(nn.Module):
    """The MoRe of `spec` (MoReSpec; resolved here). pretrained: False, True (timm hub) or a timm
    ViT weight file for the encoder; drop_path_rate: stochastic depth of its blocks."""

    def __init__(self, spec: MoReSpec, pretrained: bool | str | Path = False,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.spec = spec = spec.resolved()
        # Built in the reference's order (encoder, classifiers, decoder, GCR): the random
        # initialisation draws from the RNG in that order.
        self.encoder = ClassTokenViT(spec.num_classes - 1, backbone=spec.backbone,
                                     pretrained=pretrained, embed_dim=spec.embed_dim,
                                     depth=spec.depth, num_heads=spec.num_heads,
                                     patch_size=spec.patch_size, aux_layer=spec.aux_layer,
                                     drop_path_rate=drop_path_rate)
        self.num_classes = num_classes = spec.num_classes
        self.patch_size = spec.patch_size
        self.embed_dim = d = spec.embed_dim
        self.classifier = nn.Conv2d(d, num_classes - 1, 1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_classes - 1, 1, bias=False)
        self.decoder = LargeFOV(d, num_classes, dilation=spec.decoder_dilation,
                                mid_planes=spec.decoder_dim)
        self.graph_layer = GraphCategoryRepresentation(d, topk_ratio=spec.gcr_topk_ratio,
                                                       gate_score=spec.gcr_gate_score)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[backbone non-norm, backbone norms, classifiers + GCR, decoder] (METHOD.md §6)."""
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.encoder.named_parameters():
            groups[1 if "norm" in name else 0].append(param)
        groups[2] += [self.classifier.weight, self.aux_classifier.weight, *self.graph_layer.parameters()]
        groups[3] += list(self.decoder.parameters())
        return groups

    @torch.no_grad()
    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier weights at every position: x (B, 3, H, W) -> (cam, aux_cam), each (B, K, h, w)
        (the order of wetr.cam.multi_scale_cam's result)."""
        return self._cams_of(self.encoder(x))

    @torch.no_grad()
    def _cams_of(self, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam, aux_cam) from an encoder output: the classifiers at every token (METHOD.md §2)."""
        return (F.conv2d(enc.patch_map, self.classifier.weight),
                F.conv2d(enc.aux_map, self.aux_classifier.weight))

    def forward(self, x: torch.Tensor, cam_only: bool = False, with_gcr: bool = True,
                with_cams: bool = False) -> MoReOutput:
        """x: (B, 3, H, W) normalised images -> MoReOutput.

        with_cams: also set the output's `cams` to this pass's (cam, aux_cam), detached, so that
        the training step need not run the same images through the network again for the
        scale-1.0 CAM (METHOD.md §4); asked through forward (not another method) so that DDP's hooks
        see the pass. cam_only: the reference's forward contract, `model(x, cam_only=True) ->
        (aux_cam, cam)` in the reference's order, kept for outside code written against it
        (METHOD.md §11); the project itself calls `cams(x)`.
        """
        if cam_only:
            cam, aux_cam = self.cams(x)
            return aux_cam, cam
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


def build_model(num_classes: int = 21, backbone: str = "vit_base_patch16_224",
                pretrained: bool | str | Path = False, drop_path_rate: float = 0.0,
                **spec) -> MoRe:
    """MoRe with K = num_classes - 1 class tokens: `MoRe(MoReSpec(num_classes, backbone,
    **spec), pretrained, drop_path_rate)`; `spec` takes MoReSpec's other fields
    (embed_dim, depth, num_heads, patch_size, decoder_dim, decoder_dilation, aux_layer,
    gcr_topk_ratio, gcr_gate_score). Width / depth / heads / patch size override the backbone's
    (timm resamples a pretrained patch embedding to another patch size)."""
    return MoRe(MoReSpec(num_classes, backbone, **spec), pretrained, drop_path_rate)
