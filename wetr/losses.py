"""MoRe training losses (METHOD.md §5), as pure tensor functions.

Every loss returns a scalar tensor, keeps the inputs' device, has no host syncs and no Python
loops over tokens, classes or images. The image classification losses are plain
`F.multilabel_soft_margin_loss`; the dense energy loss lives in `wetr.energy`.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.metrics import IGNORE_INDEX

from .config import UneConfig

UNE = UneConfig()  # the defaults (read only)


def class_token_loss(class_tokens: Tensor, cls_label: Tensor | None = None, temp: float = 0.07) -> Tensor:
    """GCR class-token regularisation: each normalised class token must pick itself out of all K.

    class_tokens: (B, K, D); cls_label: (B, K), unused (the reference computes this loss with
    `only_regu=True`, which ignores the labels; the argument keeps the METHOD.md §11 signature).
    logits = Ẑ Ẑᵀ / temp; cross-entropy with target k for row k, mean over B·K rows.
    """
    b, k, _ = class_tokens.shape
    z = F.normalize(class_tokens, dim=-1)
    logits = z @ z.transpose(1, 2) / temp
    # The reference feeds (B,K,K) to cross_entropy, i.e. it scores columns; the matrix is
    # symmetric, so rows are the same thing.
    target = torch.arange(k, device=class_tokens.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * k, k), target)


def cle_loss(class_tokens: Tensor, patch_map: Tensor, token_label: Tensor, cls_label: Tensor,
             temp: float) -> Tensor:
    """CLE: pull each present class token towards the patch tokens confidently labelled with it.

    class_tokens: (B, K, D); patch_map: (B, D, h, w), detached and not normalised;
    token_label: (B, h, w) long, 0 bkg, 1..K, 255 ignore; cls_label: (B, K) 0/1.
    loss_n = −log(exp(l_n) / (Σ_m exp(l_m) + 1e-4)) = log(Σ_m exp(l_m) + 1e-4) − l_n, computed as
    logaddexp(logsumexp(l), log 1e-4) − l_n so that float32 never overflows.
    """
    b, k, _ = class_tokens.shape
    z = F.normalize(class_tokens, dim=2, eps=1e-8)
    logits = z @ patch_map.detach().flatten(2) / temp  # (B, K, N)
    log_denom = torch.logaddexp(logits.logsumexp(dim=2, keepdim=True),
                                logits.new_full((), math.log(1e-4)))
    token_loss = log_denom - logits
    classes = torch.arange(1, k + 1, device=token_label.device)
    mask = (token_label.flatten(1)[:, None, :] == classes[None, :, None]).to(logits.dtype)
    term = (mask * token_loss).sum(dim=2) / (mask.sum(dim=2) + 1e-4)  # (B, K)
    present = (cls_label == 1).to(logits.dtype)
    return (present * term).sum() / b


def _une_choose(token_label: Tensor, keys: Tensor, une: UneConfig = UNE) -> tuple[Tensor, Tensor]:
    """UNE token choice given the random keys (deterministic part of `une_token_indices`).

    une: num_tokens, window, border, thresh, true_position (`wetr.config.UneConfig`, or the
    run config's `une` node).
    token_label: (B, h, w); keys: (2, B, h − 2·border, w − 2·border) uniform in [0, 1): keys[0]
    orders the uncertain candidates, keys[1] the extra positions (lowest keys are taken, which
    is a uniform random subset like the reference's randperm).
    Returns index (B, S) into the flattened h·w grid and valid (B, S) bool, S = num_tokens +
    num_tokens // 4 (at most num_tokens are valid per image).
    """
    num_tokens, window, border, thresh = une.num_tokens, une.window, une.border, une.thresh
    b, h, w = token_label.shape
    hi, wi = h - 2 * border, w - 2 * border
    if hi <= 0 or wi <= 0:  # no inner grid: nothing to choose (the reference crashes here)
        empty = token_label.new_zeros((b, 0), dtype=torch.long)
        return empty, empty.bool()
    roi = torch.where(token_label == IGNORE_INDEX, 1, torch.where(token_label >= 1, 2, 0))
    inner = roi[:, border:h - border, border:w - border].flatten(1)  # (B, Ni)
    # Window sums roi[i:i+window, j:j+window] for every inner (i, j); zero padding mimics the
    # reference's slices running off the map when window > 2·border + 1. Sums of small integers
    # are exact in float32, and dividing then comparing repeats the reference's test.
    padded = F.pad(roi[:, None].float(), (0, window, 0, window))
    win_sum = F.avg_pool2d(padded, window, stride=1, divisor_override=1)[:, 0, :hi, :wi].flatten(1)
    cand = (inner == 1) & (win_sum / (window * window) >= thresh)
    count = cand.sum(dim=1, keepdim=True)

    n_inner = hi * wi
    s1, s2 = min(num_tokens, n_inner), min(num_tokens // 4, n_inner)
    slots1 = torch.arange(s1, device=roi.device)
    slots2 = torch.arange(s2, device=roi.device)
    order1 = torch.where(cand, keys[0].flatten(1), 2.0).argsort(dim=1, stable=True)[:, :s1]
    valid1 = slots1 < count  # all candidates, or num_tokens of them
    # At most num_tokens candidates: add (num_tokens − count) // 4 positions labelled with a
    # class, or any inner positions if there are too few of those.
    n_extra = torch.where(count > num_tokens, 0, (num_tokens - count) // 4)
    pool = inner == 2
    pool = pool | (pool.sum(dim=1, keepdim=True) < n_extra)
    order2 = torch.where(pool, keys[1].flatten(1), 2.0).argsort(dim=1, stable=True)[:, :s2]
    valid2 = slots2 < torch.minimum(n_extra, pool.sum(dim=1, keepdim=True))

    chosen = torch.cat([order1, order2], dim=1)
    # The reference takes the token at the inner coordinates (i, j) (a quirk); its window
    # roi[i:i+6, j:j+6] is already centred on the true position (i + border, j + border).
    offset = border if une.true_position else 0
    index = (chosen // wi + offset) * w + chosen % wi + offset
    return index, torch.cat([valid1, valid2], dim=1)


def une_token_indices(token_label: Tensor, une: UneConfig = UNE,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random UNE token choice (METHOD.md §5). token_label: (B, h, w); une: as `_une_choose`.

    Returns index (B, S) into the flattened h·w grid and valid (B, S) bool.
    """
    b, h, w = token_label.shape
    shape = (2, b, max(h - 2 * une.border, 0), max(w - 2 * une.border, 0))
    keys = torch.rand(shape, generator=generator, device=token_label.device)
    return _une_choose(token_label, keys, une)


def une_value(class_tokens: Tensor, patch_map: Tensor, cls_label: Tensor, index: Tensor,
              valid: Tensor) -> Tensor:
    """UNE value for given tokens: push uncertain tokens away from absent classes.

    class_tokens: (B, K, D) (detached here); patch_map: (B, D, h, w); cls_label: (B, K) 0/1;
    index, valid: (B, S) from `une_token_indices`. Mean over valid tokens; 0 (with a graph)
    when none is valid.
    """
    d = patch_map.shape[1]
    u = F.normalize(patch_map, dim=1, eps=1e-8).flatten(2).transpose(1, 2)  # (B, N, D)
    u = u.gather(1, index[..., None].expand(-1, -1, d))  # (B, S, D)
    z = F.normalize(class_tokens, dim=2, eps=1e-8).detach()
    s = (u @ z.transpose(1, 2)).abs()  # (B, S, K)
    pos = cls_label.to(s.dtype)
    neg = (cls_label == 0).to(s.dtype)
    term = (0.5 * (1 - (s * pos[:, None]).sum(-1) / (pos.sum(-1, keepdim=True) + 1))
            + 0.5 * (s * neg[:, None]).sum(-1) / (neg.sum(-1, keepdim=True) + 1))
    valid = valid.to(s.dtype)
    return (term * valid).sum() / valid.sum().clamp(min=1)


def une_loss(class_tokens: Tensor, patch_map: Tensor, token_label: Tensor, cls_label: Tensor,
             une: UneConfig = UNE, generator: torch.Generator | None = None) -> Tensor:
    """UNE on up to `une.num_tokens` random uncertain tokens per image (METHOD.md §5).

    class_tokens: (B, K, D); patch_map: (B, D, h, w); token_label: (B, h, w); cls_label: (B, K).
    une: as `_une_choose`; `une.true_position=True` takes the token at the true position instead
    of the reference's inner coordinates.
    """
    index, valid = une_token_indices(token_label, une, generator)
    return une_value(class_tokens, patch_map, cls_label, index, valid)


def ptc_loss(patch_map: Tensor, token_label: Tensor) -> Tensor:
    """ToCo patch-token contrast: |cos| of same-label pairs up, of different-label pairs down.

    patch_map: (B, D, h, w); token_label: (B, h, w), 255 ignored. Pairs with an ignored token and
    the diagonal are left out; sums are over the whole batch.
    """
    x = F.normalize(patch_map.flatten(2), dim=1, eps=1e-8)
    cos = (x.transpose(1, 2) @ x).abs()  # (B, N, N)
    label = token_label.flatten(1)
    n = label.shape[1]
    known = label != IGNORE_INDEX
    kept = known[:, :, None] & known[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=label.device)
    same = label[:, :, None] == label[:, None, :]
    pos = (kept & same).to(cos.dtype)
    neg = (kept & ~same).to(cos.dtype)
    return (0.5 * (1 - (pos * cos).sum() / (pos.sum() + 1))
            + 0.5 * (neg * cos).sum() / (neg.sum() + 1))


def seg_loss(seg_logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy averaged separately over background and foreground pixels, then halved.

    seg_logits: (B, C, H, W) already at label size; label: (B, H, W) long, 255 ignored.
    Each part is summed over the batch and divided by its pixel count + 1e-6.
    """
    ce = F.cross_entropy(seg_logits, label.masked_fill(label == IGNORE_INDEX, 0), reduction="none")
    bg = label == 0
    fg = ~bg & (label != IGNORE_INDEX)
    bg_loss = torch.where(bg, ce, 0).sum() / (bg.sum() + 1e-6)
    fg_loss = torch.where(fg, ce, 0).sum() / (fg.sum() + 1e-6)
    return 0.5 * (bg_loss + fg_loss)


from wetr.energy import dense_energy_loss  # noqa: F401
