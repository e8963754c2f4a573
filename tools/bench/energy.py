"""The dense energy loss's bilateral filter AS (METHOD.md §5): permutohedral lattice, exact (fused
attention) and the naive N x N sum, alone and inside the loss (forward + backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from utils.profiling import PeakMemory, timeit
from wetr.cam import IMAGENET_MEAN_255, IMAGENET_STD_255, resize_bilinear
from wetr.energy import bilateral_features, dense_energy_loss, exact_gaussian_filter
from wetr.permutohedral import permutohedral_filter

from .step import synthetic_batch


def naive_gaussian_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The N x N reference: features (B, N, d), values (B, N, C) -> (B, N, C)."""
    return torch.exp(-0.5 * torch.cdist(features, features).square()) @ values


def bench_energy(cfg: DictConfig, device: torch.device) -> list[dict]:
    """Bilateral filter AS (METHOD.md §5) on an S x S grid (the loss filters at crop/2): lattice,
    exact (fused attention), naive N x N; and the whole loss, forward + backward, at crop 2S."""
    b, r = cfg.bench, cfg.reg
    B, C = cfg.batch_size, cfg.data.num_classes
    mem = PeakMemory(device)
    rows = []
    for size in b.energy_sizes:
        x, _ = synthetic_batch(B, size, C - 1, b.seed + 2)
        img255 = (x * torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
                  + torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)).to(device)
        gen = torch.Generator().manual_seed(b.seed)
        logits = resize_bilinear(torch.randn(B, C, size // 8, size // 8, generator=gen) * 4,
                                 (size, size)).to(device)
        values = logits.softmax(1).flatten(2).transpose(1, 2).contiguous()
        feats = bilateral_features(img255, r.sigma_rgb, r.sigma_xy * r.scale)
        n = size * size
        row = {"grid": f"{size}x{size}", "crop": 2 * size, "N": n, "batch": B, "channels": C}
        results = {}
        methods = {"permutohedral": lambda: permutohedral_filter(feats, values),
                   "exact (fused attention)": lambda: exact_gaussian_filter(feats, values)}
        naive_bytes = 2 * B * n * n * 4
        if naive_bytes <= b.naive_max_gib * 2**30:
            methods["naive N x N"] = lambda: naive_gaussian_filter(feats, values)
        for name, fn in methods.items():
            with torch.no_grad():
                results[name] = fn()
                base = mem.current()
                mem.reset()
                sec = timeit(fn, device, b.energy_repeats, warmup=0)
                peak = mem.peak()
            row[name] = {"ms": sec * 1e3, "peak_extra_MiB": None if peak is None or base is None
                         else max(peak - base, 0) / 2**20}
        if "naive N x N" not in methods:
            row["naive N x N"] = {"skipped": f"needs ~{naive_bytes / 2**30:.1f} GiB > "
                                             f"bench.naive_max_gib={b.naive_max_gib}"}
        exact = results["exact (fused attention)"]
        row["lattice_over_exact_sum"] = float(results["permutohedral"].sum() / exact.sum())
        if "naive N x N" in results:
            naive = results["naive N x N"]
            row["exact_vs_naive_max_rel_err"] = float(((exact - naive).abs().max() / naive.abs().max()))
        label = torch.zeros(B, 2 * size, 2 * size, dtype=torch.long, device=device)
        big = F.interpolate(img255, scale_factor=2, mode="nearest")
        seg = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        for method in ("permutohedral", "exact"):
            def loss_fwd_bwd():
                s = seg.detach().requires_grad_(True)
                dense_energy_loss(big, s, label, weight=r.weight, sigma_rgb=r.sigma_rgb, sigma_xy=r.sigma_xy,
                                  scale=r.scale, filter=method, exact_scale=r.exact_scale).backward()
            row[f"loss fwd+bwd {method} ms"] = timeit(loss_fwd_bwd, device, b.energy_repeats) * 1e3
        rows.append(row)
    # Naive time where it was skipped: O(N^2) from the largest measured grid, marked as such.
    measured = [rw for rw in rows if "ms" in rw["naive N x N"]]
    for rw in rows:
        if "skipped" in rw["naive N x N"] and measured:
            ref = measured[-1]
            rw["naive N x N"]["ms_extrapolated"] = ref["naive N x N"]["ms"] * (rw["N"] / ref["N"]) ** 2
    return rows
