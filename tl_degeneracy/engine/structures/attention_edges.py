"""Exact edges of an attention section `resid_pre → resid_mid` from its per-example
attributions written out in feature coordinates.

With `φ = [f̂, 1]` (the mean node as the last input) and the rows `ρ_j` of `[C⁺; μ]`, the
attribution of input feature j to output feature i at query t is `A_{t,i,j} = Σ_s φ_{s,j}
(∂f̂^out_{t,i}/∂x_s · ρ_j)`. The derivative of `x_t + attn_t(x)` read by column i of `C_out` has
four parts: the residual (s = t); the value path `a_{h,t,s} W_V W_O`; and, through the scores
`e_{h,t,s} = q_t·k_s / scale` with `D_{h,t,s,i} = a_{h,t,s} (c_{h,s,i} − Σ_s' a_{h,t,s'}
c_{h,s',i})` (`c` the values read by the output), the key path `D W_K q_t / scale` at s and the
query path `Σ_s D W_Q k_s / scale` at t. Per example (and query) that is

    A = Dᵀ G + Σ_h' w_h' ∘ Ω_h',

a product through the `heads × positions` score slots (`D`: slot × output, `G`: slot × input,
`G_{(h,s),j} = κ_{h,t,j} φ_{s,j} + φ_{t,j} ϰ_{h,s,j}` with the key and query rows κ, ϰ) plus the
residual and value paths, fixed matrices `Ω_h' = (ρ W_V^h W_O^h C_out)ᵀ` (and `(ρ C_out)ᵀ` for
the residual) weighted per input by `w = [φ_t, Σ_s a_{h,t,s} φ_s]`. Both are evaluated for a few
examples at a time, so that each block of attributions is squared and summed while it is in the
core's cache.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, einsum

from tl_degeneracy.engine.compat import model_device
from tl_degeneracy.engine.streaming import chunks
from tl_degeneracy.engine.structures.base import EdgeSums
from tl_degeneracy.engine.structures.plain import PlainBlock

PARTS_ELEMENTS = 1 << 22
"""Elements of the score-slot factors `D` and `G` computed at once (32 MiB in float64)."""
BLOCK_ELEMENTS = 1 << 18
"""Elements of one block of attributions (2 MiB in float64: a core's cache)."""


class AttentionAttributions:
    """The factors of `A` for one attention block and one pair of bases (module docstring)."""

    def __init__(self, block: PlainBlock, basis_in, basis_out):
        self.heads, self.scale = block.n_heads, block.scale
        c_out = basis_out.C.to(block.W_O)
        self.features = basis_in.features
        rows = torch.cat([basis_in.C_pinv, basis_in.mean[None]])  # ρ: [J, d]
        read_o = einsum("hem,mi->hei", block.W_O, c_out)  # [H, e, I]
        residual = (rows @ c_out)[:, None]  # [J, 1, I]
        values = einsum("jd,hde,hei->jhi", rows, block.W_V, read_o)  # [J, H, I]
        self.direct = torch.cat([residual, values], 1)  # Ωᵀ: [J, H + 1, I]
        self.key_rows = einsum("jd,hde->hej", rows, block.W_K) / block.scale  # κ map: [H, e, J]
        self.query_rows = einsum("jd,hde->hej", rows, block.W_Q) / block.scale
        self.qkv_weight, self.qkv_bias = block.qkv_weight()
        self.read_o = read_o

    @property
    def shape(self) -> tuple[int, int]:
        """(k_out, k_in + 1)."""
        return self.direct.shape[2], self.direct.shape[0]

    def factors(
        self, x: Float[Tensor, "b pos d"], queries: Tensor
    ) -> tuple[
        Float[Tensor, "n slot k_out"],
        Float[Tensor, "n slot k_in_plus_1"],
        Float[Tensor, "k_in_plus_1 n paths"],
    ]:
        """`D`, `G` and `w` of every (example, query) pair `n` (`w` input-major, for the
        product batched over inputs)."""
        batch, n_pos = x.shape[:2]
        heads, n_q = self.heads, len(queries)
        f = self.features(x)
        phi = torch.cat([f, f.new_ones(*f.shape[:-1], 1)], -1)  # [B, S, J]
        qkv = (x @ self.qkv_weight + self.qkv_bias).view(batch, n_pos, 3, heads, -1)
        q, k, v = qkv[:, queries, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, e], [B, S, H, e]
        c = einsum("bshe,hei->bhsi", v, self.read_o)  # values read by the outputs
        allowed = torch.arange(n_pos, device=x.device)[None, :] <= queries[:, None]  # [T, S]
        scores = einsum("bthe,bshe->bths", q, k) / self.scale
        a = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # [B, T, H, S]
        mixed = einsum("bths,bhsi->bthi", a, c)
        d_scores = x.new_empty(batch, n_q, *c.shape[1:])  # D: [B, T, H, S, I]
        torch.sub(c[:, None], mixed[:, :, :, None], out=d_scores).mul_(a[..., None])
        key = einsum("bthe,hej->bthj", q, self.key_rows)  # κ: [B, T, H, J]
        query = einsum("bshe,hej->bhsj", k, self.query_rows)  # ϰ: [B, H, S, J]
        phi_t = phi[:, queries]  # [B, T, J]
        g = x.new_empty(batch, n_q, *query.shape[1:])  # G: [B, T, H, S, J]
        torch.mul(phi_t[:, :, None, None], query[:, None], out=g)
        g.addcmul_(key[..., None, :], phi[:, None, None])
        w = torch.cat([phi_t[:, :, None], einsum("bths,bsj->bthj", a, phi)], 2)  # [B,T,H+1,J]
        n, width = batch * n_q, phi.shape[-1]
        return (
            d_scores.reshape(n, -1, c.shape[-1]),
            g.reshape(n, -1, width),
            w.permute(3, 0, 1, 2).reshape(width, n, heads + 1),
        )

    def assemble(
        self,
        d_scores: Float[Tensor, "n slot k_out"],
        g: Float[Tensor, "n slot k_in_plus_1"],
        w: Float[Tensor, "k_in_plus_1 n paths"],
        out: Tensor | None = None,
    ) -> Float[Tensor, "n k_in_plus_1 k_out"]:
        """`Aᵀ = Gᵀ D + Σ_h' w_h' ∘ Ω_h'ᵀ` for each n (into `out` when given): the score slots in
        one product batched over n, the residual and value paths in one batched over inputs j."""
        attr = torch.bmm(g.transpose(1, 2), d_scores, out=out)  # [n, J, I]
        direct = torch.bmm(w, self.direct)  # [J, n, I]
        return attr.add_(direct.transpose(0, 1))

    def __call__(
        self, x: Float[Tensor, "b pos d"], queries: Tensor
    ) -> Float[Tensor, "b query k_out k_in_plus_1"]:
        """`A_{b,t,i,j}`, the mean node as the last column."""
        attr = self.assemble(*self.factors(x, queries)).transpose(1, 2)
        return attr.reshape(x.shape[0], len(queries), *self.shape)

    def squared_sum(self, x: Float[Tensor, "b pos d"], queries: Tensor) -> Tensor:
        """`Σ_{b,t} A_{b,t}²`: `[k_out, k_in + 1]`."""
        k_out, width = self.shape
        slots = self.heads * x.shape[1]
        per_example = len(queries) * slots * (k_out + width)
        block = max(1, BLOCK_ELEMENTS // (k_out * width))
        buffer = x.new_empty(block, width, k_out)
        total = x.new_zeros(width, k_out)
        for outer in chunks(x.shape[0], max(1, PARTS_ELEMENTS // per_example)):
            d_scores, g, w = self.factors(x[outer], queries)
            for sl in chunks(d_scores.shape[0], block):
                out = buffer[: sl.stop - sl.start]
                total += self.assemble(d_scores[sl], g[sl], w[:, sl], out=out).square_().sum(0)
        return total.T


class AttentionEdges(EdgeSums):
    """Exact edges of an attention section from `AttentionAttributions`."""

    def __init__(self, structure, basis_in, basis_out, config, source):
        device = config.stats_device or model_device(structure.model)
        self.section, self.source = structure.section, source
        super().__init__(basis_in, basis_out, device)
        block = structure.block.to(device, torch.float64)
        self.attributions = AttentionAttributions(block, basis_in.to(device), basis_out.to(device))

    def method(self) -> str:
        return "closed_form:attention"

    def update(self, batch_index: int, inputs: Tensor) -> None:
        x = self.source.activation(self.section.inp, batch_index, inputs)
        n_pos = x.shape[1]
        x = x.to(self.edges.device, torch.float64)
        queries = self.section.out.index(n_pos, x.device)
        sq = self.attributions.squared_sum(x, queries)  # [k_out, k_in + 1]
        self.edges += sq[:, :-1]
        self.mean_edges += sq[:, -1]
        self.count += x.shape[0] * n_pos
