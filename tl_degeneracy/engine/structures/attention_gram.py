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
blocks of `R_h = [A_h I; q_h ⊗ a_h; δ Q_h]`. Tested equal to batched autograd to float64
rounding on both TransformerLens APIs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, einsum

from tl_degeneracy.engine.structures.plain import PlainBlock


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
    n_pos = x.shape[1]
    q = einsum("btm,hmi->bhti", x, w.W_Q) + w.b_Q[:, None]
    k = einsum("btm,hmi->bhti", x, w.W_K) + w.b_K[:, None]
    v = einsum("btm,hmi->bhti", x, w.W_V) + w.b_V[:, None]
    qp = q[:, :, pos_out]  # [b, h, P, i]
    scores = einsum("bhpi,bhti->bhpt", qp, k) / w.scale
    causal = torch.arange(n_pos, device=x.device)[None, :] > pos_out[:, None]  # [P, T]
    pattern = scores.masked_fill(causal, float("-inf")).softmax(-1)  # [b, h, P, T]
    z = einsum("bhpt,bhti->bhpi", pattern, v)
    a_all = pattern[..., None] * (v[:, :, None] - z[:, :, :, None]) / w.scale  # [b,h,P,T,i]
    q_sum = einsum("bhti,bhptj->bhpij", k, a_all)  # query path, Q_{hp}
    # samples are (b, p, t ∈ pos_in); the identity and query path need t = p
    a_in, pat_in = a_all[:, :, :, pos_in], pattern[..., pos_in]
    delta = (pos_out[:, None] == pos_in[None, :]).to(x.dtype)  # [P, T_in]
    has_self = delta.sum(-1)  # [P]: 1 where the output position is an input position
    n_delta = x.shape[0] * float(has_self.sum())
    pat_self = einsum("bhpt,pt->bhp", pat_in, delta)
    a_self = einsum("bhpti,pt->bhpi", a_in, delta)

    s = einsum("hid,de,gje->hgij", w.W_O, k_out, w.W_O)  # S_{hg} = W_O^h K W_O^gᵀ
    sa_in = einsum("hgij,bgptj->bhgpti", s, a_in)  # S_{hg} a_g
    sa_all = einsum("hgij,bgptj->bhgpti", s, a_all)

    vv = einsum("bhpt,bgpt->hg", pat_in, pat_in)[..., None, None] * s
    vk = einsum("bhpt,bhgpti,bgpj->hgij", pat_in, sa_in, qp)
    vq = einsum("hgik,hgjk->hgij", s, einsum("p,bhp,bgpjk->hgjk", has_self, pat_self, q_sum))
    kk_w = einsum("bhpti,bhgpti->bhgp", a_in, sa_in)
    kk = einsum("bhgp,bhpi,bgpj->hgij", kk_w, qp, qp)
    # a_self^h S_{hg} Q_gᵀ, a vector over g's key dimension
    a_s = einsum("bhpi,hgij->bhgpj", a_self, s)
    kq = einsum("p,bhpi,bhgpj->hgij", has_self, qp, einsum("bhgpk,bgpjk->bhgpj", a_s, q_sum))
    qq_w = einsum("bhpti,bhgpui->bhgptu", a_all, sa_all) * has_self[:, None, None]
    qq = einsum("bhti,bhgptj->hgij", k, einsum("bhgptu,bguj->bhgptj", qq_w, k))

    heads, d_head = w.W_Q.shape[0], w.W_Q.shape[2]
    x_blocks = x.new_zeros(heads, 3, d_head, heads, 3, d_head)
    x_blocks[:, 0, :, :, 0] = vv.permute(0, 2, 1, 3)
    x_blocks[:, 0, :, :, 1] = vk.permute(0, 2, 1, 3)
    x_blocks[:, 0, :, :, 2] = vq.permute(0, 2, 1, 3)
    x_blocks[:, 1, :, :, 1] = kk.permute(0, 2, 1, 3)
    x_blocks[:, 1, :, :, 2] = kq.permute(0, 2, 1, 3)
    x_blocks[:, 2, :, :, 2] = qq.permute(0, 2, 1, 3)
    for lo, hi in (
        (1, 0),
        (2, 0),
        (2, 1),
    ):  # X is symmetric: X_{(h,lo),(g,hi)} = X_{(g,hi),(h,lo)}ᵀ
        x_blocks[:, lo, :, :, hi] = x_blocks[:, hi, :, :, lo].permute(2, 3, 0, 1)
    x_mat = x_blocks.reshape(heads * 3 * d_head, heads * 3 * d_head)
    left = torch.stack([w.W_V, w.W_K, w.W_Q], dim=1)  # [h, 3, d, i]
    left = left.permute(2, 0, 1, 3).reshape(x.shape[-1], -1)  # L: [d, h·3·i]

    r_self = torch.stack(
        [
            einsum("bhp->h", pat_self)[:, None, None]
            * torch.eye(d_head, dtype=x.dtype, device=x.device),
            einsum("bhpi,bhpj->hij", qp * has_self[:, None], a_self),
            einsum("p,bhpij->hij", has_self, q_sum),
        ],
        dim=1,
    )  # Σ δ R_h: [h, 3, i, j]
    cross = einsum("hbij,hjd,de->hbie", r_self, w.W_O, k_out)
    t = left @ cross.reshape(-1, x.shape[-1])
    return n_delta * k_out + t + t.T + left @ x_mat @ left.T
