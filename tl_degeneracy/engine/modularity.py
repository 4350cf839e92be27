"""Modules of an interaction graph (docs/degeneracy.md): Louvain clustering (networkx) of the
graph whose edge weights are `log(E/ε)` clipped at 0, and Newman's modularity Q.

ε sets which interactions count at all: an edge below ε has weight 0. By default ε is a
fixed fraction of the largest edge of its section, so sections on different scales are
treated alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx
import torch
from jaxtyping import Float
from torch import Tensor

Node = tuple[str, int]
"""A feature: (site name, feature index)."""


@dataclass
class Modules:
    """A partition of features into modules and its modularity."""

    assignment: dict[Node, int]
    modularity_q: float
    epsilon: str

    @property
    def n_modules(self) -> int:
        return len(set(self.assignment.values()))

    def by_site(self) -> dict[str, list[int]]:
        """Module label of each feature, per site, in feature order."""
        out: dict[str, dict[int, int]] = {}
        for (site, i), m in self.assignment.items():
            out.setdefault(site, {})[i] = m
        return {s: [d[i] for i in sorted(d)] for s, d in out.items()}

    def to_json(self) -> dict:
        return {
            "n_modules": self.n_modules,
            "modularity_q": self.modularity_q,
            "epsilon": self.epsilon,
        }


def interaction_network(
    sections: Mapping[tuple[str, str], Float[Tensor, "k_out k_in"]],
    relative_epsilon: float = 1e-3,
    top_k: Mapping[str, int] | None = None,
) -> nx.Graph:
    """Undirected weighted graph of features; edge weight `max(0, log(E / ε))` with
    ε = `relative_epsilon` · the section's largest edge. `top_k` limits features per site."""
    graph = nx.Graph()
    for (src, dst), e in sections.items():
        e = e.to(torch.float64)
        k_out = e.shape[0] if top_k is None else min(e.shape[0], top_k.get(dst, e.shape[0]))
        k_in = e.shape[1] if top_k is None else min(e.shape[1], top_k.get(src, e.shape[1]))
        e = e[:k_out, :k_in]
        eps = relative_epsilon * float(e.max()) if e.numel() else 0.0
        graph.add_nodes_from([(src, j) for j in range(k_in)])
        graph.add_nodes_from([(dst, i) for i in range(k_out)])
        if eps <= 0:
            continue
        weights = torch.log(e / eps).clamp(min=0)
        rows, cols = weights.nonzero(as_tuple=True)
        graph.add_weighted_edges_from(
            ((src, int(j)), (dst, int(i)), float(weights[i, j])) for i, j in zip(rows, cols)
        )
    return graph


def find_modules(
    sections: Mapping[tuple[str, str], Float[Tensor, "k_out k_in"]],
    relative_epsilon: float = 1e-3,
    top_k: Mapping[str, int] | None = None,
    resolution: float = 1.0,
    seed: int = 0,
) -> Modules:
    """Louvain modules of the interaction graph and Newman's Q (weighted)."""
    graph = interaction_network(sections, relative_epsilon, top_k)
    if graph.number_of_edges() == 0:
        return Modules({n: i for i, n in enumerate(graph.nodes)}, 0.0, str(relative_epsilon))
    communities = nx.community.louvain_communities(
        graph, weight="weight", resolution=resolution, seed=seed
    )
    q = nx.community.modularity(graph, communities, weight="weight", resolution=resolution)
    ordered = sorted(communities, key=lambda c: (-len(c), min(c)))
    assignment = {node: m for m, comm in enumerate(ordered) for node in comm}
    if math.isnan(q):  # pragma: no cover - networkx returns nan only for empty graphs
        q = 0.0
    return Modules(assignment, float(q), f"{relative_epsilon} x largest edge")
