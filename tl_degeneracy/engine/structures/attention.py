"""The attention block of a LayerNorm-free transformer, `resid_pre → resid_mid` of one layer,
in closed form: `M'` from head-sized sums (`attention_gram`), edges from per-example
attributions written out in feature coordinates, and edge ablation with the queries and keys as
the state shared per mask row.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.compat import model_device
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.streaming import chunks
from tl_degeneracy.engine.structures.attention_gram import attention_jacobian_gram
from tl_degeneracy.engine.structures.base import JacobianSums, Structure
from tl_degeneracy.engine.structures.plain import PlainBlock
from tl_degeneracy.engine.structures.rows import StatefulRows, shift, smaller_side


class Attention(Structure):
    """`y_t = x_t + attn_t(x)` at the output positions."""

    kind = "attention"
    closed_form = True

    def __init__(self, model: nn.Module, section: Section, block: PlainBlock):
        super().__init__(model, section)
        self.block = block
        self.every_input_position = section.inp.positions == "all"
        """Edges and edge ablation in closed form need every position of the input (the keys
        and values); `M'` does not."""

    def describe(self) -> str:
        return "closed_form:attention"

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        assert full is not None
        n_pos = full.shape[1]
        idx = self.section.inp.index(n_pos, full.device)
        xf = full.to(x.dtype).index_copy(1, idx, x)
        queries = self.section.out.index(n_pos, full.device)
        block = self.block.to(x.device, x.dtype)
        return xf[:, queries] + block.attention(xf, queries)

    def jacobian_accumulator(self, out_basis, config, source):
        if config.method == "stochastic":
            return super().jacobian_accumulator(out_basis, config, source)
        return AttentionJacobian(self, out_basis, config, source)

    def edge_accumulator(self, basis_in, basis_out, config, source):
        exact = config.method == "exact" and config.integration_points == 1
        if not (exact and self.every_input_position):
            return super().edge_accumulator(basis_in, basis_out, config, source)
        return AttentionEdges(self, basis_in, basis_out, config, source)

    def output_rows(self, inputs, full, basis_in, basis_out, feats):
        if not self.every_input_position:
            return super().output_rows(inputs, full, basis_in, basis_out, feats)
        return AttentionRows(self, basis_in, basis_out, feats)


class AttentionJacobian(JacobianSums):
    """`M'` from the closed form, one batch of `resid_pre` activations at a time."""

    def __init__(self, structure: Attention, out_basis, config, source):
        device = config.stats_device or model_device(structure.model)
        super().__init__(structure.section, device)
        self.block = structure.block.to(device, torch.float64)
        self.source = source
        d = self.block.W_Q.shape[1]
        if out_basis is None:
            self.k_out = torch.eye(d, dtype=torch.float64, device=device)
        else:
            c = out_basis.to(device, torch.float64)
            self.k_out = c @ c.T

    def method(self) -> str:
        return "closed_form:attention"

    def update(self, batch_index: int, inputs: Tensor) -> None:
        section = self.section
        x = self.source.activation(section.inp, batch_index, inputs)
        n_pos = x.shape[1]
        pin, pout = section.inp.index(n_pos, self.device), section.out.index(n_pos, self.device)
        x = x.to(self.device, torch.float64)
        m = attention_jacobian_gram(x, self.block, self.k_out, pin, pout)
        self.add(batch_index, m, x.shape[0] * len(pin))


class AttentionEdges:
    """Exact edges from `A_{b,t,i,j}` written out (see `attributions`)."""

    def __init__(self, structure: Attention, basis_in, basis_out, config, source):
        device = config.stats_device or model_device(structure.model)
        self.section, self.source = structure.section, source
        self.basis_in = basis_in.to(device)
        self.edges = torch.zeros(basis_out.k, basis_in.k, dtype=torch.float64, device=device)
        self.mean_edges = torch.zeros(basis_out.k, dtype=torch.float64, device=device)
        self.count = 0
        block = structure.block.to(device, torch.float64)
        self.block = block
        c_out = basis_out.C.to(device)
        rows = torch.cat([self.basis_in.C_pinv, self.basis_in.mean[None]])  # [k_in + 1, d]
        self.rows_out = rows @ c_out  # residual path
        self.rows_vo = torch.einsum("jd,hde,hem,mi->hji", rows, block.W_V, block.W_O, c_out)
        self.rows_k = torch.einsum("jd,hde->hje", rows, block.W_K)
        self.rows_q = torch.einsum("jd,hde->hje", rows, block.W_Q)
        self.read_o = torch.einsum("hem,mi->hei", block.W_O, c_out)

    def method(self) -> str:
        return "closed_form:attention"

    def attributions(
        self, x: Float[Tensor, "b pos d"], queries: Tensor
    ) -> Float[Tensor, "b query k_out k_in_plus_1"]:
        """`A_{b,t,i,j}` of the attention section, the mean node as the last column.

        With `φ = [f̂, 1]` and the rows `ρ_j` of `[C⁺; μ]`, `A_{t,i,j} = Σ_s φ_{s,j}
        (∂f̂^out_{t,i}/∂x_s · ρ_j)`. The derivative of `x_t + attn_t(x)` read by column i of
        `C_out` has four parts: the residual (s = t), the value path `a_{h,t,s} W_V W_O`,
        and, through the scores `e_{h,t,s} = q_t·k_s / scale` with
        `D_{h,t,s,i} = a_{h,t,s} (c_{h,s,i} − Σ_s' a_{h,t,s'} c_{h,s',i})` (`c` the values read
        by the output), the key path `D W_K q_t / scale` at s and the query path
        `Σ_s D W_Q k_s / scale` at t.
        """
        blk = self.block
        f = self.basis_in.features(x)
        phi = torch.cat([f, f.new_ones(*f.shape[:-1], 1)], -1)  # [b, S, j]
        w, b = blk.qkv_weight()
        split = (x @ w + b).unflatten(-1, (3, blk.n_heads, -1))
        q, k, v = split[:, queries, 0], split[:, :, 1], split[:, :, 2]  # [b, ·, H, e]
        scores = torch.einsum("bthe,bshe->bhts", q, k) / blk.scale
        allowed = torch.arange(x.shape[1], device=x.device)[None, :] <= queries[:, None]
        a = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [b, H, T, S]
        c = torch.einsum("bshe,hei->bhsi", v, self.read_o)
        mixed = torch.einsum("bhts,bhsi->bhti", a, c)
        d_scores = a[..., None] * (c[:, :, None] - mixed[:, :, :, None])  # [b, H, T, S, i]
        attr = phi[:, queries, None, :] * self.rows_out.T  # residual
        attr = attr + torch.einsum("bhts,bsj,hji->btij", a, phi, self.rows_vo)
        key_rows = torch.einsum("bthe,hje->bhtj", q, self.rows_k) / blk.scale
        attr = attr + torch.einsum("bhtsi,bhtj,bsj->btij", d_scores, key_rows, phi)
        query_rows = torch.einsum("bshe,hje->bhsj", k, self.rows_q) / blk.scale
        attr = attr + phi[:, queries, None, :] * torch.einsum(
            "bhtsi,bhsj->btij", d_scores, query_rows
        )
        return attr

    def update(self, batch_index: int, inputs: Tensor) -> None:
        x = self.source.activation(self.section.inp, batch_index, inputs)
        n_pos = x.shape[1]
        x = x.to(self.edges.device, torch.float64)
        queries = self.section.out.index(n_pos, x.device)
        for sl in chunks(x.shape[0], 256):
            sq = self.attributions(x[sl], queries).pow(2).sum((0, 1))  # [k_out, k_in + 1]
            self.edges += sq[:, :-1]
            self.mean_edges += sq[:, -1]
        self.count += x.shape[0] * n_pos

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "edges": self.edges,
            "mean_edges": self.mean_edges,
            "count": torch.tensor([self.count]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.edges.device
        self.edges, self.mean_edges = state["edges"].to(device), state["mean_edges"].to(device)
        self.count = int(state["count"][0])


class AttentionRows(StatefulRows):
    """Edge ablation of the attention block. Values reach output i only through
    `W_O C_out[:, i]`, so they are kept contracted with it (`[B, S, H]` per output); shared per
    mask row: the queries and keys, hence the pattern."""

    def __init__(self, structure: Attention, basis_in, basis_out, feats: Tensor):
        device = feats.device
        super().__init__(device)
        block = structure.block.to(device, torch.float64)
        b_in, b_out = basis_in.to(device), basis_out.to(device)
        n_pos = feats.shape[1]
        self.heads, self.scale = block.n_heads, block.scale
        self.feats = feats  # [B, S, k_in]
        self.queries = structure.section.out.index(n_pos, device)
        self.feats_q = feats[:, self.queries]  # [B, T, k_in]
        self.inputs_q = self.feats_q.flatten(0, 1).T.contiguous()  # [k_in, B·T]
        self.inputs_k = feats.flatten(0, 1).T.contiguous()  # [k_in, B·S]
        c_in, mu, c_out = b_in.C_pinv, b_in.mean, b_out.C

        def flat(w: Tensor) -> Tensor:  # [H, d, e] -> [d, H·e]
            return w.permute(1, 0, 2).flatten(1)

        self.proj_q, self.proj_k = c_in @ flat(block.W_Q), c_in @ flat(block.W_K)
        self.base_q = mu @ flat(block.W_Q) + block.b_Q.flatten()
        self.base_k = mu @ flat(block.W_K) + block.b_K.flatten()
        self.full_q = self.base_q + self.inputs_q.T @ self.proj_q  # [B·T, H·e]
        self.full_k = self.base_k + self.inputs_k.T @ self.proj_k  # [B·S, H·e]
        read = torch.einsum("hem,mi->hei", block.W_O, c_out)  # [H, e, k_out]
        self.value_read = torch.einsum("jd,hde,hei->jhi", c_in, block.W_V, read)
        self.base_value = torch.einsum("d,hde,hei->hi", mu, block.W_V, read)
        self.base_value += torch.einsum("he,hei->hi", block.b_V, read)
        self.full_value = self.base_value + torch.einsum("bsj,jhi->bshi", feats, self.value_read)
        self.lin = c_in @ c_out
        self.const = (mu + block.b_O - b_out.mean) @ c_out
        causal = torch.arange(n_pos, device=device)[None, :] <= self.queries[:, None]  # [T, S]
        self.blocked = ~causal[:, :, None]  # [T, S, 1]

    def _linear(self, mask):
        return self.const + self.feats_q @ (mask.T.to(self.lin) * self.lin)

    def _state(self, full):
        if full:
            return self.full_q, self.full_k
        return self.base_q.expand_as(self.full_q), self.base_k.expand_as(self.full_k)

    def _move(self, state, add, remove):
        q = shift(state[0], self.inputs_q, self.proj_q, add, remove)
        return q, shift(state[1], self.inputs_k, self.proj_k, add, remove)

    def _read(self, state, row, outputs):
        batch, n_pos = self.feats.shape[:2]
        q = state[0].view(batch, -1, self.heads, self.proj_q.shape[1] // self.heads)
        k = state[1].view(batch, n_pos, self.heads, -1)
        scores = (q[:, :, None] * k[:, None]).sum(-1) / self.scale  # [B, T, S, H]
        pattern = scores.masked_fill(self.blocked, float("-inf")).softmax(-2)
        add, idx = smaller_side(row)
        read = self.value_read[idx][..., outputs].flatten(1)  # [n, H·o]
        delta = (self.inputs_k[idx].T @ read).view(batch, n_pos, self.heads, -1)
        if add:
            values = self.base_value[:, outputs] + delta
        else:
            values = self.full_value[..., outputs] - delta
        return torch.einsum("btsh,bsho->bto", pattern, values)
