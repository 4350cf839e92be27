"""The attention block of a LayerNorm-free transformer, `resid_pre → resid_mid` of one layer,
in closed form: `M'` from head-sized sums (`attention_gram`), edges from per-example
attributions written out in feature coordinates (`attention_edges`), and edge ablation with
the queries and keys as the state shared per mask row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.compat import model_device
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.structures.attention_edges import AttentionEdges
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
        queries = self.section.out.window(n_pos)  # on the host: no wait for the mask
        block = self.block.to(x.device, x.dtype)
        return xf[:, self.section.out.index(n_pos, full.device)] + block.attention(xf, queries)

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
