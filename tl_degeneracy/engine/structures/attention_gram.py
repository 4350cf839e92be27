"""Closed form of `M'` for an attention section `resid_pre → resid_mid` (docs/concepts.md,
"Estimating M'").

For a LayerNorm-free block with standard (learned, additive) positional embeddings, the
Jacobian of the output at position p with respect to the input at position t is, in the
row-vector convention `dy = dx J` and with `s` the attention scale,

    J_{pt} = δ_{pt} I + Σ_h [ A_{hpt} W_V^h + W_K^h (q_{hp} ⊗ a_{hpt}) + δ_{pt} W_Q^h Q_{hp} ] W_O^h

where `A` is the pattern, `a_{hpt} = A_{hpt} (v_{ht} − z_{hp}) / s` (`z_{hp} = Σ_t A_{hpt} v_{ht}`),
and `Q_{hp} = Σ_{t'} k_{ht'} ⊗ a_{hpt'}`: the value path, the key path (rank one per head) and
the query path (rank ≤ positions per head). With `K = C_out C_outᵀ`, `M' = Σ J K Jᵀ` then
needs only head-sized (d_head²) sums over the data, never a d×d matrix per data point:

    M' = N_δ K + T + Tᵀ + L X Lᵀ,   L = [W_V^h | W_K^h | W_Q^h]_h,   S_{hg} = W_O^h K W_O^gᵀ,

with `T = Σ_h L_h (Σ δ R_h) W_O^h K` and `X_{hg} = Σ R_h S_{hg} R_gᵀ` assembled from the three
blocks of `R_h = [A_h I; q_h ⊗ a_h; δ Q_h]`. `Q_{hp}` is never formed: every product with it
goes through its rank-≤ S factors, weighted by `a_{h,t}ᵀ S_{hg} a_{g,s}`, and the sums are taken
over chunks of the batch small enough to stay in cache. Tested equal to batched autograd to
float64 rounding on both TransformerLens APIs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, einsum

from tl_degeneracy.engine.streaming import chunks
from tl_degeneracy.engine.structures.plain import PlainBlock

CHUNK_ELEMENTS = 1 << 18
"""Elements of the largest per-sample tensor of one chunk of the batch (2 MiB in float64): small
enough to stay in cache and to be reused by the allocator rather than mapped afresh."""


def attention_jacobian_gram(
    x: Float[Tensor, "batch pos d_model"],
    weights: PlainBlock,
    k_out: Float[Tensor, "d_model d_model"],
    pos_in: Tensor,
    pos_out: Tensor,
) -> Float[Tensor, "d_model d_model"]:
    """`Σ_b Σ_{p∈pos_out} Σ_{t∈pos_in} J_{pt} K J_{pt}ᵀ` for one batch of `resid_pre` inputs
    (all positions; `pos_in`/`pos_out` are the sites' position indices)."""
    w = weights
    x = x.to(torch.float64)
    batch, n_pos, d_model = x.shape
    heads, d_head = w.W_Q.shape[0], w.W_Q.shape[2]
    s = einsum("hid,de,gje->higj", w.W_O, k_out, w.W_O)  # S_{hg}: [h, i, g, j]
    per_example = heads * heads * n_pos * max(len(pos_out) * d_head, n_pos)
    x_sums = x.new_zeros(6, heads, heads, d_head, d_head)
    r_self = x.new_zeros(heads, 3, d_head, d_head)
    for sl in chunks(batch, max(1, CHUNK_ELEMENTS // per_example)):
        blocks, r = _head_sums(x[sl], w, s, pos_in, pos_out)
        x_sums += blocks
        r_self += r
    vv, vk, vq, kk, kq, qq = x_sums
    x_blocks = x.new_zeros(heads, 3, d_head, heads, 3, d_head)
    x_blocks[:, 0, :, :, 0] = vv.permute(0, 2, 1, 3)
    x_blocks[:, 0, :, :, 1] = vk.permute(0, 2, 1, 3)
    x_blocks[:, 0, :, :, 2] = vq.permute(0, 2, 1, 3)
    x_blocks[:, 1, :, :, 1] = kk.permute(0, 2, 1, 3)
    x_blocks[:, 1, :, :, 2] = kq.permute(0, 2, 1, 3)
    x_blocks[:, 2, :, :, 2] = qq.permute(0, 2, 1, 3)
    for lo, hi in ((1, 0), (2, 0), (2, 1)):  # X_{(h,lo),(g,hi)} = X_{(g,hi),(h,lo)}ᵀ
        x_blocks[:, lo, :, :, hi] = x_blocks[:, hi, :, :, lo].permute(2, 3, 0, 1)
    x_mat = x_blocks.reshape(heads * 3 * d_head, heads * 3 * d_head)
    left = torch.stack([w.W_V, w.W_K, w.W_Q], dim=1)  # [h, 3, d, i]
    left = left.permute(2, 0, 1, 3).reshape(d_model, -1)  # L: [d, h·3·i]
    cross = einsum("hbij,hjd,de->hbie", r_self, w.W_O, k_out)
    t = left @ cross.reshape(-1, d_model)
    n_delta = batch * int((pos_out[:, None] == pos_in[None, :]).sum())
    return n_delta * k_out + t + t.T + left @ x_mat @ left.T


def _head_sums(
    x: Float[Tensor, "b pos d_model"],
    w: PlainBlock,
    s: Float[Tensor, "h i g j"],
    pos_in: Tensor,
    pos_out: Tensor,
) -> tuple[Float[Tensor, "6 h g i j"], Float[Tensor, "h 3 i j"]]:
    """The blocks `vv, vk, vq, kk, kq, qq` of `X` and `Σ δ R_h` over one chunk of the batch."""
    batch, n_pos = x.shape[:2]
    heads, d_head = w.W_Q.shape[0], w.W_Q.shape[2]
    n_out = len(pos_out)
    weight, bias = w.qkv_weight()
    qkv = (x @ weight + bias).view(batch, n_pos, 3, heads, d_head)
    u = _take(qkv[:, :, 0], 1, pos_out)  # queries at the outputs: [b, P, h, i]
    k, v = qkv[:, :, 1], qkv[:, :, 2]  # [b, S, h, i]
    scores = einsum("bphi,bshi->bphs", u, k) / w.scale
    later = torch.arange(n_pos, device=x.device)[None, :] > pos_out[:, None]  # [P, S]
    pattern = scores.masked_fill(later[:, None], float("-inf")).softmax(-1)  # A: [b, P, h, S]
    z = einsum("bphs,bshi->bphi", pattern, v)
    a = pattern[..., None] * (v.transpose(1, 2)[:, None] - z[:, :, :, None]) / w.scale
    # a_hᵀ S_{hg} at every sample (b, p, t) and pair of heads: [h, b, P, S, g, j]
    a_s = torch.bmm(a.permute(2, 0, 1, 3, 4).reshape(heads, -1, d_head), s.flatten(2))
    a_s = a_s.view(heads, batch, n_out, n_pos, heads, d_head)

    # the samples (b, p, t ∈ pos_in): value and key paths
    a_in, pat_in = _take(a, 3, pos_in), _take(pattern, 3, pos_in)  # [b,P,h,T,i], [b,P,h,T]
    vv = einsum("bpht,bpgt->hg", pat_in, pat_in)[..., None, None] * s.transpose(1, 2)
    pat_a = einsum("bpht,bptgk->bphgk", pat_in, a_in.transpose(2, 3))
    vk = einsum("higk,hgkj->hgij", s, einsum("bphgk,bpgj->hgkj", pat_a, u))
    kk_w = (_take(a_s, 3, pos_in) * a_in.transpose(2, 3)[None]).sum((3, 5))  # [h, b, P, g]
    kk = einsum("hbpgi,bpgj->hgij", kk_w[..., None] * u.permute(2, 0, 1, 3)[:, :, :, None], u)

    # the samples where t = p (the query path): output p_self[m] is also an input position
    p_self = (pos_out[:, None] == pos_in[None, :]).nonzero(as_tuple=True)[0]
    at = pos_out[p_self]  # the position of each self sample
    a_m, u_m = _take(a, 1, p_self), _take(u, 1, p_self)  # [b, m, h, S, i], [b, m, h, i]
    pat_self = _at_own_position(_take(pattern, 1, p_self), at, 1, 3)  # [b, m, h]
    a_self = _at_own_position(a_m, at, 1, 3)  # [b, m, h, i]
    # Q_h = Σ_s k_s ⊗ a_s has rank ≤ S: every product with it goes through its factors, with
    # the weights a_{h,t}ᵀ S_{hg} a_{g,s}
    w_qq = einsum("hbmtgj,bmgsj->hbmgts", _take(a_s, 2, p_self), a_m)
    k_w = einsum("hbmgts,bsgj->hbmgtj", w_qq, k)  # Σ_s w k_{g,s}
    qq = einsum("bthi,hbgtj->hgij", k, k_w.sum(2))
    kq = einsum("bmhi,hbmgj->hgij", u_m, _at_own_position(k_w, at, 2, 4))
    vq_left = einsum("bmh,bmgsk->bgshk", pat_self, a_m)
    vq = einsum("higk,hgkj->hgij", s, einsum("bgshk,bsgj->hgkj", vq_left, k))

    eye = torch.eye(d_head, dtype=x.dtype, device=x.device)
    r_self = torch.stack(
        [
            pat_self.sum((0, 1))[:, None, None] * eye,
            einsum("bmhi,bmhj->hij", u_m, a_self),
            einsum("bshi,bshj->hij", k, a_m.sum(1).transpose(1, 2)),
        ],
        dim=1,
    )  # Σ δ R_h: [h, 3, i, j]
    return torch.stack([vv, vk, vq, kk, kq, qq]), r_self


def _take(t: Tensor, dim: int, idx: Tensor) -> Tensor:
    """`t.index_select(dim, idx)`, as a view when `idx` is a run of consecutive positions."""
    n = len(idx)
    if n and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + n, device=idx.device)).all()):
        return t.narrow(dim, int(idx[0]), n)
    return t.index_select(dim, idx)


def _at_own_position(t: Tensor, at: Tensor, m_dim: int, pos_dim: int) -> Tensor:
    """`t` at position `at[m]` (axis `pos_dim`, dropped) for each self sample m (axis `m_dim`)."""
    shape = [1] * t.ndim
    shape[m_dim] = -1
    index = at.view(shape).expand(*t.shape[:pos_dim], 1, *t.shape[pos_dim + 1 :])
    return t.gather(pos_dim, index).squeeze(pos_dim)
