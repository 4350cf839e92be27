"""Community detection on a weighted feature network, the partition it returns, and how to
compare partitions (docs/modules.md).

Model-agnostic: the network is a `networkx.Graph` whose nodes are features `(site, index)`
and whose edge attribute `weight` is non-negative. `tl_degeneracy.engine.modularity` builds
that network from an interaction graph and calls `partition`; this module knows nothing about
sites, bases or models.

- `partition`: Louvain (networkx) or Leiden (`leidenalg` on `igraph`, the optional `modules`
  extra), at a resolution, best Newman Q over a few seeds.
- `Modules`: the partition, Newman's Q, the edge mass inside and around each module, and
  `describe` (each module's features with labels a caller supplies, e.g. dominant Fourier
  frequencies or top tokens).
- `adjusted_rand_index`, `same_partition`, `refines`: compare two labellings of the same nodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import torch

from tl_degeneracy.engine.artifacts import Rendered
from tl_degeneracy.engine.brief_repr import BriefRepr

Node = tuple[str, int]
"""A feature: (site name, feature index)."""

Algorithm = Literal["louvain", "leiden"]
ALGORITHMS: tuple[str, ...] = ("louvain", "leiden")
UNASSIGNED = -1
"""Module label of a feature that took no part in module finding (see `Modules.by_site`)."""


def leiden_available() -> bool:
    """Whether Leiden can run here (`pip install "tl_degeneracy[modules]"`)."""
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        return False
    return True


def newman_q(graph: nx.Graph, communities: Sequence[set[Node]]) -> float:
    """Newman's weighted modularity Q (resolution 1) of a partition; 0 for a graph without
    edges."""
    if graph.number_of_edges() == 0 or graph.size(weight="weight") <= 0:
        return 0.0
    q = nx.community.modularity(graph, communities, weight="weight")
    return 0.0 if math.isnan(q) else float(q)


def _leiden(graph: nx.Graph, resolution: float, seed: int) -> list[set[Node]]:
    if not leiden_available():
        raise ImportError(
            "algorithm='leiden' needs leidenalg and igraph: pip install 'tl_degeneracy[modules]' "
            "(or use algorithm='louvain')"
        )
    import igraph as ig
    import leidenalg as la

    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ig_graph = ig.Graph(n=len(nodes), edges=[(index[u], index[v]) for u, v in graph.edges])
    ig_graph.es["weight"] = [float(d["weight"]) for _, _, d in graph.edges(data=True)]
    found = la.find_partition(
        ig_graph,
        la.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        seed=seed,
    )
    return [{nodes[i] for i in community} for community in found]


def partition(
    graph: nx.Graph,
    algorithm: Algorithm = "louvain",
    resolution: float = 1.0,
    seed: int = 0,
    n_seeds: int = 1,
) -> list[set[Node]]:
    """Communities of `graph` (every node in exactly one), the one of highest Newman Q over
    seeds `seed … seed + n_seeds − 1`. Isolated nodes come back as singletons."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if graph.number_of_edges() == 0:
        return [{n} for n in graph.nodes]
    best: tuple[float, list[set[Node]]] | None = None
    for s in range(seed, seed + max(1, n_seeds)):
        if algorithm == "leiden":
            found = _leiden(graph, resolution, s)
        else:
            found = nx.community.louvain_communities(
                graph, weight="weight", resolution=resolution, seed=s
            )
        q = newman_q(graph, found)
        if best is None or q > best[0]:
            best = (q, [set(c) for c in found])
    assert best is not None
    return best[1]


@dataclass
class ModuleSummary:
    """One module where people look: its features, their labels and its edge mass."""

    module: int
    features: list[Node]
    labels: list[str]
    """A label per feature (e.g. its dominant frequency or top tokens); empty strings when
    no labeller was given."""
    edge_share: float
    """Share of the total edge mass E (among the features that took part) inside the module."""
    internal_fraction: float
    """Of the edge mass touching the module, the fraction that stays inside it."""

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "features": [[s, i] for s, i in self.features],
            "labels": self.labels,
            "edge_share": self.edge_share,
            "internal_fraction": self.internal_fraction,
        }


Labeller = Callable[[Node], str] | Mapping[Node, str]


@dataclass(repr=False)
class Modules(BriefRepr, Rendered):
    """A partition of features into modules, numbered by edge mass (module 0 holds the most),
    with Newman's Q of the network it was found on and the edge mass of each module."""

    assignment: dict[Node, int]
    modularity_q: float
    setting: str = ""
    """The setting that found it, in words (see `ModuleConfig.describe`)."""
    internal_mass: dict[int, float] = field(default_factory=dict)
    """Σ E over edges with both ends in the module (raw edges, not the clustering weights)."""
    touching_mass: dict[int, float] = field(default_factory=dict)
    """Σ E over edges with at least one end in the module."""
    total_mass: float = 0.0
    """Σ E over edges between features that took part."""
    site_sizes: dict[str, int] = field(default_factory=dict)
    """Features per site (so that `by_site` can mark features that took no part)."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_modules(self) -> int:
        return len(set(self.assignment.values()))

    def members(self, module: int) -> list[Node]:
        """Features of one module, in site order then feature order."""
        sites = list(self.site_sizes) or sorted({s for s, _ in self.assignment})
        order = {s: i for i, s in enumerate(sites)}
        nodes = [n for n, m in self.assignment.items() if m == module]
        return sorted(nodes, key=lambda n: (order.get(n[0], len(order)), n[1]))

    def by_site(self) -> dict[str, list[int]]:
        """Module label of every feature, per site, in feature order; `UNASSIGNED` (−1) for
        features that took no part (the form `InteractionGraph.modules` takes)."""
        sizes = dict(self.site_sizes)
        for s, i in self.assignment:
            sizes[s] = max(sizes.get(s, 0), i + 1)
        out = {s: [UNASSIGNED] * n for s, n in sizes.items()}
        for (s, i), m in self.assignment.items():
            out[s][i] = m
        return out

    def describe(
        self,
        labels: Labeller | None = None,
        min_size: int = 1,
        max_modules: int | None = None,
    ) -> list[ModuleSummary]:
        """Each module (largest edge mass first) with its features, their labels and its share
        of the edge mass. `labels`: a callable or a mapping from feature to text (the engine
        knows nothing of frequencies or tokens: the caller does)."""

        def label(node: Node) -> str:
            if labels is None:
                return ""
            if callable(labels):
                return str(labels(node))
            return str(labels.get(node, ""))

        out = []
        for m in sorted(set(self.assignment.values())):
            feats = self.members(m)
            if len(feats) < min_size:
                continue
            inside = self.internal_mass.get(m, 0.0)
            touching = self.touching_mass.get(m, 0.0)
            out.append(
                ModuleSummary(
                    module=m,
                    features=feats,
                    labels=[label(n) for n in feats],
                    edge_share=inside / self.total_mass if self.total_mass > 0 else 0.0,
                    internal_fraction=inside / touching if touching > 0 else 0.0,
                )
            )
            if max_modules is not None and len(out) >= max_modules:
                break
        return out

    def summary_rows(
        self, labels: Labeller | None = None, min_size: int = 2, max_modules: int | None = 12
    ) -> list[dict[str, str]]:
        """`describe` as table rows of strings (module, size, share of edge mass, features)."""
        rows = []
        for s in self.describe(labels, min_size, max_modules):
            feats = [
                f"{site}:{i}" + (f" ({lab})" if lab else "")
                for (site, i), lab in zip(s.features, s.labels)
            ]
            rows.append(
                {
                    "module": str(s.module),
                    "features": str(len(s.features)),
                    "share of edge mass": f"{s.edge_share:.3f}",
                    "kept inside": f"{s.internal_fraction:.2f}",
                    "members": ", ".join(feats),
                }
            )
        return rows

    def to_json(self, assignment: bool = False) -> dict[str, Any]:
        """Counts, Q, the setting and each module's edge mass; with `assignment`, every
        feature's module too (what `load` reads)."""
        out: dict[str, Any] = {
            "n_modules": self.n_modules,
            "modularity_q": self.modularity_q,
            "setting": self.setting,
            "config": self.config,
            "total_mass": self.total_mass,
            "internal_mass": {str(k): v for k, v in self.internal_mass.items()},
            "touching_mass": {str(k): v for k, v in self.touching_mass.items()},
            "site_sizes": self.site_sizes,
        }
        if assignment:
            out["assignment"] = [[s, i, m] for (s, i), m in self.assignment.items()]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the partition as JSON (nothing else is needed to restore it)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(assignment=True), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Modules:
        data = json.loads(Path(path).read_text())
        if "assignment" not in data:
            raise ValueError(f"{path} holds no assignment: save it with Modules.save")
        return cls(
            assignment={(s, int(i)): int(m) for s, i, m in data["assignment"]},
            modularity_q=float(data["modularity_q"]),
            setting=data.get("setting", ""),
            internal_mass={int(k): v for k, v in data.get("internal_mass", {}).items()},
            touching_mass={int(k): v for k, v in data.get("touching_mass", {}).items()},
            total_mass=float(data.get("total_mass", 0.0)),
            site_sizes={k: int(v) for k, v in data.get("site_sizes", {}).items()},
            config=data.get("config", {}),
        )

    def _html_title(self) -> str:
        return f"Modules ({self.n_modules}, Q = {self.modularity_q:.3f})"

    def _html_sections(self, labels: Labeller | None = None) -> list:
        from tl_degeneracy.viz.html import PageSection, table, text

        rows = self.summary_rows(labels)
        body = table(rows) if rows else text("no module with more than one feature", "p")
        return [PageSection(self._html_title(), text(self.setting, "p") + body)]

    def to_html(self, labels: Labeller | None = None) -> str:
        """The module table as an HTML fragment (every label escaped)."""
        from tl_degeneracy.viz.html import render_fragment

        return render_fragment(self._html_sections(labels))


def number_by_mass(
    communities: Sequence[set[Node]], edges: Sequence[tuple[Node, Node, float]]
) -> tuple[dict[Node, int], dict[int, float], dict[int, float], float]:
    """Module ids 0, 1, … in order of the edge mass inside each community (ties: larger
    first), and the mass inside, touching, and in total, from raw edges `(u, v, E)`."""
    label = {n: c for c, comm in enumerate(communities) for n in comm}
    inside = [0.0] * len(communities)
    touching = [0.0] * len(communities)
    total = 0.0
    for u, v, e in edges:
        total += e
        cu, cv = label[u], label[v]
        touching[cu] += e
        if cu == cv:
            inside[cu] += e
        else:
            touching[cv] += e
    order = sorted(
        range(len(communities)),
        key=lambda c: (-inside[c], -len(communities[c]), min(communities[c], default=("", 0))),
    )
    new = {old: rank for rank, old in enumerate(order)}
    assignment = {n: new[c] for n, c in label.items()}
    return (
        assignment,
        {new[c]: inside[c] for c in range(len(communities))},
        {new[c]: touching[c] for c in range(len(communities))},
        total,
    )


# -- comparing partitions ------------------------------------------------------------------


def refines(fine: Mapping[Node, int], coarse: Mapping[Node, int]) -> bool:
    """Whether every class of `fine` lies inside one class of `coarse`."""
    seen: dict[int, int] = {}
    return all(seen.setdefault(label, coarse[node]) == coarse[node] for node, label in fine.items())


def same_partition(a: Mapping[Node, int], b: Mapping[Node, int]) -> bool:
    """Whether two labellings of the same nodes give the same partition (up to relabelling)."""
    if set(a) != set(b):
        return False
    forward: dict[int, int] = {}
    backward: dict[int, int] = {}
    for node, la in a.items():
        lb = b[node]
        if forward.setdefault(la, lb) != lb or backward.setdefault(lb, la) != la:
            return False
    return True


def adjusted_rand_index(a: Mapping[Node, int], b: Mapping[Node, int]) -> float:
    """Adjusted Rand index of two labellings of the same nodes: 1 for the same partition,
    about 0 for unrelated ones (Hubert & Arabie 1985)."""
    nodes = sorted(a, key=str)
    if set(nodes) != set(b):
        raise ValueError("the two labellings cover different nodes")
    if len(nodes) < 2:
        return 1.0
    la = torch.tensor([a[n] for n in nodes])
    lb = torch.tensor([b[n] for n in nodes])
    _, ia = torch.unique(la, return_inverse=True)
    _, ib = torch.unique(lb, return_inverse=True)
    table = torch.zeros(int(ia.max()) + 1, int(ib.max()) + 1, dtype=torch.float64)
    table.index_put_((ia, ib), torch.ones(len(nodes), dtype=torch.float64), accumulate=True)

    def pairs(x: torch.Tensor) -> float:
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / math.comb(len(nodes), 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def with_singletons(assignment: Mapping[Node, int], nodes: Sequence[Node]) -> dict[Node, int]:
    """`assignment` on `nodes`, each node it does not cover (or marks `UNASSIGNED`) in a
    module of its own: how a feature that took no part counts when partitions are compared."""
    out: dict[Node, int] = {}
    fresh = max([m for m in assignment.values()] + [0]) + 1
    for n in nodes:
        m = assignment.get(n, UNASSIGNED)
        if m == UNASSIGNED:
            m, fresh = fresh, fresh + 1
        out[n] = m
    return out
