"""ViT encoder with 4 extra tokens and one class token per foreground class (METHOD.md §1).

Built from timm's ViT parts (``PatchEmbed``, ``Block``) with the options of a timm backbone,
read by name (`wetr.backbones.backbone_facts`); parameter names equal the reference checkpoints' ``encoder.*``
keys (METHOD.md §10): ``cls_token (1,T,D)``, ``pos_embed (1,T+n*n,D)``, ``patch_embed.proj.*``,
``blocks.i.*``, ``norm.*``, ``head.*`` (Linear D->T, unused). Other families add their own:
``reg_token (1,R,D)`` (DINOv2 registers), ``norm_pre.*`` (CLIP), ``blocks.i.ls1/ls2.gamma``
(LayerScale).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.checkpoint import CheckpointError

from .backbones import PRETRAINED_TAGS, backbone_facts

NUM_EXTRA_TOKENS = 4
class EncoderOutput(NamedTuple):
    class_tokens: torch.Tensor  # (B, K, D), after the final norm
    patch_map: torch.Tensor  # (B, D, h, w), after the final norm
    aux_map: torch.Tensor  # (B, D, h, w), output of block `aux_layer`
    attn_map: torch.Tensor  # (B, K, h, w), last block's raw class->patch q.k summed over heads, no grad


def resample_patch_pos_embed(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic resampling of a square patch position grid to (h, w), DINO style.

    The scale factors ((h+0.1)/n, (w+0.1)/n), not the output size, set the sampling coordinates;
    reference checkpoints were trained with exactly this resampling.
    pos: (1, n*n, D) -> (1, h*w, D)
    """
    n = math.isqrt(pos.shape[1])
    grid = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic",
                         align_corners=False)
    assert grid.shape[-2:] == (h, w), f"pos-embed resampling gave {tuple(grid.shape[-2:])}, want {(h, w)}"
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """tokens: (B, h*w, D) -> (B, D, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class ClassTokenViT(nn.Module):
    """ViT with T = E + K leading tokens (E extra, K class), R register tokens, then the
    N = h*w patch tokens.

    Args:
        num_fg_classes: K, number of foreground classes (one class token each).
        backbone: a timm ViT name (`FAMILIES`, optionally "name.tag"): its block options, stored
            position grid and, unless given, width / depth / heads / patch size.
        pretrained: False (random init), True (timm hub weights of the backbone's tag) or a path
            to a timm weight file (.pth / .npz) of the same width and depth.
        img_size: side whose patch grid the position embeddings are stored for (None: the
            backbone's pretrained size: 224 for ViT-B/16, a 14x14 grid).
        aux_layer: index into the per-block outputs for the aux patch map (-3: block 10 of 12).
        num_extra_tokens: E, the leading tokens before the class tokens (docs/METHOD.md §1: 4).
    """

    def __init__(
            self,
            num_fg_classes: int,
            backbone: str = "vit_base_patch16_224",
            pretrained: bool | str | Path = False,
            img_size: int | None = None,
            patch_size: int | None = None,
            embed_dim: int | None = None,
            depth: int | None = None,
            num_heads: int | None = None,
            aux_layer: int = -3,
            num_extra_tokens: int = NUM_EXTRA_TOKENS,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        facts = backbone_facts(backbone)
        patch_size = patch_size or facts.patch_size
        embed_dim = embed_dim or facts.embed_dim
        depth = depth or facts.depth
        num_heads = num_heads or facts.num_heads
        img_size = img_size or facts.img_size
        if not -depth <= aux_layer < depth:
            raise ValueError(f"aux_layer={aux_layer} does not index one of the {depth} blocks "
                             f"(model.depth={depth}; the reference uses -3 with depth 12)")
        self.num_fg_classes = num_fg_classes
        self.num_extra_tokens = num_extra_tokens
        self.num_tokens = num_extra_tokens + num_fg_classes
        self.num_reg_tokens = facts.reg_tokens
        self.num_prefix_tokens = self.num_tokens + facts.reg_tokens  # patch tokens start here
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.aux_layer = aux_layer
        self.backbone = backbone
        self.img_size = img_size
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=facts.norm_eps)

        # Inputs of any size: forward() crops to a multiple of the patch size, as the strided conv would.
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                      bias=facts.patch_bias, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        # Registers take no position (the DINOv2-reg layout, timm's no_embed_class).
        self.reg_token = nn.Parameter(torch.zeros(1, facts.reg_tokens, embed_dim)) if facts.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens + num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = norm_layer(embed_dim) if facts.pre_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=facts.mlp_ratio, qkv_bias=facts.qkv_bias,
                  proj_drop=drop_rate, attn_drop=attn_drop_rate, init_values=facts.init_values,
                  drop_path=dpr[i], act_layer=facts.act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        for blk in self.blocks:
            blk.attn.fused_attn = True
        self.norm = norm_layer(embed_dim)
        # Unused by the forward, kept for checkpoint compatibility; frozen (it never gets a gradient
        # anyway) so DDP does not need find_unused_parameters.
        self.head = nn.Linear(embed_dim, self.num_tokens).requires_grad_(False)

        # The RNG draws of the reference's ViT-B first; a family's own parameters after them.
        self.apply(init_weights_vit_timm)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm's
        if pretrained:
            self.load_pretrained(pretrained)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (training only; the gradients are the same)."""
        self.grad_checkpointing = enable

    def load_pretrained(self, source: bool | str | Path) -> None:
        """Initialise from a single-CLS-token timm ViT of the backbone (METHOD.md §1).

        Every one of the T tokens is a copy of the pretrained CLS token; the T token position
        embeddings are copies of the CLS position embedding (zeros for a backbone without one,
        `no_embed_class`) except the first E, drawn from a truncated normal (std 1, cut at
        +-2). Registers are copied as they are; the patch grid comes resized to the stored one
        by timm. The head keeps its random init (other shape).
        """
        sd = _pretrained_state_dict(self, source)
        facts = backbone_facts(self.backbone)
        cls_pos = (torch.zeros_like(sd["cls_token"][:, :1]) if facts.no_embed_class
                   else sd["pos_embed"][:, :1])
        pos_tokens = sd["pos_embed"][:, 0 if facts.no_embed_class else 1:]
        if pos_tokens.shape[1] != self.pos_embed.shape[1] - self.num_tokens:
            raise RuntimeError(f"pretrained position grid of {pos_tokens.shape[1]} patches does "
                               f"not fit the encoder's {self.patch_embed.grid_size}")
        token_pos = cls_pos.repeat(1, self.num_tokens, 1)
        extra = self.num_extra_tokens
        token_pos[:, :extra] = trunc_normal_(torch.zeros_like(token_pos[:, :extra]))
        sd["pos_embed"] = torch.cat([token_pos, pos_tokens], dim=1)
        sd["cls_token"] = sd["cls_token"][:, :1].repeat(1, self.num_tokens, 1)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            raise RuntimeError(f"pretrained weights do not fit the encoder: missing {missing}, "
                               f"unexpected {unexpected}")

    def class_patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw q.k of class tokens against patch tokens in the last block, summed over heads.

        Summing the per-head dot products equals one dot product over all D channels, so only
        the K query rows and N key rows are projected (no T+N square). No softmax, no scaling.
        x: (B, T+R+N, D) input of the last block -> (B, K, N), no grad.
        """
        blk, d = self.blocks[-1], self.embed_dim
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        with torch.no_grad():
            y = blk.norm1(x)
            q = F.linear(y[:, self.num_extra_tokens:self.num_tokens], w[:d], None if b is None else b[:d])
            k = F.linear(y[:, self.num_prefix_tokens:], w[d:2 * d], None if b is None else b[d:2 * d])
            return q @ k.transpose(1, 2)

    def pos_embed_for(self, h: int, w: int, square_input: bool) -> torch.Tensor:
        """Position embeddings for a (h, w) grid: (1, T+h*w, D)."""
        tokens_pos = self.pos_embed[:, :self.num_tokens]
        patch_pos = self.pos_embed[:, self.num_tokens:]
        # Reference quirk: the stored grid is used as is only for square inputs with the stored
        # number of patches; otherwise it is always resampled (even to the same size).
        if h * w == patch_pos.shape[1] and square_input:
            return self.pos_embed
        return torch.cat([tokens_pos, resample_patch_pos_embed(patch_pos, h, w)], dim=1)

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """x: (B, 3, H, W) normalised images; (h, w) = (H // patch_size, W // patch_size)."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x[..., :h * self.patch_size, :w * self.patch_size])
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed_for(h, w, square_input=H == W))
        if self.reg_token is not None:
            x = torch.cat([x[:, :self.num_tokens], self.reg_token.expand(B, -1, -1),
                           x[:, self.num_tokens:]], dim=1)
        x = self.norm_pre(x)

        feats = []
        for blk in self.blocks[:-1]:
            x = self._block(blk, x)
            feats.append(x)
        scores = self.class_patch_scores(x)
        x = self.norm(self._block(self.blocks[-1], x))
        feats.append(x)  # as in the reference, the last "block output" is the normed one

        p = self.num_prefix_tokens
        return EncoderOutput(
            class_tokens=x[:, self.num_extra_tokens:self.num_tokens],
            patch_map=tokens_to_map(x[:, p:], h, w),
            aux_map=tokens_to_map(feats[self.aux_layer][:, p:], h, w),
            attn_map=scores.reshape(B, self.num_fg_classes, h, w),
        )


def _pretrained_state_dict(encoder: ClassTokenViT, source: bool | str | Path) -> dict[str, torch.Tensor]:
    """State dict of the encoder's timm backbone with the encoder's shape, from the hub or a
    local file."""
    tag = backbone_facts(encoder.backbone).tag
    # timm resizes the pretrained patch embedding and position grid to these itself
    arch = dict(embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                patch_size=encoder.patch_size, img_size=encoder.img_size)
    if source is True:
        try:
            vit = timm.create_model(tag, pretrained=True, **arch)
        except Exception as e:  # offline, hub unreachable, cache missing: one actionable line
            weights = ("jx_vit_base_p16_224-80ecf9dd.pth" if tag == PRETRAINED_TAGS["vit_base_patch16_224"]
                       else f"{tag}.pth")
            raise CheckpointError(f"could not fetch pretrained {tag} ({type(e).__name__}); when "
                                  f"offline pass model.pretrained=/path/to/{weights}") from e
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weight file not found: {path} (model.pretrained)")
        vit = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **arch)
    return vit.state_dict()
