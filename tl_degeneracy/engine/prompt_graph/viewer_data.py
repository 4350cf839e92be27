"""The plain data the prompt-graph viewer draws: kept nodes, kept edges, the prompt's tokens
and the optional per-feature details. Strings are data here; the viewer escapes them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tl_degeneracy.engine.prompt_graph.edges import EMBEDDING, FEATURE, KIND_NAMES, TARGET

if TYPE_CHECKING:
    from tl_degeneracy.engine.prompt_graph.graph import PromptGraph


def _num(x: float | Tensor) -> float:
    return float(x) if math.isfinite(float(x)) else 0.0


def detail_key(site: str, feature: int) -> str:
    """The key of a feature's details: `"site:feature"`."""
    return f"{site}:{feature}"


def viewer_data(graph: PromptGraph) -> dict[str, Any]:
    """Kept nodes (id `n<index>`), kept edges and everything the viewer shows about them."""
    c = graph.candidates
    nodes = []
    kept = graph.kept_nodes.nonzero()[:, 0].tolist()
    details = graph.details or {}
    for i in kept:
        ref = graph.node_ref(i)
        kind = int(c.kind[i])
        if kind == FEATURE:
            label = f"f{ref.feature}"
        elif kind == EMBEDDING:
            label = graph.str_tokens[ref.position]
        elif kind == TARGET:
            label = str(graph.target["name"])
        else:
            label = "rest"
        key = detail_key(ref.site, ref.feature) if kind == FEATURE else None
        nodes.append(
            {
                "id": f"n{i}",
                "kind": KIND_NAMES[kind],
                "layer": int(c.layer[i]),
                "site": ref.site,
                "pos": ref.position,
                "feature": ref.feature,
                "label": label,
                "activation": _num(c.activation[i]),
                "attribution": _num(c.attribution[i]),
                "influence": _num(graph.influence[i]),
                "details": key if key in details else None,
            }
        )
    edges = [
        {"source": f"n{s}", "target": f"n{d}", "weight": _num(w)}
        for s, d, w in zip(
            c.src[graph.kept_edges].tolist(),
            c.dst[graph.kept_edges].tolist(),
            c.weight[graph.kept_edges].tolist(),
        )
    ]
    used = {str(n["details"]) for n in nodes if n["details"] is not None}
    return {
        "tokens": list(graph.str_tokens),
        "sites": list(graph.sites),
        "target": {
            "name": str(graph.target["name"]),
            "value": _num(graph.value),
            "position": int(graph.target["position"]),
        },
        "basis": str(graph.metadata.get("basis_kind", "")),
        "nodes": nodes,
        "edges": edges,
        "details": {k: details[k] for k in sorted(used)},
    }
