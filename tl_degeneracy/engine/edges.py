"""The interaction graph between consecutive sites (method.md §5).

Both sides in basis coordinates, gradient × activation with baseline 0 (the mean), input
positions summed inside the square:

    A_{b,t,i,j} = Σ_α w_α Σ_s ∂f̂^{l+1}_{t,i}(μ + α f̂ C⁺) / ∂f̂^l_{s,j} · f̂^l_{b,s,j}
    E_{ij} = (1/(N·P_l)) Σ_b Σ_t A_{b,t,i,j}² ≥ 0

Since `f = μ + f̂ C⁺`, the gradient with respect to input features is the raw-space gradient
times `C⁺ᵀ`. The mean is the constant node: its edge uses the gradient times `μ` (not
scaled by α) and is reported apart. Exact: one-hot cotangents over output (t, i), batched;
stochastic: Rademacher signs over output positions, so `E[(Σ_t r_t A_t)²] = Σ_t A_t²` and one
output position makes it exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import (
    StopForward,
    frozen_parameters,
    hooked_state_dict,
    run_with_hooks,
)
from tl_degeneracy.engine.jacobians import closed_form_kind
from tl_degeneracy.engine.plain_forward import PlainBlock, attention_layer
from tl_degeneracy.engine.result import BasisResult
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    batch_generator,
    chunks,
    iter_batches,
    stream,
)
from tl_degeneracy.viz.html import HtmlReprMixin


@dataclass(frozen=True)
class EdgeConfig:
    """How edges are computed."""

    method: Literal["exact", "stochastic"] = "exact"
    n_sources: int = 1
    """Rademacher sources over output positions per unit (stochastic)."""
    integration_points: int = 1
    """Points α of the Gauss–Legendre rule on [0, 1]; 1 means the plain gradient at α = 1."""
    chunk_size: int = 32
    seed: int = 0
    closed_form: bool = True
    """Use closed forms where the section has one (exact, plain gradient only)."""


def quadrature(n: int) -> tuple[list[float], list[float]]:
    """Points and weights on [0, 1]: α = 1 for n = 1, else Gauss–Legendre."""
    if n == 1:
        return [1.0], [1.0]
    x, w = np.polynomial.legendre.leggauss(n)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


@dataclass
class SectionEdges:
    """Edges of one section: `E[i, j]` from input feature j to output feature i."""

    section: Section
    edges: Float[Tensor, "k_out k_in"]
    mean_edges: Float[Tensor, " k_out"]
    """Edges from the constant (mean) node of the input site, reported apart."""
    count: int
    method: str

    @property
    def total_edges(self) -> int:
        return int(self.edges.numel())

    def edges_for_fraction(self, fraction: float = 0.99) -> int:
        """Fewest edges that carry `fraction` of the total edge weight."""
        flat = self.edges.flatten().sort(descending=True).values
        cum = flat.cumsum(0)
        return int(torch.searchsorted(cum, fraction * cum[-1]).item()) + 1

    def top_edges(self, n: int) -> list[tuple[int, int, float]]:
        """The `n` largest edges as (output feature, input feature, E)."""
        vals, idx = self.edges.flatten().topk(min(n, self.edges.numel()))
        k_in = self.edges.shape[1]
        return [(int(i) // k_in, int(i) % k_in, float(v)) for v, i in zip(vals, idx)]


class _EdgeAccumulator:
    def __init__(
        self,
        model: nn.Module,
        section: Section,
        basis_in: SiteBasis,
        basis_out: SiteBasis,
        config: EdgeConfig,
    ):
        self.model, self.section, self.config = model, section, config
        self.basis_in, self.basis_out = basis_in, basis_out
        k_in, k_out = basis_in.k, basis_out.k
        self.edges = torch.zeros(k_out, k_in, dtype=torch.float64)
        self.mean_edges = torch.zeros(k_out, dtype=torch.float64)
        self.count = 0

    def update(self, batch_index: int, tokens: Tensor) -> None:
        cfg = self.config
        b_in, b_out = self.basis_in, self.basis_out
        alphas, weights = quadrature(cfg.integration_points)
        graphs = []
        with frozen_parameters(self.model):
            for alpha in alphas:
                store: dict[str, Tensor] = {}

                def make_input(a: Tensor, alpha: float = alpha, store=store) -> Tensor:
                    f = a.detach().to(torch.float64)
                    feats = b_in.features(f)
                    store["feats"] = feats
                    x = f if alpha == 1.0 else b_in.reconstruct(alpha * feats)
                    x = x.to(a.dtype).requires_grad_(True)
                    store["x"] = x
                    return x

                with torch.enable_grad():
                    y = run_section(self.model, tokens, self.section, make_input)
                graphs.append((store["x"], y, store["feats"]))
        feats = graphs[0][2]  # [B, P_in, k_in], the data point's features
        batch, t_out = graphs[0][1].shape[:2]
        readout = b_out.C.T.to(graphs[0][1].dtype)  # [k_out, d_out]
        k_out, d_out = readout.shape
        c_pinv_t = b_in.C_pinv.T  # [d_in, k_in]
        mean = b_in.mean
        if cfg.method == "exact":
            units = [(t, i) for t in range(t_out) for i in range(k_out)]
            weight = 1.0
        else:
            gen = batch_generator(cfg.seed, "edges", self.section.name, batch_index)
            signs = (
                torch.randint(0, 2, (cfg.n_sources, k_out, batch, t_out), generator=gen) * 2 - 1
            ).to(readout.dtype)
            units = [(r, i) for r in range(cfg.n_sources) for i in range(k_out)]
            weight = 1.0 / cfg.n_sources
        for sl in chunks(len(units), cfg.chunk_size):
            part = units[sl]
            v = readout.new_zeros(len(part), batch, t_out, d_out)
            rows = torch.arange(len(part))
            out_idx = torch.tensor([i for _, i in part])
            if cfg.method == "exact":
                ts = torch.tensor([t for t, _ in part])
                v[rows, :, ts] = readout[out_idx][:, None, :]
            else:
                rs = torch.tensor([r for r, _ in part])
                v = signs[rs, out_idx][..., None] * readout[out_idx][:, None, None, :]
            attr = torch.zeros(len(part), batch, b_in.k, dtype=torch.float64)
            attr_mean = torch.zeros(len(part), batch, dtype=torch.float64)
            for (x, y, _), w in zip(graphs, weights):
                (g,) = torch.autograd.grad(y, x, v, is_grads_batched=True, retain_graph=True)
                g = g.to(torch.float64)  # [c, B, P_in, d_in]
                attr += w * ((g @ c_pinv_t) * feats).sum(2)
                attr_mean += w * (g @ mean).sum(2)
            self.edges.index_add_(0, out_idx, weight * attr.pow(2).sum(1))
            self.mean_edges.index_add_(0, out_idx, weight * attr_mean.pow(2).sum(1))
        self.count += batch * feats.shape[1]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "edges": self.edges,
            "mean_edges": self.mean_edges,
            "count": torch.tensor([self.count]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.edges, self.mean_edges = state["edges"], state["mean_edges"]
        self.count = int(state["count"][0])


class _ClosedFormEdgeAccumulator(_EdgeAccumulator):
    """Edges of a linear unembedding, a ReLU MLP with residual, or a LayerNorm-free attention
    block, from per-example Jacobians written out in feature coordinates. For the MLP,
    `C⁺ J_b C_out = L + P diag(m_b) R` (ReLU mask `m_b`); for attention see
    `_attention_attributions`."""

    def __init__(self, model, section, basis_in, basis_out, config, kind: str):
        super().__init__(model, section, basis_in, basis_out, config)
        self.kind = kind
        sd = {k: v.to(torch.float64) for k, v in hooked_state_dict(model).items()}
        c_out = basis_out.C
        if kind == "attention":
            layer = int(section.inp.hook.split(".")[1])
            block = PlainBlock.of(model, layer, sd)
            assert block is not None
            self.block = block
            # Rows of C⁺ and the mean: the input directions of the features and the mean node.
            rows = torch.cat([basis_in.C_pinv, basis_in.mean[None]])  # [k_in + 1, d]
            self.rows_out = rows @ c_out  # residual path
            self.rows_vo = torch.einsum("jd,hde,hem,mi->hji", rows, block.W_V, block.W_O, c_out)
            self.rows_k = torch.einsum("jd,hde->hje", rows, block.W_K)
            self.rows_q = torch.einsum("jd,hde->hje", rows, block.W_Q)
            self.read_o = torch.einsum("hem,mi->hei", block.W_O, c_out)
        elif kind == "linear_unembed":
            w_u = sd["unembed.W_U"]
            self.lin = basis_in.C_pinv @ w_u @ c_out  # [k_in, k_out]
            self.mean_read = basis_in.mean @ w_u @ c_out
        else:
            layer = int(section.inp.hook.split(".")[1])
            self.w_in = sd[f"blocks.{layer}.mlp.W_in"]
            self.pre_hook = f"blocks.{layer}.mlp.hook_pre"
            self.lin = basis_in.C_pinv @ c_out
            self.proj = basis_in.C_pinv @ self.w_in  # [k_in, d_mlp]
            self.read = sd[f"blocks.{layer}.mlp.W_out"] @ c_out  # [d_mlp, k_out]
            self.mean_lin = basis_in.mean @ c_out
            self.mean_proj = basis_in.mean @ self.w_in

    def _attention_attributions(
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
        allowed = torch.arange(x.shape[1])[None, :] <= queries[:, None]
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

    def update(self, batch_index: int, tokens: Tensor) -> None:
        n_pos = tokens.shape[1]
        pin = self.section.inp.index(n_pos).tolist()
        pout = self.section.out.index(n_pos).tolist()
        matched_in = torch.tensor([pin.index(q) for q in pout if q in pin])
        matched_out = torch.tensor([q for q in pout if q in pin])
        if self.kind == "attention":
            (x,) = capture_sites(self.model, tokens, [self.section.inp], batch_index)
            queries = self.section.out.index(n_pos)
            for sl in chunks(tokens.shape[0], 256):
                sq = self._attention_attributions(x[sl].to(torch.float64), queries)
                sq = sq.pow(2).sum((0, 1))  # [k_out, k_in + 1]
                self.edges += sq[:, :-1]
                self.mean_edges += sq[:, -1]
            self.count += tokens.shape[0] * n_pos
            return
        hooks = [self.section.inp.hook] + ([self.pre_hook] if self.kind == "relu_mlp" else [])
        store: dict[str, Tensor] = {}

        def make(name: str):
            def hook(act: Tensor, hook=None) -> None:
                store[name] = act.detach()
                if len(store) == len(hooks):
                    raise StopForward

            return hook

        with torch.no_grad():
            run_with_hooks(self.model, tokens, [(h, make(h)) for h in hooks], stop_early=True)
        act = self.section.inp.select(store[self.section.inp.hook])
        feats = self.basis_in.features(act)[:, matched_in]  # [B, T, k_in]
        n_in = tokens.shape[0] * len(pin)
        if self.kind == "linear_unembed":
            sq = feats.pow(2).sum((0, 1))  # [k_in]
            self.edges += (self.lin.pow(2) * sq[:, None]).T
            self.mean_edges += self.mean_read.pow(2) * feats.shape[0] * feats.shape[1]
        else:
            mask = (store[self.pre_hook][:, matched_out] > 0).to(torch.float64)  # [B, T, d_mlp]
            flat_f = feats.reshape(-1, feats.shape[-1])
            flat_m = mask.reshape(-1, mask.shape[-1])
            for sl in chunks(flat_f.shape[0], 128):
                q = torch.einsum("jm,bm,mi->bji", self.proj, flat_m[sl], self.read)
                a = flat_f[sl, :, None] * (self.lin + q)  # [b, k_in, k_out]
                self.edges += a.pow(2).sum(0).T
                mean_a = self.mean_lin + (self.mean_proj * flat_m[sl]) @ self.read
                self.mean_edges += mean_a.pow(2).sum(0)
        self.count += n_in


def section_edges(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    config: EdgeConfig | None = None,
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
) -> SectionEdges:
    """Stream the edges of the section from `basis_in`'s site to `basis_out`'s site."""
    config = config or EdgeConfig()
    section = Section(basis_in.site, basis_out.site)
    kind = closed_form_kind(model, section)
    if kind == "attention" and attention_layer(model, section.inp, section.out) is None:
        kind = None  # the edges' closed form needs every position of the input and plain blocks
    if (
        kind is not None
        and config.closed_form
        and config.method == "exact"
        and config.integration_points == 1
    ):
        acc: _EdgeAccumulator = _ClosedFormEdgeAccumulator(
            model, section, basis_in, basis_out, config, kind
        )
    else:
        acc = _EdgeAccumulator(model, section, basis_in, basis_out, config)
    stream(
        acc,
        iter_batches(tokens, batch_size),
        f"edges {section.name}",
        checkpoint,
        key=f"edges.{section.name}",
        progress=progress,
    )
    if acc.count == 0:
        raise EmptyDataError(f"edges {section.name}: no data")
    method = config.method + (
        f"-ig{config.integration_points}" if config.integration_points > 1 else ""
    )
    if isinstance(acc, _ClosedFormEdgeAccumulator):
        method = f"closed_form:{acc.kind}"
    return SectionEdges(
        section, acc.edges / acc.count, acc.mean_edges / acc.count, acc.count, method
    )


@dataclass
class InteractionGraph(HtmlReprMixin):
    """Edges of every consecutive section of a fitted basis, with node importances."""

    basis: BasisResult
    sections: dict[str, SectionEdges]
    modules: dict[str, list[int]] = field(default_factory=dict)
    """Optional module label per feature, keyed by site name (`find_modules(graph).by_site()`;
    −1 marks a feature that took no part)."""

    def __getitem__(self, name: str) -> SectionEdges:
        return self.sections[name]

    def to_graph_data(self, top_n: int = 12, examples: dict | None = None) -> dict:
        """The plain dict the interaction-graph widget draws (top `top_n` features a site)."""
        layers, keep = [], {}
        for name, b in self.basis.bases.items():
            n = min(top_n, b.k)
            keep[name] = n
            mods = self.modules.get(name)
            layers.append(
                {
                    "site": name,
                    "features": [
                        {
                            "id": f"{name}:{i}",
                            "label": f"{i}",
                            "importance": float(b.importance[i]),
                            "module": None if mods is None or mods[i] < 0 else int(mods[i]),
                            "examples": (examples or {}).get(f"{name}:{i}", []),
                        }
                        for i in range(n)
                    ],
                }
            )
        edges = []
        for sec in self.sections.values():
            src, dst = sec.section.inp.name, sec.section.out.name
            e = sec.edges[: keep[dst], : keep[src]]
            for i in range(e.shape[0]):
                for j in range(e.shape[1]):
                    edges.append(
                        {"source": f"{src}:{j}", "target": f"{dst}:{i}", "weight": float(e[i, j])}
                    )
        return {"layers": layers, "edges": edges}

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.graph_widget import graph_widget_html
        from tl_degeneracy.viz.html import PageSection, table

        rows = [
            {
                "section": k,
                "edges": s.total_edges,
                "method": s.method,
                "edges for 99% of weight": s.edges_for_fraction(0.99),
            }
            for k, s in self.sections.items()
        ]
        return [
            PageSection("Interaction graph", graph_widget_html(self.to_graph_data())),
            PageSection("Sections", table(rows)),
        ]


def interaction_graph(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    basis: BasisResult,
    config: EdgeConfig | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> InteractionGraph:
    """Edges of every consecutive pair of sites of `basis` (LIB, IB, PCA or neuron)."""
    tokens = tokens if isinstance(tokens, Tensor) else list(tokens)
    bases = list(basis.bases.values())
    sections = {}
    for b_in, b_out in zip(bases, bases[1:]):
        se = section_edges(model, tokens, b_in, b_out, config, batch_size, progress=progress)
        sections[se.section.name] = se
    return InteractionGraph(basis, sections)
