"""The prompt-graph viewer: sites as rows, positions as columns, the prompt's tokens along the
bottom; edges weighted and signed; hover for values, click a node for its feature's
top-activating contexts and logit effects, pin and hide nodes.

The input is the plain dict of `PromptGraph.to_viewer_data()`; the browser side
(`assets/prompt_graph.js`, on the vendored d3 v7) draws it. Data reaches the page through
`json_for_script` and the script writes every string with d3's `text()`/`attr()`, never as HTML.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from tl_degeneracy.viz.graph_widget import d3_asset, graph_assets, read_asset, viewer_script
from tl_degeneracy.viz.html import Asset, Fragment, json_for_script

__all__ = ["graph_details", "prompt_graph_assets", "prompt_graph_html"]


@lru_cache(maxsize=1)
def prompt_graph_assets() -> tuple[Asset, ...]:
    """d3, the graph widget's CSS (tooltip, panel, examples), the viewer's script and CSS."""
    widget_css = next(a for a in graph_assets() if a.kind == "css")
    return (
        d3_asset(),
        widget_css,
        Asset("tld-prompt-graph-js", viewer_script("prompt_graph.js"), "js"),
        Asset("tld-prompt-graph-css", read_asset("prompt_graph.css"), "css"),
    )


def prompt_graph_html(
    data: Mapping[str, Any], width: int = 0, max_edges: int | None = 3000, per_cell: int = 8
) -> Fragment:
    """The viewer as a page fragment (assets inlined once per page by `render_page`).

    `max_edges` keeps the strongest |weight| edges (the page stays responsive); each (site,
    position) cell first shows its `per_cell` most influential nodes (a control changes it);
    `width` is a minimum width in pixels (the drawing is as wide as its columns need)."""
    data = dict(data)
    edges = sorted(data.get("edges", []), key=lambda e: -abs(float(e["weight"])))
    data["edges"] = edges if max_edges is None else edges[:max_edges]
    div_id = f"tld-pg-{uuid.uuid4().hex[:12]}"
    script = (
        "(function(){var id=" + json_for_script(div_id) + ";"
        "try{tldPromptGraph.render(id,"
        + json_for_script(data)
        + ","
        + json_for_script({"width": int(width), "perCell": int(per_cell)})
        + ");}"
        "catch(e){document.getElementById(id).textContent='prompt graph failed: '+e;}})();"
    )
    body = (
        f'<div id="{div_id}" class="tld-pg" data-nodes="{len(data.get("nodes", []))}" '
        f'data-edges="{len(data["edges"])}"></div>\n<script>{script}</script>\n'
    )
    return Fragment(body, prompt_graph_assets())


def _token_namer(model: nn.Module) -> Callable[[int], str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return str
    return lambda i: str(tokenizer.decode([int(i)]))


def graph_details(
    model: nn.Module,
    graph: Any,
    corpus: Tensor | None = None,
    basis: Any = None,
    k: int = 5,
    context: tuple[int, int] = (8, 2),
    n_logits: int = 8,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Per kept feature node, keyed `"site:feature"`: its `k` top-activating contexts in
    `corpus` (token rows; optional) and the `n_logits` tokens its direction promotes and
    suppresses most (residual-stream sites). Pass the result to `graph.with_details`."""
    from tl_degeneracy.engine.prompt_graph.details import corpus_features, feature_logit_effects
    from tl_degeneracy.engine.prompt_graph.edges import FEATURE
    from tl_degeneracy.viz.feature_views import topk_examples

    basis = basis if basis is not None else graph.basis
    if basis is None:
        raise ValueError("pass the basis the graph was built in (a loaded graph does not hold it)")
    c = graph.candidates
    wanted: dict[str, list[int]] = {}
    for i in torch.nonzero(graph.kept_nodes & (c.kind == FEATURE))[:, 0].tolist():
        ref = graph.node_ref(i)
        if ref.feature not in wanted.setdefault(ref.site, []):
            wanted[ref.site].append(ref.feature)
    name = functools.lru_cache(maxsize=None)(_token_namer(model))
    out: dict[str, dict[str, Any]] = {
        f"{s}:{f}": {"examples": [], "promoted": [], "suppressed": []}
        for s, feats in wanted.items()
        for f in feats
    }
    if corpus is not None and len(corpus):
        acts = corpus_features(model, basis, corpus, wanted, batch_size)
        rows = [[name(t) for t in row] for row in corpus.tolist()]
        for site, values in acts.items():
            ex = topk_examples(values, rows, k=k, context=context, feature_ids=wanted[site])
            for feat in wanted[site]:
                row = ex.row_of(feat)
                if row is not None:
                    out[f"{site}:{feat}"]["examples"] = ex.graph_examples(row)
    try:
        effects = feature_logit_effects(model, basis, wanted)
    except ValueError:
        effects = {}
    for site, eff in effects.items():
        top, bottom = _top_tokens(eff, n_logits, name)
        for col, feat in enumerate(wanted[site]):
            out[f"{site}:{feat}"]["promoted"] = top[col]
            out[f"{site}:{feat}"]["suppressed"] = bottom[col]
    return out


def _top_tokens(effects: Tensor, n: int, name: Callable[[int], str]):
    """The `n` most promoted and most suppressed tokens of each row, as [token, value] pairs
    (only those tokens are decoded)."""
    n = min(n, effects.shape[1])
    top, bottom = effects.topk(n, 1), effects.topk(n, 1, largest=False)

    def pairs(values: Tensor, ids: Tensor) -> list[list[list[Any]]]:
        return [
            [[name(t), round(v, 4)] for t, v in zip(row_ids, row_values)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist())
        ]

    return pairs(top.values, top.indices), pairs(bottom.values, bottom.indices)
