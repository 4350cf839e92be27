"""Edges of a ReLU form, `Σ_n f_n[j]² J_n[j, i]²`, without forming every example's Jacobian
from all of its hidden units.

In feature coordinates example n has the Jacobian `J_n = L + P diag(m_n) R` (`m_n` its 0/1 ReLU
mask over the hidden units), so forming it costs `d_hidden` rank-one products. The masks of
similar examples agree on most units, so the examples are grouped around a few centre masks
`c_k` (majority votes of their groups, found by Lloyd iterations in Hamming distance):

    J_n = B_k + P diag(δ_n) R,   B_k = L + P diag(c_k) R,   δ_n = m_n − c_k ∈ {−1, 0, 1},

and the weighted squares split into a part per centre and a part per example that costs only
the units where the example differs from its centre (a fifth of `d_hidden` on modular
addition):

    Σ_n f_n² J_n² = Σ_k B_k ∘ (F_k ∘ B_k + 2 (P ∘ W_k) R) + Σ_n (f_n ∘ P diag(δ_n) R)²,
    F_k = Σ_{n∈k} f_n²,   W_k = Σ_{n∈k} f_n² δ_nᵀ   (rows j, columns hidden units).

The grouping only decides how the sum is evaluated: any grouping gives the same numbers.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy.engine.streaming import chunks

LLOYD_ITERATIONS = 2
ROWS = 4096
"""Examples grouped together (their masks and differences are held at once)."""
CHUNK = 16
"""Examples per batched product: their products stay in the core's cache."""
CENTRE_ELEMENTS = 1 << 22
"""Elements of the scaled copies of P made at once for the centres' products (32 MiB)."""


def mask_centres(
    masks: Float[Tensor, "n d_hidden"], n_centres: int, iterations: int = LLOYD_ITERATIONS
) -> tuple[Float[Tensor, "k d_hidden"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Centre masks (0/1), each example's centre and its Hamming distance to it: centres
    start at evenly spaced examples and move to the majority vote of their group."""
    n = masks.shape[0]
    centres = masks[torch.linspace(0, n - 1, n_centres, device=masks.device).round().long()]
    ones = masks.sum(1, keepdim=True)
    for step in range(iterations + 1):
        distance = ones + centres.sum(1) - 2 * masks @ centres.T  # exact: sums of 0/1
        nearest, group = distance.min(1)
        if step == iterations:
            return centres, group, nearest.round().long()
        size = torch.bincount(group, minlength=n_centres).to(masks.dtype)[:, None]
        votes = torch.zeros_like(centres).index_add_(0, group, masks)
        centres = torch.where(size > 0, (2 * votes > size).to(masks.dtype), centres)
    raise AssertionError("unreachable")


def relu_edge_sums(
    feats: Float[Tensor, "n k_in"],
    masks: Float[Tensor, "n d_hidden"],
    lin: Float[Tensor, "k_in k_out"],
    proj: Float[Tensor, "k_in d_hidden"],
    read: Float[Tensor, "d_hidden k_out"],
    n_centres: int | None = None,
) -> Float[Tensor, "k_in k_out"]:
    """`Σ_n (f_n[j] (L + P diag(m_n) R)[j, i])²` (see the module docstring), with `n_centres`
    groups per `ROWS` examples (√(n/4) by default; any number gives the same sum)."""
    total = lin.new_zeros(lin.shape)
    for rows in chunks(masks.shape[0], ROWS):
        total += _grouped_sum(feats[rows], masks[rows], lin, proj, read, n_centres)
    return total


def _grouped_sum(feats, masks, lin, proj, read, n_centres: int | None) -> Tensor:
    n = masks.shape[0]
    n_centres = max(1, min(n, n_centres or math.ceil(math.sqrt(n / 4))))
    centres, group, distance = mask_centres(masks, n_centres)
    f2 = feats * feats
    delta = masks - centres[group]
    members = group.argsort().split(torch.bincount(group, minlength=n_centres).tolist())
    total = lin.new_zeros(lin.shape)
    step = max(1, CENTRE_ELEMENTS // proj.numel())
    for first in range(0, n_centres, step):
        ks = range(first, min(n_centres, first + step))
        # B_k − L = P diag(c_k) R and the cross sums (P ∘ W_k) R, in one product
        left = [proj * centres[k] for k in ks] + [
            proj * (f2[members[k]].T @ delta[members[k]]) for k in ks
        ]
        products = (torch.stack(left).flatten(0, 1) @ read).view(2, len(ks), *lin.shape)
        base, cross = lin + products[0], products[1]
        f2_sum = torch.stack([f2[members[k]].sum(0) for k in ks])  # F_k
        total += (base * (f2_sum[:, :, None] * base + 2 * cross)).sum(0)
    return total + _difference_squares(feats, delta, distance, proj, read)


def _difference_squares(
    feats: Float[Tensor, "n k_in"],
    delta: Float[Tensor, "n d_hidden"],
    distance: Int[Tensor, " n"],
    proj: Float[Tensor, "k_in d_hidden"],
    read: Float[Tensor, "d_hidden k_out"],
) -> Float[Tensor, "k_in k_out"]:
    """`Σ_n (f_n ∘ P diag(δ_n) R)²` from the units where each δ_n is nonzero: per example, the
    columns of P (signed, scaled by f_n) and rows of R at those units, padded with zero rows
    to the widest example of a chunk of examples sorted by width, in one batched product."""
    n, d_hidden = delta.shape
    k_in, k_out = proj.shape[0], read.shape[1]
    total = proj.new_zeros(k_in, k_out)
    width = int(distance.max()) if n else 0
    if width == 0:
        return total
    order = distance.argsort()
    delta, distance, feats = delta[order], distance[order], feats[order]
    rows, units = delta.nonzero(as_tuple=True)  # row-major: rows ascending
    slot = torch.arange(rows.numel(), device=rows.device) - (distance.cumsum(0) - distance)[rows]
    zero = 2 * d_hidden  # the zero row of `proj_rows`
    signed = torch.full((n, width), zero, dtype=torch.long, device=delta.device)
    signed[rows, slot] = units + d_hidden * (delta[rows, units] < 0)
    unsigned = torch.where(signed == zero, d_hidden, signed % d_hidden)
    proj_rows = torch.cat([proj.T, -proj.T, proj.new_zeros(1, k_in)])  # [2 d_hidden + 1, k_in]
    read_rows = torch.cat([read, read.new_zeros(1, k_out)])  # [d_hidden + 1, k_out]
    p_buf = proj.new_empty(CHUNK * width, k_in)
    r_buf = proj.new_empty(CHUNK * width, k_out)
    a_buf = proj.new_empty(CHUNK, k_in, k_out)
    starts = range(0, n, CHUNK)
    widths = distance[[min(n, start + CHUNK) - 1 for start in starts]].tolist()  # sorted: last
    for start, w in zip(starts, widths):
        end = min(n, start + CHUNK)
        if w == 0:
            continue
        c = end - start
        p = torch.index_select(proj_rows, 0, signed[start:end, :w].flatten(), out=p_buf[: c * w])
        p = p.view(c, w, k_in).mul_(feats[start:end, None, :])
        r = torch.index_select(read_rows, 0, unsigned[start:end, :w].flatten(), out=r_buf[: c * w])
        a = torch.bmm(p.transpose(1, 2), r.view(c, w, k_out), out=a_buf[:c])
        total += a.square_().sum(0)
    return total
