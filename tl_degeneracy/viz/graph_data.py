"""The graph widget's data from fitted results: a basis per site, edges per section, and
optionally modules, top-activating examples and logit effects per feature.

Per target feature, only its strongest inputs are listed (those before `max_share` of its input
is reached, at most `max_inputs`), so a language model's 60 sections with 576 inputs each stay a
few hundred kilobytes; the total input over all inputs travels with the feature, so the widget's
shares are shares of everything the feature receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tl_degeneracy.engine.bases import SiteBasis
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.engine.edges import SectionEdges
    from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples

__all__ = ["result_graph_data", "token_labels"]


def token_labels(effects: LogitEffects, n_tokens: int = 3) -> list[str]:
    """A label per feature made of the tokens it promotes most, `·`-separated (surrounding
    spaces dropped, a blank token shown as ␣, newlines as ↵)."""

    def show(tok: str) -> str:
        return tok.replace("\n", "\u21b5").replace("\t", "\u2192").strip() or "\u2423"

    return [" · ".join(show(t) for t, _ in row[:n_tokens]) for row in effects.promoted]


def _section_edges(
    sec: SectionEdges, n_out: int, max_share: float, max_inputs: int
) -> tuple[list[tuple[int, int, float]], list[float], list[float]]:
    """(output, input, weight) of each output's strongest inputs, its total input and its
    input from the mean node, for the first `n_out` outputs."""
    e = sec.edges[:n_out].to(torch.float64)
    mag = e.abs()
    total = mag.sum(1)
    vals, idx = mag.sort(dim=1, descending=True, stable=True)
    before = vals.cumsum(1) - vals
    rank = torch.arange(e.shape[1])[None, :]
    keep = (before < max_share * total[:, None]) & (rank < max_inputs) & (vals > 0)
    out = [
        (i, int(idx[i, r]), float(e[i, idx[i, r]]))
        for i, r in keep.nonzero().tolist()  # row-major: each output's inputs strongest first
    ]
    mean = sec.mean_edges[:n_out].tolist() if sec.mean_edges.numel() else [0.0] * len(total)
    return out, total.tolist(), mean


def result_graph_data(
    result: BasisResult | Mapping[str, SiteBasis],
    sections: Mapping[str, SectionEdges],
    max_features: int = 32,
    max_share: float = 0.99,
    max_inputs: int = 16,
    modules: Mapping[str, Sequence[int]] | None = None,
    examples: Mapping[str, TopkExamples] | None = None,
    logit_effects: Mapping[str, LogitEffects] | None = None,
    labels: Mapping[str, Sequence[str]] | None = None,
    n_examples: int = 3,
    n_tokens: int = 6,
) -> dict[str, Any]:
    """The widget's dict (see `graph_widget`) for every site of `result`, in forward order.

    Feature `i` of a site is column `i` of its basis; `modules`, `examples`, `logit_effects`
    and `labels` are keyed by site name and indexed by feature (any may cover fewer features
    or sites). Features are labelled by their index unless `labels` says otherwise.
    """
    bases = result if isinstance(result, Mapping) else result.bases
    layers: list[dict[str, Any]] = []
    feats: dict[str, dict[str, Any]] = {}
    for name, b in bases.items():
        site_feats = []
        mods = (modules or {}).get(name)
        ex = (examples or {}).get(name)
        le = (logit_effects or {}).get(name)
        names = (labels or {}).get(name)
        for i in range(min(max_features, b.k)):
            f: dict[str, Any] = {
                "id": f"{name}:{i}",
                "label": str(names[i]) if names is not None and i < len(names) else str(i),
                "importance": float(b.importance[i]),
            }
            if mods is not None and i < len(mods):
                f["module"] = int(mods[i])
            if ex is not None and i < ex.n_features:
                f["examples"] = ex.graph_examples(i)[:n_examples]
            if le is not None and i < le.n_features:
                f["logits"] = {
                    "promoted": le.promoted[i][:n_tokens],
                    "suppressed": le.suppressed[i][:n_tokens],
                }
            site_feats.append(f)
            feats[f["id"]] = f
        layers.append({"site": name, "features": site_feats})
    edges: list[dict[str, Any]] = []
    for sec in sections.values():
        src, dst = sec.section.inp.name, sec.section.out.name
        if src not in bases or dst not in bases:
            continue
        n_out = min(max_features, bases[dst].k, sec.edges.shape[0])
        kept, totals, means = _section_edges(sec, n_out, max_share, max_inputs)
        for i in range(n_out):
            feats[f"{dst}:{i}"]["input_total"] = totals[i]
            feats[f"{dst}:{i}"]["mean_input"] = means[i]
        edges += [{"source": f"{src}:{j}", "target": f"{dst}:{i}", "weight": w} for i, j, w in kept]
    return {"layers": layers, "edges": edges}
