"""The interaction graph between consecutive sites (docs/concepts.md, "Interaction graph").

Both sides in basis coordinates, gradient × activation with baseline 0 (the mean), input
positions summed inside the square:

    A_{b,t,i,j} = Σ_α w_α Σ_s ∂f̂^{l+1}_{t,i}(μ + α f̂ C⁺) / ∂f̂^l_{s,j} · f̂^l_{b,s,j}
    E_{ij} = (1/(N·P_l)) Σ_b Σ_t A_{b,t,i,j}² ≥ 0

Since `f = μ + f̂ C⁺`, the gradient with respect to input features is the raw-space gradient
times `C⁺ᵀ`. The mean is the constant node: its edge uses the gradient times `μ` (not scaled by
α) and is reported apart. The section's structure computes the update (`structures`): in closed
form where it has one, else exactly by one-hot cotangents over output (t, i) or stochastically
with Rademacher signs over output positions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import SITE_JSON, Result, build_metadata, check_saved
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.checks import whole_number
from tl_degeneracy.engine.compat import usable_device
from tl_degeneracy.engine.jacobians import checkpoint_key
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.store import ActivationSource
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    iter_batches,
    run_fingerprint,
)


@dataclass(frozen=True)
class EdgeConfig:
    """How edges are computed."""

    method: Literal["exact", "stochastic"] = "exact"
    """'exact': the section's closed form where it has one (plain gradient), else one-hot
    cotangents; 'stochastic': Rademacher signs over output positions."""
    n_sources: int = 1
    """Rademacher sources over output positions per unit (stochastic)."""
    integration_points: int = 1
    """Points α of the Gauss–Legendre rule on [0, 1]; 1 means the plain gradient at α = 1."""
    chunk_size: int = 32
    seed: int = 0
    stats_device: str | None = None
    """Where the float64 sums live (the model's device by default)."""

    def __post_init__(self) -> None:
        if self.method not in ("exact", "stochastic"):
            raise ValueError(f"method must be 'exact' or 'stochastic', got {self.method!r}")
        for name in ("n_sources", "integration_points", "chunk_size"):
            object.__setattr__(self, name, whole_number(name, getattr(self, name)))
        if self.stats_device is not None:
            usable_device(self.stats_device)  # before anything is loaded or computed


def quadrature(n: int) -> tuple[list[float], list[float]]:
    """Points and weights on [0, 1]: α = 1 for n = 1, else Gauss–Legendre."""
    if n == 1:
        return [1.0], [1.0]
    x, w = np.polynomial.legendre.leggauss(n)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


@dataclass(repr=False)
class SectionEdges(BriefRepr):
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


def edges_key(basis_in: SiteBasis, basis_out: SiteBasis) -> str:
    """The checkpoint key of a section's edges. The bases' kinds are in it: LIB and PCA edges
    of one section are different passes."""
    section = Section(basis_in.site, basis_out.site)
    truncated = basis_out.kind != "raw" or basis_out.k < basis_out.d
    key = f"edges.{basis_in.kind}.{section.name}" + (f".top{basis_out.k}" if truncated else "")
    return checkpoint_key(key)


def section_edges(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    basis_in: SiteBasis,
    basis_out: SiteBasis,
    config: EdgeConfig | None = None,
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    source: ActivationSource | None = None,
    ctx: Any = None,
) -> SectionEdges:
    """Stream the edges of the section from `basis_in`'s site to `basis_out`'s site (edges
    into `basis_out`'s features only: pass `basis_out.truncated(k)` for its first k, the top k
    of a sorted basis)."""
    from tl_degeneracy.engine.distributed import DistContext, stream_sharded, sum_states
    from tl_degeneracy.engine.structures import structure_of

    config = config or EdgeConfig()
    ctx = ctx or DistContext()
    source = source or ActivationSource(model)
    section = Section(basis_in.site, basis_out.site)
    acc = structure_of(model, section).edge_accumulator(basis_in, basis_out, config, source)
    key = edges_key(basis_in, basis_out)
    batches = iter_batches(tokens, batch_size, model)

    def fingerprint() -> dict[str, Any]:
        return run_fingerprint(
            model,
            batches,
            state="edges",
            section=section.name,
            config=_result_settings(config),
            basis_in=basis_in.C,
            basis_out=basis_out.C,
            kinds=[basis_in.kind, basis_out.kind],
        )

    states = stream_sharded(
        acc,
        batches,
        f"edges {basis_in.kind} {section.name}",
        ctx,
        checkpoint,
        key,
        progress,
        fingerprint,
    )
    if ctx.active:
        acc.load_state_dict(sum_states([s for s in states if s]))
    if acc.count == 0:
        raise EmptyDataError(f"edges {section.name}: no data")
    return SectionEdges(
        section, acc.edges / acc.count, acc.mean_edges / acc.count, acc.count, acc.method()
    )


_GRAPH_KEYS = {
    "sections": [{"name": str, "section": [SITE_JSON], "count": int, "method": str}],
    "modules?": {"*": [int]},
}
"""The metadata an `InteractionGraph` is rebuilt from (`artifacts.check_saved`)."""


@dataclass(repr=False)
class InteractionGraph(Result):
    """Edges of every consecutive section of a fitted basis, with node importances."""

    basis: BasisResult
    sections: dict[str, SectionEdges]
    modules: dict[str, list[int]] = field(default_factory=dict)
    """Optional module label per feature, keyed by site name (`find_modules(graph).by_site()`;
    −1 marks a feature that took no part)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "interaction_graph"

    def __getitem__(self, name: str) -> SectionEdges:
        return self.sections[name]

    def edges_for_fraction(self, fraction: float = 0.99) -> dict[str, int]:
        """Per section, the fewest edges that carry `fraction` of its edge weight."""
        return {k: s.edges_for_fraction(fraction) for k, s in self.sections.items()}

    def to_graph_data(self, top_n: int | None = None, examples: dict | None = None) -> dict:
        """The plain dict the interaction-graph widget draws, built as the study report builds
        it (`viz.graph_data.result_graph_data`): each site's `top_n` most important features
        (default: as many as the report holds), the modules of `self.modules` (−1: none), and
        for each feature its strongest inputs with the total over every input, so the widget's
        shares are shares of everything the feature receives. `examples` maps a feature id
        (`"site:index"`) to its examples."""
        from tl_degeneracy.viz.graph_data import GRAPH_MAX_FEATURES, result_graph_data

        data = result_graph_data(
            self.basis,
            self.sections,
            max_features=GRAPH_MAX_FEATURES if top_n is None else top_n,
            modules=self.modules,
        )
        if examples:
            for layer in data["layers"]:
                for f in layer["features"]:
                    f["examples"] = examples.get(f["id"], [])
        return data

    # -- the result protocol -------------------------------------------------------------------

    def save(self, path: str | Path, basis_path: str | Path | None = None) -> Path:
        """Write the graph to the folder `path`, with its basis in `path/basis`, or, when the
        basis is saved already at `basis_path`, a reference to it (relative when possible)."""
        folder = Path(path)
        if basis_path is not None:
            ref = os.path.relpath(Path(basis_path), folder)
            self.metadata = {**self.metadata, "basis_path": ref}
        else:
            self.metadata = {k: v for k, v in self.metadata.items() if k != "basis_path"}
        super().save(folder)
        if basis_path is None:
            self.basis.save(folder / "basis")
        return folder

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> InteractionGraph:
        graph = super().load(path, model)
        ref = graph.metadata.get("basis_path")
        graph.basis = BasisResult.load(Path(path) / (ref or "basis"), model)
        return graph

    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, s in self.sections.items():
            out[f"{name}/edges"] = s.edges
            out[f"{name}/mean_edges"] = s.mean_edges
        return out

    def _metadata(self) -> dict[str, Any]:
        sections = [
            {
                "name": name,
                "section": [s.section.inp.to_json(), s.section.out.to_json()],
                "count": s.count,
                "method": s.method,
            }
            for name, s in self.sections.items()
        ]
        return {**self.metadata, "sections": sections, "modules": self.modules}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """Each section's entry, and its finite edges (k_out×k_in) and mean edges (k_out)."""

        def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
            out: dict[str, tuple[int | str, ...]] = {}
            for entry in meta["sections"]:
                name = entry["name"]
                out[f"{name}/edges"] = (f"{name} out", f"{name} in")
                out[f"{name}/mean_edges"] = (f"{name} out",)
            return out

        check_saved(folder, cls.ARTIFACT, meta, tensors, _GRAPH_KEYS, shapes, finite=True)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> InteractionGraph:
        sections = {}
        for entry in meta["sections"]:
            name = entry["name"]
            inp, out = (Site.from_json(s) for s in entry["section"])
            sections[name] = SectionEdges(
                Section(inp, out),
                tensors[f"{name}/edges"],
                tensors[f"{name}/mean_edges"],
                entry["count"],
                entry["method"],
            )
        empty = BasisResult({}, {})  # replaced by `load` with the saved basis
        return cls(empty, sections, dict(meta.get("modules", {})), meta)

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.graph_data import GRAPH_FEATURES, GRAPH_SHARE
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
            PageSection(
                "Interaction graph",
                graph_widget_html(self.to_graph_data(), GRAPH_FEATURES, GRAPH_SHARE),
            ),
            PageSection("Sections", table(rows)),
        ]


def interaction_graph(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    basis: BasisResult,
    config: EdgeConfig | None = None,
    batch_size: int = 256,
    progress: bool = True,
    top_outputs: int | None = None,
    checkpoint: Checkpointing | None = None,
    source: ActivationSource | None = None,
    ctx: Any = None,
) -> InteractionGraph:
    """Edges of every consecutive pair of sites of `basis` (LIB, IB, PCA or neuron); with
    `top_outputs`, only edges into each section's first `top_outputs` output features
    (`SiteBasis.truncated`: the most important ones, except at a raw site)."""
    tokens = tokens if isinstance(tokens, Tensor) else list(tokens)
    bases = list(basis.bases.values())
    sections = {}
    for b_in, b_out in zip(bases, bases[1:]):
        if top_outputs is not None:
            b_out = b_out.truncated(top_outputs)
        se = section_edges(
            model, tokens, b_in, b_out, config, batch_size, checkpoint, progress, source, ctx
        )
        sections[se.section.name] = se
    meta = build_metadata(
        model, basis.sites, kind=basis.kind, edges=config or EdgeConfig(), top_outputs=top_outputs
    )
    return InteractionGraph(basis, sections, metadata=meta)


def _result_settings(config: Any) -> dict[str, Any]:
    """The fields of a config that change a checkpointed pass's result (not where or in what
    chunks it is computed)."""
    return {k: v for k, v in asdict(config).items() if k not in ("stats_device", "chunk_size")}
