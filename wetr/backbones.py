"""The timm ViT families MoRe runs on, and what the encoder takes from each (docs/BACKBONES.md).

`backbone_facts(name)` reads a family's sizes and block options from timm's own model, built on
the meta device (no weights, no network); `FAMILIES` lists the accepted architectures and
`FAMILY_TAGS` the weights of docs/BACKBONES.md's table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

# timm tag of the original JAX ViT-B/16 (file jx_vit_base_p16_224-80ecf9dd.pth) used by the paper;
# a name without a tag takes timm's default tag otherwise.
PRETRAINED_TAGS = {"vit_base_patch16_224": "vit_base_patch16_224.orig_in21k_ft_in1k"}
# The timm architectures the encoder is built for, by family (a name may carry a ".tag").
FAMILIES = {
    "ViT": ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
            "vit_large_patch16_224"),
    "DeiT": ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"),
    "DeiT-III": ("deit3_small_patch16_224", "deit3_base_patch16_224", "deit3_large_patch16_224"),
    "CLIP": ("vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224"),
    "DINOv2": ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
               "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2",
               "vit_large_patch14_reg4_dinov2"),
}

# The families of docs/BACKBONES.md's table, each by the timm tag its weights come by (the
# benchmark's rows and the tests' cases).
FAMILY_TAGS = {
    "ViT-S/16": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "ViT-B/16 (default, JAX)": "vit_base_patch16_224",
    "ViT-B/16 (augreg)": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "ViT-L/16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "DeiT-B/16": "deit_base_patch16_224.fb_in1k",
    "DeiT-III-B/16": "deit3_base_patch16_224.fb_in22k_ft_in1k",
    "CLIP-B/16": "vit_base_patch16_clip_quickgelu_224.openai",
    "DINOv2-B/14": "vit_base_patch14_dinov2.lvd142m",
    "DINOv2-B/14-reg4": "vit_base_patch14_reg4_dinov2.lvd142m",
}


@dataclass(frozen=True)
class Backbone:
    """What the encoder takes from a timm ViT: sizes, the pretrained grid and the block options.

    tag: the timm name weights are fetched by; img_size: the pretrained image side (its patch
    grid is the stored position grid); init_values: LayerScale's (None: no LayerScale);
    pre_norm: a LayerNorm before the blocks (CLIP's `norm_pre`); reg_tokens: register tokens
    (DINOv2-reg); no_embed_class: the pretrained class token has no position embedding.
    """
    tag: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    mlp_ratio: float
    qkv_bias: bool
    patch_bias: bool
    init_values: float | None
    pre_norm: bool
    act_layer: type[nn.Module]
    norm_eps: float
    reg_tokens: int
    no_embed_class: bool


def supported_backbones() -> str:
    """The supported families and their timm names, in one line."""
    return "; ".join(f"{family}: {', '.join(names)}" for family, names in FAMILIES.items())


def is_supported(name: str) -> bool:
    """Whether timm name `name` ("arch" or "arch.tag") is of a supported architecture."""
    return any(name.partition(".")[0] in names for names in FAMILIES.values())


@functools.lru_cache(maxsize=None)
def backbone_facts(name: str) -> Backbone:
    """The `Backbone` of timm name `name` ("arch" or "arch.tag"), read from timm's model built on
    the meta device (no weights, no network). An unknown or unsupported name is a one-line
    ValueError listing the supported families."""
    arch, _, tag = name.partition(".")
    if not is_supported(name):
        raise ValueError(f"unknown backbone {name!r}; supported timm names (optionally with a "
                         f".tag): {supported_backbones()}")
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # e.g. a tag timm does not know
        raise ValueError(f"backbone {name!r}: {str(exc).splitlines()[0]}") from None
    blk = vit.blocks[0]
    assert type(vit) is VisionTransformer and type(blk) is Block and type(blk.mlp) is Mlp, name
    assert vit.has_class_token and not (vit.num_reg_tokens and not vit.no_embed_class), name
    return Backbone(
        tag=name if tag else PRETRAINED_TAGS.get(arch, arch),
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=blk.attn.num_heads,
        patch_size=vit.patch_embed.patch_size[0], img_size=vit.patch_embed.img_size[0],
        mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        patch_bias=vit.patch_embed.proj.bias is not None,
        init_values=blk.ls1.init_values if isinstance(blk.ls1, LayerScale) else None,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity), act_layer=type(blk.mlp.act),
        norm_eps=vit.norm.eps, reg_tokens=vit.num_reg_tokens, no_embed_class=vit.no_embed_class)
