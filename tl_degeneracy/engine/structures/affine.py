"""Position-wise sections with a closed form (`forms.AffineRelu`, `forms.Affine`): a ReLU MLP
with or without a residual, a ReLU layer of a plain MLP, an unembedding without a final norm,
the linear maps out of composite sites.

With `J_b = P + W_in D_b Q` (row convention, `D_b` the 0/1 ReLU mask) and `K = C_out C_outᵀ`:

    M' = N P K Pᵀ + W_in diag(Σ m) Q K Pᵀ + (…)ᵀ + W_in [(Q K Qᵀ) ∘ Σ m mᵀ] W_inᵀ

so `M'` needs only the mask counts and co-occurrence Gram over the data; edges need per-example
products in feature coordinates (`C⁺ J_b C_out = L + Pr diag(m_b) R`, summed by `relu_edges`),
and edge ablation keeps the hidden pre-activations as its state (`rows.StatefulRows`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.compat import is_transformer, model_device
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.structures.base import EdgeSums, JacobianSums, Structure
from tl_degeneracy.engine.structures.forms import Affine, AffineRelu, Form
from tl_degeneracy.engine.structures.relu_edges import relu_edge_sums
from tl_degeneracy.engine.structures.rows import StatefulRows, shift


def _readout_gram(out_basis: Tensor | None, d_out: int, device: torch.device) -> Tensor:
    """`K = C_out C_outᵀ`, the output features' metric on raw output space."""
    if out_basis is None:
        return torch.eye(d_out, dtype=torch.float64, device=device)
    c = out_basis.to(device, torch.float64)
    return c @ c.T


def _f64(form: Form, device: torch.device) -> Form:
    """The form's tensors as float64 on `device`."""

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(device, torch.float64)

    if isinstance(form, Affine):
        p, c = cast(form.P), cast(form.c)
        assert p is not None and c is not None
        return Affine(p, c)
    w_in, b_in, c_ = cast(form.W_in), cast(form.b_in), cast(form.c)
    assert w_in is not None and b_in is not None and c_ is not None
    return AffineRelu(w_in, b_in, cast(form.Q), cast(form.P), c_)


class FormStructure(Structure):
    """A section that computes `form` at each output position from the same input position."""

    def __init__(self, model: nn.Module, section: Section, form: Form):
        super().__init__(model, section)
        self.form = form
        self.kind = "relu_mlp" if isinstance(form, AffineRelu) else "affine"
        self.closed_form = True

    def describe(self) -> str:
        return f"closed_form:{self.kind}"

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        form = self.form
        if full is None:  # a declared form: input and output positions are the same
            return form(x.to(_dtype_of(form))).to(x.dtype)
        n_pos = full.shape[1]
        xf = full.to(x.dtype).index_copy(1, self.section.inp.index(n_pos, x.device), x)
        out = xf[:, self.section.out.index(n_pos, x.device)]
        return form(out.to(_dtype_of(form))).to(x.dtype)

    def jacobian_accumulator(self, out_basis, config, source):
        if config.method == "stochastic":
            return super().jacobian_accumulator(out_basis, config, source)
        return FormJacobian(self, out_basis, config, source)

    def edge_accumulator(self, basis_in, basis_out, config, source):
        if config.method != "exact" or config.integration_points != 1:
            return super().edge_accumulator(basis_in, basis_out, config, source)
        return FormEdges(self, basis_in, basis_out, config, source)

    def output_rows(self, inputs, full, basis_in, basis_out, feats):
        n_pos = feats.shape[1] if full is None else full.shape[1]
        slots = self.section.outputs_in_input(n_pos).to(feats.device)
        form = _f64(self.form, feats.device)
        if isinstance(form, Affine):
            return AffineRows(form, basis_in, basis_out, feats[:, slots])
        return ReluRows(form, basis_in, basis_out, feats[:, slots])


def _dtype_of(form: Form) -> torch.dtype:
    return form.P.dtype if isinstance(form, Affine) else form.W_in.dtype


class FormJacobian(JacobianSums):
    """`M'` of a form from the ReLU mask statistics (an affine form needs only the count)."""

    def __init__(self, structure: FormStructure, out_basis, config, source):
        device = config.stats_device or model_device(structure.model)
        super().__init__(structure.section, device)
        self.structure, self.out_basis, self.source = structure, out_basis, source
        self.form = _f64(structure.form, device)
        self.tokens_in = is_transformer(structure.model)  # inputs are tokens [batch, pos]
        self.n_matched = 0
        self.m_sum: Tensor | None = None
        self.mm_sum: Tensor | None = None
        if isinstance(self.form, AffineRelu):
            d_hidden = self.form.W_in.shape[1]
            self.m_sum = torch.zeros(d_hidden, dtype=torch.float64, device=device)
            self.mm_sum = torch.zeros(d_hidden, d_hidden, dtype=torch.float64, device=device)

    def method(self) -> str:
        return f"closed_form:{self.structure.kind}"

    def update(self, batch_index: int, inputs: Tensor) -> None:
        section = self.section
        if isinstance(self.form, Affine) and self.tokens_in:
            # an affine form needs only the counts: token inputs [batch, pos] give them
            # without computing the input activation
            n_rows, n_pos = inputs.shape[0], inputs.shape[1]
            self.count += n_rows * section.inp.n_positions(n_pos)
            self.n_matched += n_rows * len(section.matched_positions(n_pos)[0])
            return
        full = self.source.activation(section.inp, batch_index, inputs)
        n_pos = full.shape[1]
        slots = section.matched_positions(n_pos)[0].to(full.device)
        x = section.inp.select(full)[:, slots]
        self.count += x.shape[0] * section.inp.n_positions(n_pos)
        self.n_matched += x.shape[0] * x.shape[1]
        if isinstance(self.form, AffineRelu):
            assert self.m_sum is not None and self.mm_sum is not None
            pre = x.to(self.device, torch.float64) @ self.form.W_in + self.form.b_in
            mask = (pre > 0).reshape(-1, pre.shape[-1]).to(torch.float64)
            self.m_sum += mask.sum(0)
            self.mm_sum += mask.T @ mask

    def sums(self) -> tuple[Tensor | None, Tensor | None, int]:
        if self.count == 0:
            return None, None, 0
        form = self.form
        if isinstance(form, Affine):
            k = _readout_gram(self.out_basis, form.P.shape[1], self.device)
            total = self.n_matched * (form.P @ k @ form.P.T)
        else:
            assert self.m_sum is not None and self.mm_sum is not None
            read = form.read()
            k = _readout_gram(self.out_basis, read.shape[1], self.device)
            a = form.W_in * self.m_sum  # W_in diag(Σm)
            inner = (read @ k @ read.T) * self.mm_sum
            total = form.W_in @ inner @ form.W_in.T
            if form.P is not None:
                cross = a @ (read @ k @ form.P.T)
                total = self.n_matched * (form.P @ k @ form.P.T) + cross + cross.T + total
        return total, torch.stack([total / 2, total / 2]), self.count

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor([self.count]), "n_matched": torch.tensor([self.n_matched])}
        if self.m_sum is not None and self.mm_sum is not None:
            state |= {"m_sum": self.m_sum, "mm_sum": self.mm_sum}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.count = int(state["count"][0])
        self.n_matched = int(state["n_matched"][0])
        if "m_sum" in state:
            self.m_sum = state["m_sum"].to(self.device)
            self.mm_sum = state["mm_sum"].to(self.device)


class FormEdges(EdgeSums):
    """Exact edges of a form from per-example Jacobians in feature coordinates: for the ReLU
    form `C⁺ J_b C_out = L + Pr diag(m_b) R` (summed over examples grouped by mask,
    `relu_edges`), for the affine one the constant `L`."""

    def __init__(self, structure: FormStructure, basis_in, basis_out, config, source):
        device = config.stats_device or model_device(structure.model)
        self.section, self.source = structure.section, source
        self.basis_in = basis_in.to(device)
        super().__init__(basis_in, basis_out, device)
        form = _f64(structure.form, device)
        self.form = form
        c_out, c_pinv, mean = basis_out.C.to(device), self.basis_in.C_pinv, self.basis_in.mean
        if isinstance(form, Affine):
            self.lin = c_pinv @ form.P @ c_out  # [k_in, k_out]
            self.mean_lin = mean @ form.P @ c_out
        else:
            direct = form.direct()
            self.lin = c_pinv @ direct @ c_out
            self.proj = c_pinv @ form.W_in  # [k_in, d_hidden]
            self.read = form.read() @ c_out  # [d_hidden, k_out]
            self.mean_lin = mean @ direct @ c_out
            self.mean_proj = mean @ form.W_in
        self.kind = structure.kind

    def method(self) -> str:
        return f"closed_form:{self.kind}"

    def update(self, batch_index: int, inputs: Tensor) -> None:
        section = self.section
        full = self.source.activation(section.inp, batch_index, inputs)
        n_pos = full.shape[1]
        slots = section.matched_positions(n_pos)[0].to(full.device)
        act = section.inp.select(full)[:, slots].to(self.edges.device, torch.float64)
        feats = self.basis_in.features(act)  # [B, T, k_in]
        n_in = full.shape[0] * section.inp.n_positions(n_pos)
        if isinstance(self.form, Affine):
            sq = feats.pow(2).sum((0, 1))  # [k_in]
            self.edges += (self.lin.pow(2) * sq[:, None]).T
            self.mean_edges += self.mean_lin.pow(2) * feats.shape[0] * feats.shape[1]
        else:
            mask = ((act @ self.form.W_in + self.form.b_in) > 0).to(torch.float64)
            flat_f = feats.reshape(-1, feats.shape[-1])
            flat_m = mask.reshape(-1, mask.shape[-1])
            self.edges += relu_edge_sums(flat_f, flat_m, self.lin, self.proj, self.read).T
            mean_a = self.mean_lin + (self.mean_proj * flat_m) @ self.read
            self.mean_edges += mean_a.pow(2).sum(0)
        self.count += n_in


class AffineRows:
    """Edge ablation of an affine form: output i is a masked linear function of the inputs."""

    def __init__(self, form: Affine, basis_in, basis_out, feats: Float[Tensor, "batch t k_in"]):
        device = feats.device
        b_in, b_out = basis_in.to(device), basis_out.to(device)
        self.feats = feats
        self.lin = b_in.C_pinv @ form.P @ b_out.C  # [k_in, k_out]
        self.const = (b_in.mean @ form.P + form.c - b_out.mean) @ b_out.C

    def outputs(self, mask: Tensor) -> Tensor:
        return self.const + self.feats @ (mask.T.to(self.lin) * self.lin)


class ReluRows(StatefulRows):
    """Edge ablation of a ReLU form; shared per mask row: the hidden pre-activations."""

    def __init__(self, form: AffineRelu, basis_in, basis_out, feats: Tensor):
        device = feats.device
        super().__init__(device)
        b_in, b_out = basis_in.to(device), basis_out.to(device)
        self.feats = feats  # [B, T, k_in]
        self.inputs_t = feats.flatten(0, 1).T.contiguous()  # [k_in, B·T]
        self.lin = b_in.C_pinv @ form.direct() @ b_out.C  # [k_in, k_out]
        self.proj = b_in.C_pinv @ form.W_in  # [k_in, d_hidden]
        self.read = form.read() @ b_out.C  # [d_hidden, k_out]
        self.base_pre = b_in.mean @ form.W_in + form.b_in
        self.full_pre = self.base_pre + self.inputs_t.T @ self.proj  # [B·T, d_hidden]
        self.const = (b_in.mean @ form.direct() + form.c - b_out.mean) @ b_out.C

    def _linear(self, mask):
        return self.const + self.feats @ (mask.T.to(self.lin) * self.lin)

    def _state(self, full):
        return (self.full_pre if full else self.base_pre.expand_as(self.full_pre),)

    def _move(self, state, add, remove):
        return (shift(state[0], self.inputs_t, self.proj, add, remove),)

    def _read(self, state, row, outputs):
        return (torch.relu(state[0]) @ self.read[:, outputs]).view(*self.feats.shape[:2], -1)
