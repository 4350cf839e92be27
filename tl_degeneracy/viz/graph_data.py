"""The graph widget's data from fitted results: a basis per site, edges per section, and
optionally modules, top-activating examples and logit effects per feature.

Each site lists its most important features (`SiteBasis.importance_order`: a sorted basis's
first columns, a raw site's coordinates of largest variance). Per target feature, only its
strongest inputs are listed (those before `max_share` of its input is reached, at most
`max_inputs`), so a language model's 60 sections with 576 inputs each stay a few hundred
kilobytes; the total input over all inputs travels with the feature, so the widget's shares
are shares of everything the feature receives. The study report and `InteractionGraph`'s own
view both draw this data, opening with the same settings (`GRAPH_FEATURES`, `GRAPH_SHARE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tl_degeneracy.viz.feature_views import visible_token
from tl_degeneracy.viz.graph_widget import module_label

if TYPE_CHECKING:
    from tl_degeneracy.engine.bases import SiteBasis
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.engine.edges import SectionEdges
    from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples

__all__ = [
    "GRAPH_FEATURES",
    "GRAPH_MAX_FEATURES",
    "GRAPH_SHARE",
    "result_graph_data",
    "token_labels",
]

GRAPH_FEATURES = 12
"""Features per site a graph opens with."""
GRAPH_MAX_FEATURES = 16
"""Features per site a graph's page holds (the reader can show up to this many)."""
GRAPH_SHARE = 0.8
"""Share of each feature's input its drawn edges carry when a graph opens."""


def token_labels(effects: LogitEffects, n_tokens: int = 3) -> dict[int, str]:
    """{feature: label} for each feature of `effects`, made of the tokens it promotes most,
    `·`-separated (surrounding spaces dropped, a blank token shown as ␣, newlines as ↵:
    `feature_views.visible_token`)."""

    def show(tok: str) -> str:
        return visible_token(tok).strip() or "\u2423"

    return {
        f: " · ".join(show(t) for t, _ in row[:n_tokens])
        for f, row in zip(effects.feature_ids, effects.promoted)
    }


def _section_edges(
    sec: SectionEdges, rows: Sequence[int], max_share: float, max_inputs: int
) -> tuple[list[tuple[int, int, float]], list[float], list[float]]:
    """(output, input, weight) of each output's strongest inputs, its total input and its
    input from the mean node, for the output features `rows` (rows of the section's edges)."""
    index = torch.tensor(list(rows), dtype=torch.long)
    e = sec.edges.detach().cpu()[index].to(torch.float64)
    mag = e.abs()
    total = mag.sum(1)
    vals, idx = mag.sort(dim=1, descending=True, stable=True)
    before = vals.cumsum(1) - vals
    rank = torch.arange(e.shape[1])[None, :]
    keep = (before < max_share * total[:, None]) & (rank < max_inputs) & (vals > 0)
    out = [
        (int(rows[r]), int(idx[r, c]), float(e[r, idx[r, c]]))
        for r, c in keep.nonzero().tolist()  # row-major: each output's inputs strongest first
    ]
    mean_edges = sec.mean_edges.detach().cpu()
    mean = mean_edges[index].tolist() if mean_edges.numel() else [0.0] * len(rows)
    return out, total.tolist(), mean


def _label(names: Sequence[str] | Mapping[int, str] | None, feature: int) -> str:
    """Feature `feature`'s label from a list indexed by feature or a {feature: label} dict;
    the feature's number when it has none."""
    if isinstance(names, Mapping):
        return str(names[feature]) if feature in names else str(feature)
    if names is not None and feature < len(names):
        return str(names[feature])
    return str(feature)


def result_graph_data(
    result: BasisResult | Mapping[str, SiteBasis],
    sections: Mapping[str, SectionEdges],
    max_features: int = 32,
    max_share: float = 0.99,
    max_inputs: int = 16,
    modules: Mapping[str, Sequence[int]] | None = None,
    examples: Mapping[str, TopkExamples] | None = None,
    logit_effects: Mapping[str, LogitEffects] | None = None,
    labels: Mapping[str, Sequence[str] | Mapping[int, str]] | None = None,
    n_examples: int = 3,
    n_tokens: int = 6,
) -> dict[str, Any]:
    """The widget's dict (see `graph_widget`) for every site of `result`, in forward order.

    Each site lists its `max_features` most important features, most important first
    (`SiteBasis.importance_order`). Feature `i` is column `i` of its basis (id `"site:i"`,
    labelled `i` unless `labels` says otherwise) and row `i` of the edges into its site (edges
    computed into `basis.truncated(n)` cover its first n columns). `modules`, `examples`,
    `logit_effects` and `labels` are keyed by site name (any may cover fewer features or
    sites); `modules` and `labels` are indexed by feature (`labels` may be a {feature: label}
    dict, as `token_labels` makes), and a feature's examples and logit effects are the rows
    their `row_of(feature)` names. A module label of −1 means no module (`module_label`).
    """
    bases = result if isinstance(result, Mapping) else result.bases
    layers: list[dict[str, Any]] = []
    feats: dict[str, dict[str, Any]] = {}
    shown: dict[str, list[int]] = {}
    for name, b in bases.items():
        site_feats = []
        mods = (modules or {}).get(name)
        ex = (examples or {}).get(name)
        le = (logit_effects or {}).get(name)
        names = (labels or {}).get(name)
        shown[name] = b.importance_order()[: max(0, max_features)].tolist()
        for i in shown[name]:
            f: dict[str, Any] = {
                "id": f"{name}:{i}",
                "label": _label(names, i),
                "importance": float(b.importance[i]),
            }
            if mods is not None and i < len(mods):
                f["module"] = module_label(mods[i])
            row = ex.row_of(i) if ex is not None else None
            if ex is not None and row is not None:
                f["examples"] = ex.graph_examples(row)[:n_examples]
            row = le.row_of(i) if le is not None else None
            if le is not None and row is not None:
                f["logits"] = {
                    "promoted": le.promoted[row][:n_tokens],
                    "suppressed": le.suppressed[row][:n_tokens],
                }
            site_feats.append(f)
            feats[f["id"]] = f
        layers.append({"site": name, "features": site_feats})
    edges: list[dict[str, Any]] = []
    for sec in sections.values():
        src, dst = sec.section.inp.name, sec.section.out.name
        if src not in bases or dst not in bases:
            continue
        rows = [i for i in shown[dst] if i < sec.edges.shape[0]]
        if not rows:
            continue
        kept, totals, means = _section_edges(sec, rows, max_share, max_inputs)
        for i, total, mean in zip(rows, totals, means):
            feats[f"{dst}:{i}"]["input_total"] = total
            feats[f"{dst}:{i}"]["mean_input"] = mean
        edges += [{"source": f"{src}:{j}", "target": f"{dst}:{i}", "weight": w} for i, j, w in kept]
    return {"layers": layers, "edges": edges}
