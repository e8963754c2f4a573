"""Dense energy (regularisation) loss of Tang et al.'s rloss, as in ToCo/MoRe (METHOD.md §5 "reg").

    S    = softmax(seg_logits), downscaled by `scale` (bilinear; image and label nearest)
    Gate = clip(1 - max_k S_k, 0) and 1 where the label is 255
    AS_k = sum_j exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2)) S_kj
    loss = -weight / B * sum_{k,i} S_ki AS_ki Gate_i,   dloss/dS = -2 weight / B AS Gate

The gradient is the reference's, not the derivative of the loss: Gate is a constant and the
filter is taken as symmetric. The two agree where Gate is constant and the filter exact; the
lattice operator is not symmetric (its directional blurs do not commute on a sparse lattice).

`AS` comes from one of two filters, both on the input's device:
- "permutohedral" (default): the reference's lattice (`wetr.permutohedral`), an unnormalised
  approximation of the Gaussian sum; equal to pydensecrf's lattice to float32 rounding. Its
  features are (x/sigma_xy, y/sigma_xy, r/sigma_rgb, g/sigma_rgb, b/sigma_rgb), x the column,
  in pixels of the downscaled image. Time and memory O(B N (d+1) C) plus a sort of the
  B N (d+1) lattice keys; off the CPU its tables have a fixed capacity, so the loss never
  waits for the device (no host sync).
- "exact": the true Gaussian sum times `exact_scale`, as an unnormalised attention over the
  features (fused scaled_dot_product_attention: O(N) memory, O(N^2 C) time).
Measured lattice / exact ratio of sum(AS) (sigma_rgb 15, sigma_xy 50, softmax maps): 0.47 on
smooth 24x24 images (the tests), 0.51-0.55 on smooth 48..224 px images, 0.39 (24 px) to
0.61 (224 px) on uniform pixel noise. METHOD.md §5 reports 0.57-0.59 on natural 224x224 images,
hence the default exact_scale 0.58. CPU, 2 threads, 224x224, B=2, C=21: lattice ~0.8 s,
exact ~17 s.
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from utils.metrics import IGNORE_INDEX
from wetr.permutohedral import permutohedral_filter

__all__ = ["bilateral_features", "exact_gaussian_filter", "bilateral_filter", "dense_energy_loss"]


def bilateral_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """images: (B, 3, H, W) in 0..255 -> features (B, H*W, 5) in the images' dtype.

    Order (x, y, r, g, b) with x the column index and pixels in row-major order, as rloss's
    `bilateralfilter`. The sigmas are device tensors because CUDA turns division by a Python
    scalar into a product with its reciprocal, which is not the reference's float32 bits; they
    are filled on the device (a host->device copy would wait for the device).
    """
    B, _, H, W = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(H, device=images.device, dtype=images.dtype),
        torch.arange(W, device=images.device, dtype=images.dtype),
        indexing="ij",
    )
    xy = torch.stack([xs, ys]).expand(B, 2, H, W) / images.new_full((1,), sigma_xy)
    rgb = images / images.new_full((1,), sigma_rgb)
    return torch.cat([xy, rgb], dim=1).flatten(2).transpose(1, 2)


def exact_gaussian_filter(features: Tensor, values: Tensor) -> Tensor:
    """out_i = sum_j exp(-|f_i - f_j|^2 / 2) values_j (self term included).

    Args:
        features: (B, N, d); values: (B, N, C), same dtype.
    Returns:
        (B, N, C).

    As attention: logits_ij = f_i.f_j - |f_j|^2/2 plus one extra key with logit |f_i|^2/2 and
    a one-hot "ones" value channel e. Softmax then gives out_S = sum_j w_ij S_j / Z_i and
    out_e = exp(|f_i|^2/2) / Z_i, so out_S / out_e = sum_j exp(-|f_i - f_j|^2/2) S_j exactly.
    The extra key holds the largest logit, so out_e >= 1 / (N + 1) never underflows.
    """
    B, N, d = features.shape
    C = values.shape[2]
    f = features - features.mean(dim=1, keepdim=True)  # translation invariant; less cancellation
    half_sq = 0.5 * (f * f).sum(-1, keepdim=True)
    one, zero = torch.ones_like(half_sq), torch.zeros_like(half_sq)
    q = torch.cat([f, one, half_sq], dim=-1)
    k = torch.cat([f, -half_sq, zero], dim=-1)
    k_extra = torch.zeros_like(k[:, :1])
    k_extra[..., -1] = 1.0
    k = torch.cat([k_extra, k], dim=1)
    v = torch.cat([values, torch.zeros_like(values[:, :, :1])], dim=-1)
    v_extra = torch.zeros_like(v[:, :1])
    v_extra[..., -1] = 1.0
    v = torch.cat([v_extra, v], dim=1)
    # One zero-padded width (a multiple of 8) for q, k and v: the fused kernels (flash on CPU,
    # memory-efficient on CUDA) need equal head sizes, otherwise SDPA falls back to an O(N^2)
    # softmax. Query chunks bound that fallback's memory should it still happen.
    width = -(-max(q.shape[-1], v.shape[-1]) // 8) * 8
    q, k, v = (F.pad(t, (0, width - t.shape[-1]))[:, None] for t in (q, k, v))
    rows = max(256, 2**28 // (B * (N + 1)))
    # Autocast would run the attention in half precision, far too coarse for logits ~ |f|^2.
    with torch.autocast(q.device.type, enabled=False):
        chunks = [F.scaled_dot_product_attention(c, k, v, scale=1.0) for c in q.split(rows, 2)]
    out = torch.cat(chunks, dim=2)[:, 0]
    return out[..., :C] / out[..., C : C + 1]


def bilateral_filter(
    images: Tensor,
    values: Tensor,
    sigma_rgb: float,
    sigma_xy: float,
    method: str = "permutohedral",
    exact_scale: float = 0.58,
) -> Tensor:
    """Unnormalised bilateral filter AS of METHOD.md §5.

    Args:
        images: (B, 3, H, W) in 0..255.
        values: (B, C, H, W).
        method: "permutohedral" (reference lattice) or "exact" (Gaussian sum x exact_scale).
    Returns:
        (B, C, H, W) in the dtype of `values`.
    """
    B, C, H, W = values.shape
    flat = values.flatten(2).transpose(1, 2)
    if method == "permutohedral":
        # The reference builds its lattice from float32 features.
        feats = bilateral_features(images.to(torch.float32), sigma_rgb, sigma_xy)
        out = permutohedral_filter(feats, flat)
    elif method == "exact":
        feats = bilateral_features(images.to(values.dtype), sigma_rgb, sigma_xy)
        out = exact_gaussian_filter(feats, flat) * exact_scale
    else:
        raise ValueError(f"unknown bilateral filter {method!r}: use 'permutohedral' or 'exact'")
    return out.transpose(1, 2).reshape(B, C, H, W)


class _DenseEnergy(Function):
    """Energy -weight/B sum S AS Gate with the reference's gradient -2 weight/B AS Gate."""

    @staticmethod
    def forward(ctx, seg, images, gate, sigma_rgb, sigma_xy, method, exact_scale, weight):
        factor = weight / seg.shape[0]
        gated = bilateral_filter(images, seg, sigma_rgb, sigma_xy, method, exact_scale) * gate
        ctx.save_for_backward(gated)
        ctx.factor = factor
        return -(seg * gated).sum() * factor

    @staticmethod
    def backward(ctx, grad_output):
        (gated,) = ctx.saved_tensors
        return (-2.0 * ctx.factor) * grad_output * gated, None, None, None, None, None, None, None


def dense_energy_loss(
    images_0_255: Tensor,
    seg_logits: Tensor,
    label: Tensor,
    weight: float = 1e-7,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 0.5,
    filter: str = "permutohedral",
    exact_scale: float = 0.58,
) -> Tensor:
    """Dense energy loss (METHOD.md §5 "reg"), weight included.

    Args:
        images_0_255: (B, 3, H, W) images denormalised to 0..255 (not truncated).
        seg_logits: (B, C, H, W) segmentation logits already at label size.
        label: (B, H, W) long, 255 = ignore (those pixels get Gate 1).
        sigma_xy: in pixels of the full-size image; the filter runs on the downscaled image
            with sigma_xy * scale, as the reference.
    Returns:
        scalar tensor.
    """
    dtype = torch.promote_types(seg_logits.dtype, torch.float32)
    probs = seg_logits.softmax(dim=1, dtype=dtype)
    resize = dict(scale_factor=scale, recompute_scale_factor=True)
    seg = F.interpolate(probs, mode="bilinear", align_corners=False, **resize)
    images = F.interpolate(images_0_255.to(dtype), mode="nearest", **resize)
    small_label = F.interpolate(label[:, None].to(dtype), mode="nearest", **resize)
    with torch.no_grad():
        gate = 1.0 - seg.amax(dim=1, keepdim=True)
        gate = torch.where(small_label == IGNORE_INDEX, torch.ones_like(gate), gate).clamp_(min=0.0)
    return _DenseEnergy.apply(
        seg, images.detach(), gate, sigma_rgb, sigma_xy * scale, filter, exact_scale, weight
    )
