"""What every section structure provides, and the autograd mechanism that any differentiable
forward gets for free.

A structure is built once per (model, section) by `structures.structure_of`; it reads the
weights it needs once, and it owns every computation on the section: the forward it can write
out (`forward`), the `M'` update (`jacobian_accumulator`), the edge update
(`edge_accumulator`) and the ablated output rows of edge ablation (`output_rows`). This base
class implements all of them by vector-Jacobian products through `forward`; the closed-form
structures override what their algebra does faster, and each is tested against this path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from tl_degeneracy.engine.capture import check_finite
from tl_degeneracy.engine.compat import frozen_parameters, model_device
from tl_degeneracy.engine.cotangents import (
    edge_cotangents,
    exact_cotangents,
    output_readout,
    stochastic_cotangents,
)
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.store import ActivationSource
from tl_degeneracy.engine.streaming import batch_generator, chunks

if TYPE_CHECKING:
    from tl_degeneracy.engine.bases import SiteBasis
    from tl_degeneracy.engine.edges import EdgeConfig
    from tl_degeneracy.engine.jacobians import JacobianConfig


class Structure:
    """A section evaluated through a differentiable `forward` (subclasses say which)."""

    kind = "generic"
    needs_activation = True
    """Whether the structure reads the input site's full activation (from a store or a
    capture) rather than running the model from its inputs."""
    closed_form = False
    """Whether `M'` and the edges come from algebra rather than vector-Jacobian products."""

    def __init__(self, model: nn.Module, section: Section):
        self.model, self.section = model, section

    def describe(self) -> str:
        return self.kind

    # -- the forward ----------------------------------------------------------------------------

    def forward(
        self, inputs: Tensor, full: Tensor | None, x: Float[Tensor, "batch p_in d_in"]
    ) -> Float[Tensor, "batch p_out d_out"]:
        """The output site's activation when the input site's selected positions hold `x`
        (the rest at `full`, the input's activation at every position, or at the model's
        values when `full` is None)."""
        raise NotImplementedError

    def leaf_forward(
        self, inputs: Tensor, full: Tensor | None
    ) -> tuple[list[Tensor], Float[Tensor, "batch p_out d_out"]]:
        """Autograd leaves holding the input site's clean value (concatenated: the site's
        vector) and the output computed from them."""
        assert full is not None
        x = self.section.inp.select(full).detach().clone().requires_grad_(True)
        return [x], self.forward(inputs, full, x)

    # -- what the fit pipeline asks for ---------------------------------------------------------

    def jacobian_accumulator(
        self, out_basis: Tensor | None, config: JacobianConfig, source: ActivationSource
    ) -> Any:
        """Streams `M'` of the section (see `engine.jacobians`)."""
        return AutogradJacobian(self, out_basis, config, source)

    def edge_accumulator(
        self, basis_in: SiteBasis, basis_out: SiteBasis, config: EdgeConfig, source
    ) -> Any:
        """Streams the section's edges (see `engine.edges`)."""
        return AutogradEdges(self, basis_in, basis_out, config, source)

    def output_rows(
        self,
        inputs: Tensor,
        full: Tensor | None,
        basis_in: SiteBasis,
        basis_out: SiteBasis,
        feats: Tensor,
    ) -> Any:
        """The section's output features under edge-ablation masks, for one batch."""
        return ForwardRows(self, inputs, full, basis_in, basis_out, feats)


def _grads(y: Tensor, leaves: list[Tensor], v: Tensor) -> Tensor:
    """`Jᵀv` for a chunk of cotangents `v` (leading axis), the leaves' parts concatenated."""
    gs = torch.autograd.grad(y, leaves, v.to(y.dtype), is_grads_batched=True, retain_graph=True)
    return gs[0] if len(gs) == 1 else torch.cat(gs, -1)


class JacobianSums:
    """`M'` as a float64 sum over batches and its count of input tokens, with per-parity sums
    for the split-half error: the state every `M'` accumulator streams and checkpoints."""

    def __init__(self, section: Section, device: torch.device):
        self.section, self.device = section, device
        self.total: Tensor | None = None
        self.halves: Tensor | None = None
        self.count = 0

    def add(self, batch_index: int, m: Tensor, n: int) -> None:
        if self.total is None:
            self.total = torch.zeros_like(m)
            self.halves = torch.zeros(2, *m.shape, dtype=m.dtype, device=m.device)
        self.total += m
        assert self.halves is not None
        self.halves[batch_index % 2] += m
        self.count += n

    def sums(self) -> tuple[Tensor | None, Tensor | None, int]:
        """(total, halves, count) of the data streamed so far."""
        return self.total, self.halves, self.count

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor([self.count])}
        if self.total is not None:
            assert self.halves is not None
            state |= {"total": self.total, "halves": self.halves}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.count = int(state["count"][0])
        if "total" in state:
            self.total = state["total"].to(self.device)
            self.halves = state["halves"].to(self.device)


class AutogradJacobian(JacobianSums):
    """`M'` by batched vector-Jacobian products through the structure's forward: one-hot
    cotangents over output (position, feature) (exact) or Rademacher sources (stochastic)."""

    def __init__(self, structure: Structure, out_basis, config, source: ActivationSource):
        super().__init__(structure.section, model_device(structure.model))
        self.structure, self.out_basis, self.config, self.source = (
            structure,
            out_basis,
            config,
            source,
        )
        self.stats_device = config.stats_device or self.device

    def method(self) -> str:
        return "stochastic" if self.config.method == "stochastic" else "exact"

    def update(self, batch_index: int, inputs: Tensor) -> None:
        st = self.structure
        full = (
            self.source.activation(st.section.inp, batch_index, inputs)
            if st.needs_activation
            else None
        )
        with frozen_parameters(st.model), torch.enable_grad():
            leaves, y = st.leaf_forward(inputs, full)
        check_finite(y.detach(), st.section.out, batch_index)
        readout = output_readout(self.out_basis, y.shape[-1], y.dtype, y.device)
        batch, t_out = y.shape[0], y.shape[1]
        cfg = self.config
        cots: Iterator[tuple[Tensor, float]]
        if cfg.method == "stochastic":
            gen = batch_generator(cfg.seed, st.section.name, batch_index, device=y.device)
            cots = stochastic_cotangents(
                readout, batch, t_out, cfg.n_sources, cfg.sources_over, gen, cfg.chunk_size
            )
        else:
            cots = exact_cotangents(readout, batch, t_out, cfg.chunk_size)
        d_in = sum(leaf.shape[-1] for leaf in leaves)
        m = torch.zeros(d_in, d_in, dtype=torch.float64, device=self.stats_device)
        for v, w in cots:
            flat = _grads(y, leaves, v).reshape(-1, d_in).to(self.stats_device, torch.float64)
            m += w * (flat.T @ flat)
        self.add(batch_index, m, batch * leaves[0].shape[1])


class EdgeSums:
    """The sums every edge accumulator streams and checkpoints: `Σ A²` per (output, input)
    feature, per output from the mean node, and the count of input tokens."""

    def __init__(self, basis_in, basis_out, device: torch.device | str):
        self.edges = torch.zeros(basis_out.k, basis_in.k, dtype=torch.float64, device=device)
        self.mean_edges = torch.zeros(basis_out.k, dtype=torch.float64, device=device)
        self.count = 0

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


class AutogradEdges(EdgeSums):
    """Edges by gradient × activation through the structure's forward (docs/concepts.md,
    "Interaction graph"): exact over output (position, feature), or Rademacher signs over
    output positions; integrated gradients with `config.integration_points > 1`."""

    def __init__(self, structure: Structure, basis_in, basis_out, config, source):
        self.structure, self.config, self.source = structure, config, source
        device = config.stats_device or model_device(structure.model)
        super().__init__(basis_in, basis_out, device)
        self.basis_in, self.basis_out = basis_in.to(device), basis_out.to(device)

    def method(self) -> str:
        cfg = self.config
        ig = f"-ig{cfg.integration_points}" if cfg.integration_points > 1 else ""
        return f"{cfg.method}{ig}"

    def _graphs(self, inputs: Tensor, full: Tensor | None) -> list[tuple[list[Tensor], Tensor]]:
        """(leaves, output) at each quadrature point α (α = 1: the data point itself)."""
        from tl_degeneracy.engine.edges import quadrature

        st, b_in = self.structure, self.basis_in
        out = []
        with frozen_parameters(st.model), torch.enable_grad():
            for alpha in quadrature(self.config.integration_points)[0]:
                if alpha == 1.0 and (full is not None or not st.needs_activation):
                    out.append(st.leaf_forward(inputs, full))
                    continue
                assert full is not None
                clean = st.section.inp.select(full)
                x = b_in.reconstruct(alpha * b_in.features(clean)).to(clean.dtype)
                x = x.detach().requires_grad_(True)
                out.append(([x], st.forward(inputs, full, x)))
        return out

    def update(self, batch_index: int, inputs: Tensor) -> None:
        st, cfg = self.structure, self.config
        full = None
        if st.needs_activation or cfg.integration_points > 1:
            full = self.source.activation(st.section.inp, batch_index, inputs)
        clean = st.section.inp.select(full) if full is not None else None
        graphs = self._graphs(inputs, full)
        weights = _quadrature_weights(cfg.integration_points)
        y0 = graphs[0][1]
        if clean is None:
            clean = torch.cat([leaf.detach() for leaf in graphs[0][0]], -1)
        feats = self.basis_in.features(clean).to(self.edges.device)  # [B, P_in, k_in]
        batch, t_out = y0.shape[:2]
        readout = self.basis_out.C.T.to(y0.device, y0.dtype)  # [k_out, d_out]
        c_pinv_t = self.basis_in.C_pinv.T
        mean = self.basis_in.mean
        idx_device = self.edges.device
        gen = batch_generator(cfg.seed, "edges", st.section.name, batch_index, device=y0.device)
        for out_idx, v, weight in edge_cotangents(
            readout, batch, t_out, cfg.method, cfg.n_sources, gen, cfg.chunk_size
        ):
            attr = self.edges.new_zeros(len(out_idx), batch, self.basis_in.k)
            attr_mean = self.edges.new_zeros(len(out_idx), batch)
            for (leaves, y), w in zip(graphs, weights):
                g = _grads(y, leaves, v).to(self.edges.device, torch.float64)  # [c, B, P, d]
                attr += w * ((g @ c_pinv_t) * feats).sum(2)
                attr_mean += w * (g @ mean).sum(2)
            idx = out_idx.to(idx_device)
            self.edges.index_add_(0, idx, weight * attr.pow(2).sum(1))
            self.mean_edges.index_add_(0, idx, weight * attr_mean.pow(2).sum(1))
        self.count += batch * feats.shape[1]


def _quadrature_weights(n: int) -> list[float]:
    from tl_degeneracy.engine.edges import quadrature

    return quadrature(n)[1]


class ForwardRows:
    """Edge-ablation outputs through the structure's forward: the batch is replicated once
    per output feature (in chunks), each copy's input features masked by that output's row."""

    def __init__(self, structure, inputs, full, basis_in, basis_out, feats, chunk_size=16):
        self.structure, self.inputs, self.full = structure, inputs, full
        self.basis_in, self.basis_out, self.feats = basis_in, basis_out, feats
        self.chunk_size = chunk_size

    def outputs(self, mask: Bool[Tensor, "k_out k_in"]) -> Float[Tensor, "batch p_out k_out"]:
        m = mask.to(self.feats.device, torch.float64)
        batch = self.feats.shape[0]
        outs = []
        st = self.structure
        with frozen_parameters(st.model), torch.no_grad():
            for sl in chunks(m.shape[0], self.chunk_size):
                idx = torch.arange(sl.start, sl.stop, device=m.device)
                c = idx.numel()
                masked = self.feats[None] * m[idx][:, None, None, :]  # [c, B, P, k_in]
                x = self.basis_in.reconstruct(masked).flatten(0, 1)
                full = (
                    None if self.full is None else self.full.repeat(c, *[1] * (self.full.ndim - 1))
                )
                inputs = self.inputs.repeat(c, *[1] * (self.inputs.ndim - 1))
                y = st.forward(inputs, full, x.to(_dtype(self.full, x)))
                f_out = self.basis_out.features(y).reshape(c, batch, y.shape[1], -1)
                outs.append(f_out[torch.arange(c), :, :, idx].permute(1, 2, 0))
        return torch.cat(outs, -1)


def _dtype(full: Tensor | None, x: Tensor) -> torch.dtype:
    return full.dtype if full is not None else x.dtype
