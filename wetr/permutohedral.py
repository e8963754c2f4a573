"""Permutohedral lattice filter (Adams et al. 2010) in vectorised PyTorch.

This is the lattice of Kraehenbuehl & Koltun's DenseCRF code, which rloss's `bilateralfilter`
(and so the reference dense energy loss, METHOD.md §5 "reg") and pydensecrf build on. It approximates
`out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j` without normalisation; the approximation is part of
the reference behaviour (about 0.4-0.7 x the exact sum, see `wetr.energy`).

The C++ conventions are mirrored so that results agree to float32 rounding:
- lattice coordinates in float32 with the C++ operation order (elevation, rounding half-to-even
  as the SSE build does, rank ties broken by index, barycentric wrap-around);
- keys are the first d of the d+1 coordinates of each simplex vertex;
- blur along the d+1 lattice directions in the order 0..d, each pass reading the previous
  pass's values (v <- v + 0.5 (v_n1 + v_n2), missing neighbours count 0);
- slice with barycentric weight x alpha, alpha = 1 / (1 + 2^-d);
- the SSE build processes points in blocks of 4 and pads the last block with zero features,
  whose lattice vertices are created (with zero value) and then take part in the blur. One
  zero-feature, zero-value point is appended when N % 4 != 0 to reproduce that.

The hash table is a sorted array of integer-encoded keys. On a GPU it has a fixed capacity (one
slot per simplex vertex of every point, B N (d+1)) and is built by a sort: no size depends on
the data, so nothing waits for the device (no torch.unique, no .item()). On a CPU, where waiting
costs nothing, it is `torch.unique`'s table of the distinct keys (the blur then touches fewer
rows); both give the same output (`_hash`). Blur neighbours are found with
`torch.searchsorted`. Everything stays on the input's device; memory is
O(B N (d+1) C), no N x N tensor. A batch is one lattice: the image index is the most
significant digit of the key, so images never mix. Key coordinates are int64 where the C++
uses int16; they differ only past |key| > 32767, far beyond image features.
"""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PermutohedralLattice", "permutohedral_filter"]

# Marks unused hash slots: above every key (keys < 2^62, checked), so the table stays sorted,
# and far enough from them that no key +- blur offset reaches it.
_EMPTY = 2**62


def _elevate(f: Tensor) -> Tensor:
    """f: (P, d) float32 -> elevated (P, d+1) float32 on the plane sum(x) = 0, scaled so that the
    lattice blur approximates a unit-variance Gaussian (Adams et al. 2010, p.5-6)."""
    d = f.shape[1]
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    elevated = [None] * (d + 1)
    sm = torch.zeros_like(f[:, 0])
    # Same accumulation order as the C++ (from the last coordinate down) so float32 rounding,
    # and thus the enclosing simplex near its faces, is the reference's.
    for j in range(d, 0, -1):
        scale = float(torch.tensor(1.0 / math.sqrt((j + 1) * j) * inv_std, dtype=torch.float32))
        cf = f[:, j - 1] * scale
        elevated[j] = sm - float(j) * cf
        sm = sm + cf
    elevated[0] = sm
    return torch.stack(elevated, dim=1)


def _simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """elevated: (P, d+1) -> (rem0 (P, d+1) long, rank (P, d+1) long, barycentric (P, d+1) float32).

    rem0 is the nearest remainder-0 lattice point, rank[i] the position of coordinate i in the
    descending order of elevated - rem0, barycentric[r] the weight of the vertex with remainder r.
    """
    d1 = elevated.shape[1]
    inv = float(torch.tensor(1.0 / d1, dtype=torch.float32))
    rounded = torch.round(elevated * inv)  # half-to-even, as the SSE build
    rem0 = rounded * d1
    total = rounded.sum(dim=1, keepdim=True).long()

    # Pairwise ranking as the C++: for each pair i < j the smaller one moves down one rank,
    # ties count against j.
    diff = elevated - rem0
    i, j = torch.triu_indices(d1, d1, 1, device=diff.device)
    smaller = (diff[:, i] < diff[:, j]).long()
    rank = torch.zeros_like(rem0, dtype=torch.long)
    rank = rank.index_add(1, i, smaller).index_add(1, j, 1 - smaller)

    # The rounded point may lie off the plane (total != 0): shift coordinates back onto it.
    rank = rank + total
    rem0 = rem0.long()
    low, high = rank < 0, rank >= d1
    rank = rank + d1 * low - d1 * high
    rem0 = rem0 + d1 * low - d1 * high

    v = (elevated - rem0.to(elevated.dtype)) * inv
    ordered = torch.zeros_like(v).scatter_(1, (d1 - 1) - rank, v)
    barycentric = torch.cat(
        [ordered[:, :1] + (1.0 - ordered[:, -1:]), ordered[:, 1:] - ordered[:, :-1]], dim=1
    )
    return rem0, rank, barycentric


def _hash(code: Tensor, fixed_capacity: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Hash table of integer keys as a sorted array.

    code: (E,) int64 keys in [0, 2^62). Returns (table (M,), vertex (E,), valid (M,)): the
    distinct keys ascending, the slot of each key, which slots hold a key.
    fixed_capacity: M = E whatever the data (unused slots hold _EMPTY, after every key), built
    by a sort without a device->host sync; the first slots equal torch.unique's table and
    vertex its inverse. Otherwise M is the number of distinct keys (torch.unique: it waits for
    the device to know M, but the blur then touches only M rows, 2-4x faster on a CPU).
    """
    if not fixed_capacity:
        table, vertex = torch.unique(code, sorted=True, return_inverse=True)
        return table, vertex, torch.ones_like(table, dtype=torch.bool)
    ordered, order = torch.sort(code)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    slot = new.cumsum(0) - 1  # slot of each sorted key
    vertex = torch.empty_like(slot).scatter_(0, order, slot)
    # Repeated keys write the same value to their slot, so the scatter is deterministic.
    table = torch.full_like(code, _EMPTY).scatter_(0, slot, ordered)
    valid = torch.arange(code.numel(), device=code.device) <= slot[-1:]
    return table, vertex, valid


class PermutohedralLattice:
    """A lattice built once from features, to filter many value sets (e.g. the C channels of
    all mean-field iterations of a DenseCRF) without rebuilding the hash table.

    Attributes (all on the features' device): B, N (points per image), P (N plus the padding
    point), d; vertex (B P, d+1) lattice row of each simplex vertex, weights (B P, d+1) float32
    barycentric weights, neighbours (2(d+1), E+1) blur neighbours (row E is the zero row), E.
    `filter(values)` equals `permutohedral_filter(features, values, fixed_capacity)`.
    """

    def __init__(self, features: Tensor, fixed_capacity: bool | None = None):
        B, N, d = features.shape
        d1 = d + 1
        device = features.device
        f = features.detach().to(torch.float32)
        if N % 4:  # the SSE build's zero-feature padding point (see module docstring)
            f = torch.cat([f, f.new_zeros(B, 1, d)], dim=1)
        P = f.shape[1]

        rem0, rank, bary = _simplex(_elevate(f.reshape(B * P, d)))
        # Vertex r of the simplex: key_i = rem0_i + r - (d+1) [rank_i > d - r], keys keep d coords.
        r = torch.arange(d1, device=device)
        keys = rem0[:, None, :d] + r[None, :, None] - d1 * (rank[:, None, :d] > (d - r)[None, :, None])
        keys = keys.reshape(B, P * d1, d)

        # Mixed-radix integer code per key; each digit has a margin of d+1 so that blur neighbours
        # (coordinates shifted by at most d) never carry into the next digit or the image index.
        lo = keys.amin(dim=(0, 1)) - d1
        span = keys.amax(dim=(0, 1)) + d1 - lo + 1
        stride = torch.cumprod(torch.cat([span.new_ones(1), span]), 0)  # (d+1,): last = image radix
        bits = torch.log2(span.double()).sum() + math.log2(max(B, 1))
        torch._assert_async(bits < 62.0, "permutohedral lattice keys do not fit in int64")
        code = ((keys - lo) * stride[:d]).sum(-1)
        code = (code + torch.arange(B, device=device)[:, None] * stride[d]).reshape(-1)
        if fixed_capacity is None:
            fixed_capacity = device.type != "cpu"
        lattice, vertex, valid = _hash(code, fixed_capacity)
        E = lattice.numel()

        # Blur neighbours along direction j: all coordinates -1 except j, which is +d (and the
        # mirror image); for j = d every stored coordinate moves by -1 / +1. Row E is the zero row
        # that missing neighbours (and the zero row itself) point to.
        step = torch.full((d1, d), -1, dtype=torch.long, device=device)
        step[torch.arange(d), torch.arange(d)] = d
        deltas = (step * stride[:d]).sum(-1)  # (d+1,)
        targets = lattice[None, :] + torch.cat([deltas, -deltas])[:, None]  # (2(d+1), E)
        idx = torch.searchsorted(lattice, targets).clamp_(max=E - 1)
        found = (lattice[idx] == targets) & valid
        self.neighbours = F.pad(torch.where(found, idx, E), (0, 1), value=E)  # (2(d+1), E+1)
        self.vertex = vertex.reshape(B * P, d1)
        self.weights = bary
        self.B, self.N, self.P, self.d, self.E = B, N, P, d, E

    def filter(self, values: Tensor) -> Tensor:
        """values: (B, N, C) -> (B, N, C) in their dtype: approx. sum_j exp(-|f_i - f_j|^2 / 2)
        values_j, with the reference's approximation error and alpha scaling."""
        B, N, P, d1, E = self.B, self.N, self.P, self.d + 1, self.E
        C = values.shape[2]
        if P > N:  # the padding point carries zero value
            values = torch.cat([values, values.new_zeros(B, P - N, C)], dim=1)
        vertex, neighbours = self.vertex, self.neighbours
        flat_values = values.reshape(B * P, C)
        weights = self.weights.to(values.dtype)
        # Splat and slice rank by rank: on a CPU, d+1 passes over (B*P, C) are faster than one
        # pass over a (d+1, B*P, C) stack, and they keep the reference's summation order.
        lattice_values = values.new_zeros(E + 1, C)
        for rr in range(d1):  # splat
            lattice_values = lattice_values.index_add(0, vertex[:, rr], weights[:, rr, None] * flat_values)
        for j in range(d1):  # blur, direction order 0..d as the reference
            n1, n2 = neighbours[j], neighbours[d1 + j]
            lattice_values = lattice_values + 0.5 * (lattice_values[n1] + lattice_values[n2])
        alpha = float(torch.tensor(1.0 / (1.0 + 2.0 ** -(d1 - 1)), dtype=torch.float32))
        out = torch.zeros_like(flat_values)
        for rr in range(d1):  # slice
            out = out + (weights[:, rr, None] * alpha) * lattice_values[vertex[:, rr]]
        return out.reshape(B, P, C)[:, :N]

    def sparse_filter(self, values: Tensor) -> Tensor:
        """`filter` as sparse CSR matrix products (splat, d+1 blurs, slice; 2-4x faster on a
        CPU, no atomics on CUDA), for filtering many value sets: the matrices are built on the
        first call. Float32 only; equal to `filter` up to float summation order (each output
        is summed in ascending column order, where the C++ sums in rank / blur order).

        values: (B, N, C) float32 -> (B, N, C).
        """
        if not hasattr(self, "_unscaled"):
            self._unscaled = self.sparse_operator()
        return self._unscaled(values)

    def sparse_operator(self, scale: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """The filter as a function, optionally scaled on both sides:
        values -> scale_i * sum_j K_ij scale_j values_j, with `scale` (B, N) float32 folded into
        the splat and slice matrices (built here, once), so it costs no extra pass.
        """
        B, N, P = self.B, self.N, self.P
        if scale is not None and P > N:  # the padding point's value is zero whatever its scale
            scale = torch.cat([scale, scale.new_zeros(B, P - N)], dim=1)
        splat, slice_ = self._splat_slice(None if scale is None else scale.reshape(B * P))
        if not hasattr(self, "_blurs"):
            self._blurs = self._blur_matrices()
        blurs = self._blurs

        def apply(values: Tensor) -> Tensor:
            C = values.shape[2]
            flat = values.to(torch.float32)
            if P > N:  # the padding point carries zero value
                flat = torch.cat([flat, flat.new_zeros(B, P - N, C)], dim=1)
            lattice_values = splat @ flat.reshape(B * P, C)  # (E+1, C), row E stays 0
            for blur in blurs:  # direction order 0..d as the reference
                lattice_values = blur @ lattice_values
            return (slice_ @ lattice_values).reshape(B, P, C)[:, :N]
        return apply

    def _csr(self, rows: int, cols: int, col: Tensor, val: Tensor) -> Tensor:
        """(rows, cols) CSR matrix with k = col.shape[1] entries per row, columns sorted per row
        (cuSPARSE expects them sorted); int32 indices where they fit (the CPU kernel would
        convert int64 ones on every call)."""
        col, order = col.sort(dim=1)
        val = val.gather(1, order)
        index = torch.int32 if max(col.numel(), rows, cols) < 2**31 else torch.long
        crow = torch.arange(0, col.numel() + 1, col.shape[1], device=col.device, dtype=index)
        return torch.sparse_csr_tensor(crow, col.reshape(-1).to(index), val.reshape(-1), (rows, cols))

    def _splat_slice(self, scale: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> splat (E+1, B P) and slice (B P, E+1) CSR matrices: float32 barycentric weights,
        the slice's times alpha, both times the point's `scale` (B P,) if given."""
        BP, d1, E = self.B * self.P, self.d + 1, self.E
        weights = self.weights.to(torch.float32)
        alpha = float(torch.tensor(1.0 / (1.0 + 2.0 ** -self.d), dtype=torch.float32))
        slice_weights = weights * alpha
        if scale is not None:
            weights = weights * scale[:, None]
            slice_weights = slice_weights * scale[:, None]
        slice_ = self._csr(BP, E + 1, self.vertex, slice_weights)
        flat_vertex = self.vertex.reshape(-1)
        order = torch.argsort(flat_vertex, stable=True)  # ascending point within each vertex
        counts = torch.bincount(flat_vertex, minlength=E + 1)
        index = slice_.crow_indices().dtype
        splat_rows = F.pad(counts.cumsum(0), (1, 0)).to(index)
        splat = torch.sparse_csr_tensor(splat_rows, (order // d1).to(index),
                                        weights.reshape(-1)[order], (E + 1, BP))
        return splat, slice_

    def _blur_matrices(self) -> list[Tensor]:
        """d+1 (E+1, E+1) CSR matrices v <- v + 0.5 (v_n1 + v_n2); row E (the zero row) stays 0."""
        E, d1 = self.E, self.d + 1
        rows = torch.arange(E + 1, device=self.vertex.device)
        val = torch.tensor([1.0, 0.5, 0.5], device=rows.device).expand(E + 1, 3)
        return [self._csr(E + 1, E + 1, torch.stack([rows, self.neighbours[j],
                                                     self.neighbours[d1 + j]], 1), val)
                for j in range(d1)]


def permutohedral_filter(features: Tensor, values: Tensor,
                         fixed_capacity: bool | None = None) -> Tensor:
    """Unnormalised Gaussian filtering on the permutohedral lattice.

    Args:
        features: (B, N, d) positions already divided by their standard deviations.
            The lattice is built in float32 whatever the dtype (as the reference).
        values: (B, N, C) values to filter; the result has their dtype.
        fixed_capacity: hash table sizes independent of the data, so no device->host sync
            (capturable in a CUDA graph, no stall of the step); default: off the CPU only.
            Both give the same result up to float summation order.

    Returns:
        (B, N, C): approx. sum_j exp(-|f_i - f_j|^2 / 2) values_j, with the reference's
        approximation error and alpha scaling.
    """
    return PermutohedralLattice(features, fixed_capacity).filter(values)
