"""Pruning a prompt graph by influence on the target, and what the kept nodes account for.

Influence (as circuit-tracer defines it for transcoder graphs): normalise every node's incoming
edges over the graph's nodes, `Â[n, m] = |A[n, m]| / Σ_m' |A[n, m']|` (the sum over the
candidate graph: candidates, rest nodes, embeddings); the influence of a node on the target is
the sum over every path from it to the target of the products of `Â`,
`u = e_target (Â + Â² + …)`. The graph is layered (edges run between consecutive sites), so the
series is one back-substitution from the target down to the embeddings: a matrix computation
with one pass over the edges, never an enumeration of paths. Rest nodes have no inputs: the
influence that reaches them (the mean's and the truncated directions' share) stops there.

The share of each node's total |input| that comes from candidates at all (`coverage`) says
what the candidate selection left out.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_degeneracy.engine.prompt_graph.edges import TARGET, CandidateGraph


def smallest_share(values: Float[Tensor, " n"], share: float) -> Int[Tensor, " m"]:
    """Indices of the fewest entries whose |values| add up to at least `share` of the total,
    largest first (empty when all are zero)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a share is between 0 and 1, got {share}")
    mag = values.abs().to(torch.float64)
    order = torch.argsort(mag, descending=True, stable=True)
    cum = mag[order].cumsum(0)
    # the total as the running sum ends, not a separate sum: otherwise rounding decides
    # whether `share=1` reaches it before the zero entries or never (then all are kept)
    total = float(cum[-1]) if cum.numel() else 0.0
    if total == 0.0 or share == 0.0:
        return torch.zeros(0, dtype=torch.long)
    n = int(torch.searchsorted(cum, torch.tensor(share * total, dtype=torch.float64))) + 1
    return order[: min(n, order.numel())]


def select_candidates(
    attributions: Float[Tensor, "p k"], share: float, max_nodes: int
) -> Int[Tensor, " c"]:
    """Flat indices (`position · k + feature`) of a site's candidate features: the fewest whose
    |attribution| adds up to `share` of the site's, at most `max_nodes`."""
    return smallest_share(attributions.flatten(), share)[:max_nodes]


def graph_input(graph: CandidateGraph) -> Float[Tensor, " n"]:
    """`Σ_m |A[n, m]|` over the graph's nodes m, per node n."""
    return torch.zeros_like(graph.input_abs).index_add_(0, graph.dst, graph.weight.abs())


def coverage(graph: CandidateGraph) -> Float[Tensor, " n"]:
    """Per node, the share of its total |input| (over every input node) that comes from the
    graph's nodes; NaN for nodes without input."""
    total = graph.input_abs
    return torch.where(total > 0, graph_input(graph) / total, torch.full_like(total, torch.nan))


def normalised_weights(graph: CandidateGraph) -> Float[Tensor, " e"]:
    """`|A[n, m]| / Σ_m' |A[n, m']|` for every edge (0 for a node without input)."""
    denom = graph_input(graph)[graph.dst]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, graph.weight.abs() / safe, torch.zeros_like(denom))


def influence(graph: CandidateGraph) -> Float[Tensor, " n"]:
    """Each node's influence on the target through all paths (the target's own entry is 0)."""
    norm = normalised_weights(graph)
    target = int(torch.nonzero(graph.kind == TARGET)[0])
    u = torch.zeros(graph.n_nodes, dtype=torch.float64)
    u[target] = 1.0
    dst_layer = graph.layer[graph.dst]
    for layer in range(int(graph.layer.max()), -1, -1):
        on = dst_layer == layer
        u.index_add_(0, graph.src[on], norm[on] * u[graph.dst[on]])
    u[target] = 0.0
    return u


def prune_nodes(
    graph: CandidateGraph, node_influence: Float[Tensor, " n"], share: float
) -> Bool[Tensor, " n"]:
    """The fewest nodes holding `share` of the total influence, and the target."""
    keep = torch.zeros(graph.n_nodes, dtype=torch.bool)
    keep[smallest_share(node_influence, share)] = True
    keep[graph.kind == TARGET] = True
    return keep


def prune_edges(
    graph: CandidateGraph, keep_nodes: Bool[Tensor, " n"], share: float
) -> Bool[Tensor, " e"]:
    """Among edges between kept nodes, the fewest into each node whose |weight| adds up to
    `share` of the node's |input| from the graph (all of them where kept inputs carry less)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a share is between 0 and 1, got {share}")
    between = keep_nodes[graph.src] & keep_nodes[graph.dst]
    idx = torch.nonzero(between)[:, 0]
    keep = torch.zeros_like(between)
    if idx.numel() == 0:
        return keep
    w = graph.weight[idx].abs()
    by_weight = torch.argsort(w, descending=True, stable=True)
    by_node = torch.argsort(graph.dst[idx][by_weight], stable=True)
    order = by_weight[by_node]
    ws, ds = w[order], graph.dst[idx][order]
    cum = ws.cumsum(0)
    _, counts = torch.unique_consecutive(ds, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    before_group = (cum[starts] - ws[starts]).repeat_interleave(counts)
    before = cum - ws - before_group  # |input| of this node's heavier kept edges
    total = graph_input(graph)[ds]
    keep[idx[order]] = before < share * total
    return keep


def completeness(
    graph: CandidateGraph,
    keep_nodes: Bool[Tensor, " n"],
    sites: list[str],
    site_totals: Float[Tensor, " n_sites"],
    rest: list[Float[Tensor, " p"]],
    value: float,
) -> list[dict[str, float | int | str]]:
    """Per site, how much of the target's value the kept features and the rest nodes account
    for (first order): `gap = value − (kept + rest)`, which splits into the attribution of the
    dropped features (`site total − kept − rest`) and what gradient × activation misses at
    that site (`value − site total`: biases downstream, nonlinearity)."""
    from tl_degeneracy.engine.prompt_graph.edges import FEATURE

    rows: list[dict[str, float | int | str]] = []
    for layer, name in enumerate(sites):
        mask = keep_nodes & (graph.kind == FEATURE) & (graph.layer == layer)
        kept = float(graph.attribution[mask].sum())
        rest_sum = float(rest[layer].sum())
        total = float(site_totals[layer])
        gap = value - kept - rest_sum
        rows.append(
            {
                "site": name,
                "kept features": int(mask.sum()),
                "kept": kept,
                "rest": rest_sum,
                "dropped features": total - kept - rest_sum,
                "first-order remainder": value - total,
                "gap": gap,
                "relative gap": gap / abs(value) if value != 0 else float("nan"),
            }
        )
    return rows
