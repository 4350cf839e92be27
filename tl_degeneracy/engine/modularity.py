"""Modules of an interaction graph (docs/modules.md): which features take part, how the edges
`E` are weighted, and `find_modules`, which clusters the resulting network
(`tl_degeneracy.engine.module_finding`) and reports Newman's Q.

The default (`ModuleConfig()`) was chosen by measurement on ground truths (planted modular
networks, and the Fourier frequencies of modular addition; `benchmarks/modules_sweep.py`):
edge weights `√E` with each feature's incoming weights scaled to sum 1, the top 40 features per
site, the final site (the model's outputs) left out, Louvain at resolution 1. The reference
implementation's setting (weights `log(E/ε)` clipped at 0, ε = 10⁻³ × the section's largest
edge, every feature, Louvain) is `REFERENCE_MODULES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy.engine.module_finding import (
    ALGORITHMS,
    Algorithm,
    Modules,
    Node,
    newman_q,
    number_by_mass,
    partition,
)

if TYPE_CHECKING:
    from tl_degeneracy.engine.edges import InteractionGraph

__all__ = [
    "REFERENCE_MODULES",
    "ModuleConfig",
    "Modules",
    "Node",
    "edge_weights",
    "find_modules",
    "interaction_network",
    "select_features",
]

NUMERICAL_ZERO = 1e-12
"""Edges below this fraction of their section's largest edge are round-off, not interactions:
they are dropped before weighting (per-node normalisation would otherwise blow them up)."""

Weighting = Literal["log", "sqrt", "linear"]
Normalisation = Literal["none", "inputs", "symmetric"]
Sections = Mapping[tuple[str, str], Float[Tensor, "k_out k_in"]]
"""Edges per section, keyed by (input site, output site), in forward order."""


@dataclass(frozen=True)
class ModuleConfig:
    """How modules are found. The defaults are the measured best on the ground truths."""

    weighting: Weighting = "sqrt"
    """Edge weight from `E`: `linear` (E), `sqrt` (√E) or `log` (`log(E/ε)` clipped at 0)."""
    normalise: Normalisation = "inputs"
    """After weighting, per section: `inputs` scales each output feature's incoming weights to
    sum 1 (every feature's inputs count alike, whatever its importance), `symmetric` divides by
    √(row sum · column sum), `none` keeps them."""
    relative_epsilon: float = 1e-3
    """ε of the `log` weighting as a fraction of the section's largest edge."""
    top_k: int | Mapping[str, int] | None = 40
    """Features per site that take part, most important first (one number, or one per site;
    None: every feature)."""
    edge_share: float | None = None
    """Instead of `top_k`: per site, the fewest features whose edges carry this share of the
    site's edge mass."""
    include_final: bool = False
    """Whether the final site (the model's outputs, e.g. logits) takes part. Off by default: an
    output reads every computation that votes for it (in modular addition every logit reads every
    frequency), so it joins modules that are apart. Always on for a single-section graph."""
    resolution: float = 1.0
    algorithm: Algorithm = "louvain"
    """`louvain` (networkx) or `leiden` (needs the `modules` extra: leidenalg, igraph)."""
    seed: int = 0
    n_seeds: int = 1
    """Seeds tried (`seed`, `seed + 1`, …); the partition of highest Q is kept."""

    def __post_init__(self) -> None:
        if self.weighting not in ("log", "sqrt", "linear"):
            raise ValueError(f"weighting must be log, sqrt or linear, got {self.weighting!r}")
        if self.normalise not in ("none", "inputs", "symmetric"):
            raise ValueError(f"normalise must be none, inputs or symmetric, got {self.normalise!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.edge_share is not None and not 0 < self.edge_share <= 1:
            raise ValueError(f"edge_share must be in (0, 1], got {self.edge_share}")
        if self.edge_share is not None and self.top_k is not None:
            raise ValueError("give top_k or edge_share, not both (set top_k=None)")
        if not self.relative_epsilon > 0:
            raise ValueError(f"relative_epsilon must be positive, got {self.relative_epsilon}")
        if not self.resolution > 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        ks = self.top_k.values() if isinstance(self.top_k, Mapping) else [self.top_k]
        for k in ks:
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(
                    f"top_k must be a positive whole number of features per site (or None for "
                    f"every feature), got {k!r}"
                )
        if isinstance(self.n_seeds, bool) or not isinstance(self.n_seeds, int) or self.n_seeds < 1:
            raise ValueError(f"n_seeds must be a whole number of at least 1, got {self.n_seeds!r}")

    def describe(self) -> str:
        """The setting in words, for reports."""
        weight = {
            "log": f"log(E/ε) clipped at 0, ε = {self.relative_epsilon:g} × largest edge",
            "sqrt": "√E",
            "linear": "E",
        }[self.weighting]
        norm = {
            "none": "",
            "inputs": ", each feature's inputs scaled to sum 1",
            "symmetric": ", divided by √(row sum · column sum)",
        }[self.normalise]
        if self.edge_share is not None:
            nodes = f"features carrying {self.edge_share:g} of each site's edge mass"
        elif self.top_k is None:
            nodes = "every feature"
        elif isinstance(self.top_k, int):
            nodes = f"top {self.top_k} features per site"
        else:
            nodes = "top " + ", ".join(f"{v} at {k}" for k, v in self.top_k.items())
        final = "" if self.include_final else ", final site left out"
        return (
            f"{self.algorithm.capitalize()} (resolution {self.resolution:g}) on weights {weight}"
            f"{norm}; {nodes}{final}"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.top_k, Mapping):
            out["top_k"] = dict(self.top_k)
        return out


REFERENCE_MODULES = ModuleConfig(
    weighting="log", normalise="none", top_k=None, include_final=True, n_seeds=1
)
"""The reference implementation's setting: Louvain on `log(E/ε)` clipped at 0 (ε = 10⁻³ × the
section's largest edge) over every feature of every site."""


def edge_weights(
    edges: Float[Tensor, "k_out k_in"], config: ModuleConfig = ModuleConfig()
) -> Float[Tensor, "k_out k_in"]:
    """Clustering weights of one section's edges (float64, ≥ 0; 0 means no edge)."""
    e = edges.detach().to(torch.float64)
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("edges must be finite and non-negative (E of an interaction graph)")
    if e.numel() == 0 or float(e.max()) <= 0:
        return torch.zeros_like(e)
    e = torch.where(e > NUMERICAL_ZERO * float(e.max()), e, 0.0)
    if config.weighting == "log":
        eps = config.relative_epsilon * float(e.max())
        w = torch.log(e.clamp_min(torch.finfo(e.dtype).tiny) / eps).clamp(min=0)
    elif config.weighting == "sqrt":
        w = e.sqrt()
    else:
        w = e
    rows = w.sum(1, keepdim=True)
    cols = w.sum(0, keepdim=True)
    if config.normalise == "inputs":
        w = torch.where(rows > 0, w / rows.clamp_min(1e-300), 0.0)
    elif config.normalise == "symmetric":
        scale = (rows * cols).sqrt()
        w = torch.where(scale > 0, w / scale.clamp_min(1e-300), 0.0)
    return w


def _site_order(sections: Sections) -> list[str]:
    order: list[str] = []
    for src, dst in sections:
        for s in (src, dst):
            if s not in order:
                order.append(s)
    return order


def _final_sites(sections: Sections) -> set[str]:
    """Sites that are never the input of a section (the outputs)."""
    sources = {src for src, _ in sections}
    return {dst for _, dst in sections if dst not in sources}


def select_features(
    sections: Sections,
    config: ModuleConfig = ModuleConfig(),
    importance: Mapping[str, Float[Tensor, " k"]] | None = None,
) -> dict[str, Int[Tensor, " n"]]:
    """Indices of the features that take part, per site (sorted). `importance` orders a
    site's features for `top_k` (default: index order, as every fitted basis is sorted)."""
    sizes: dict[str, int] = {}
    for (src, dst), e in sections.items():
        sizes[src], sizes[dst] = e.shape[1], e.shape[0]
    sites = _site_order(sections)
    if not config.include_final and len(sections) > 1:
        sites = [s for s in sites if s not in _final_sites(sections)]
    chosen: dict[str, Tensor] = {}
    if config.edge_share is not None:
        mass = {s: torch.zeros(sizes[s], dtype=torch.float64) for s in sites}
        for (src, dst), e in sections.items():
            if src in mass and dst in mass:
                e = e.detach().to(torch.float64)
                mass[src] += e.sum(0)
                mass[dst] += e.sum(1)
        for s in sites:
            values, order = mass[s].sort(descending=True)
            total = float(values.sum())
            if total <= 0:
                chosen[s] = order[:0]
                continue
            n = int((values.cumsum(0) < config.edge_share * total).sum()) + 1
            chosen[s] = order[: min(n, sizes[s])]
    else:
        for s in sites:
            k = config.top_k if not isinstance(config.top_k, Mapping) else config.top_k.get(s)
            k = sizes[s] if k is None else min(int(k), sizes[s])
            if importance is not None and s in importance:
                # edges may cover only the first features (e.g. edges into the top outputs)
                values = importance[s].detach().to(torch.float64)[: sizes[s]]
                order = values.argsort(descending=True)
            else:
                order = torch.arange(sizes[s])
            chosen[s] = order[:k]
    return {s: idx.sort().values for s, idx in chosen.items()}


def interaction_network(
    sections: Sections,
    config: ModuleConfig | None = None,
    importance: Mapping[str, Float[Tensor, " k"]] | None = None,
    **overrides: Any,
) -> nx.Graph:
    """Undirected weighted graph of the features that take part; edge attribute `weight` is the
    clustering weight (`edge_weights`) and `E` the raw edge. Keyword arguments override fields
    of `config` (e.g. `relative_epsilon=1e-3`)."""
    config = replace(config or ModuleConfig(), **overrides)
    chosen = select_features(sections, config, importance)
    graph = nx.Graph()
    for site, idx in chosen.items():
        graph.add_nodes_from((site, int(i)) for i in idx)
    for (src, dst), e in sections.items():
        if src not in chosen or dst not in chosen:
            continue
        rows, cols = chosen[dst], chosen[src]
        raw = e.detach().to(torch.float64)[rows][:, cols]
        w = edge_weights(raw, config)
        r, c = w.nonzero(as_tuple=True)
        graph.add_edges_from(
            (
                (src, int(cols[j])),
                (dst, int(rows[i])),
                {"weight": float(w[i, j]), "E": float(raw[i, j])},
            )
            for i, j in zip(r.tolist(), c.tolist())
        )
    return graph


def _sections_of(
    graph: InteractionGraph | Sections,
) -> tuple[Sections, dict[str, Tensor] | None, dict[str, int]]:
    """(edges per section, importance per site, features per site) of either input form."""
    if isinstance(graph, Mapping):
        return _plain_sections(graph)
    sections = {(s.section.inp.name, s.section.out.name): s.edges for s in graph.sections.values()}
    importance = {name: b.importance for name, b in graph.basis.bases.items()}
    sizes = {name: b.k for name, b in graph.basis.bases.items()}
    return sections, importance, sizes


def _plain_sections(
    graph: Mapping[Any, Any],
) -> tuple[Sections, None, dict[str, int]]:
    """A plain dict `{(input site, output site): E [out, in]}` as float64 tensors (NumPy arrays
    and nested lists too), each site's number of features checked to agree between the
    sections it is in."""
    sections: dict[tuple[str, str], Tensor] = {}
    sizes: dict[str, int] = {}
    seen: dict[str, str] = {}
    for key, value in graph.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(
                f"edges are keyed by (input site, output site), got the key {key!r}: pass "
                "{(input site, output site): E} with E of shape [output features, input features]"
            )
        e = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if e.ndim != 2:
            raise ValueError(
                f"the edges of section {key} must be a matrix [output features, input features], "
                f"got shape {list(e.shape)}"
            )
        if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
            raise ValueError(
                f"the edges of section {key} must be finite and non-negative (E is a mean of "
                "squared attributions), got NaN, Inf or negative entries"
            )
        src, dst = key
        for site, n, role in ((src, e.shape[1], "input"), (dst, e.shape[0], "output")):
            where = f"the {role} of section {key} ({'columns' if role == 'input' else 'rows'} of E)"
            if site in sizes and sizes[site] != n:
                raise ValueError(
                    f"site {site!r} has {sizes[site]} features as {seen[site]} but {n} as "
                    f"{where}: each E is [output features, input features], and a site has the "
                    "same features in every section"
                )
            sizes[site], seen[site] = n, where
        sections[(src, dst)] = e
    return sections, None, sizes


def _raw_edges(sections: Sections, network: nx.Graph) -> list[tuple[Node, Node, float]]:
    """Every non-zero raw edge `E` between features of the network (also those whose
    clustering weight is 0), for the edge mass of modules."""
    chosen: dict[str, list[int]] = {}
    for site, i in network.nodes:
        chosen.setdefault(site, []).append(i)
    out = []
    for (src, dst), e in sections.items():
        if src not in chosen or dst not in chosen:
            continue
        rows, cols = torch.tensor(sorted(chosen[dst])), torch.tensor(sorted(chosen[src]))
        raw = e.detach().to(torch.float64)[rows][:, cols]
        r, c = raw.nonzero(as_tuple=True)
        out += [
            ((src, int(cols[j])), (dst, int(rows[i])), float(raw[i, j]))
            for i, j in zip(r.tolist(), c.tolist())
        ]
    return out


def find_modules(
    graph: InteractionGraph | Sections,
    config: ModuleConfig | None = None,
    **overrides: Any,
) -> Modules:
    """Modules of an interaction graph (or of edges per section) and Newman's Q of the
    weighted network they were found on. Keyword arguments override fields of `config`
    (`find_modules(graph, top_k=20)`); `find_modules(graph, REFERENCE_MODULES)` is the
    reference's setting. Features that take no part are left out of `assignment`
    (`Modules.by_site` marks them −1)."""
    config = replace(config or ModuleConfig(), **overrides)
    sections, importance, sizes = _sections_of(graph)
    if not sections:
        raise ValueError("no sections: an interaction graph needs at least two sites")
    network = interaction_network(sections, config, importance)
    communities = partition(
        network, config.algorithm, config.resolution, config.seed, config.n_seeds
    )
    assignment, inside, touching, total = number_by_mass(communities, _raw_edges(sections, network))
    return Modules(
        assignment=assignment,
        modularity_q=newman_q(network, communities),
        setting=config.describe(),
        internal_mass=inside,
        touching_mass=touching,
        total_mass=total,
        site_sizes=sizes,
        config=config.to_json(),
    )
