"""The interaction-graph widget: sites as columns, top features as nodes, interactions as edges.

Input is a plain dict, so the widget does not depend on the core::

    {"layers": [{"site": "blocks.0.hook_resid_pre",
                 "features": [{"id": "0:3", "label": "f3", "importance": 1.2, "module": 0,
                               "examples": ["a [[b]] c", {"tokens": [...], "values": [...]}]}]}],
     "edges": [{"source": "0:3", "target": "1:0", "weight": 0.4}]}

`prepare_graph` validates it and keeps the `top_n` most important features of each site and the
`max_edges` strongest edges among them; the browser side (`assets/graph_widget.js`, on a vendored
d3 v7) draws it. Examples are plain text (or tokens with values) and are shown as text.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from tl_degeneracy.viz.html import Asset, Fragment, json_for_script

__all__ = ["d3_asset", "graph_assets", "graph_widget_html", "prepare_graph"]


def _read_asset(name: str) -> str:
    return (resources.files("tl_degeneracy") / "assets" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def d3_asset() -> Asset:
    """The vendored d3 v7 UMD bundle, exposed as `window.tldD3` only.

    The bundle runs with `define`/`module`/`exports` hidden (so Jupyter's RequireJS does not
    swallow it) and a private `globalThis` (so a page's own `window.d3` is left alone).
    """
    src = _read_asset("d3.min.js")
    m = re.search(r"d3js\.org v(\d+\.\d+\.\d+)", src[:200])
    version = m.group(1) if m else "7"
    wrapped = (
        "(function(){var ns={};(function(define,exports,module,globalThis){\n"
        + src
        + "\n}).call(ns,undefined,undefined,undefined,ns);window.tldD3=ns.d3;})();"
    )
    return Asset(f"d3-{version}", wrapped, "js")


@lru_cache(maxsize=1)
def graph_assets() -> tuple[Asset, ...]:
    """Everything the widget needs, in load order: d3, the widget script, its CSS."""
    return (
        d3_asset(),
        Asset("tld-graph-widget-js", _read_asset("graph_widget.js"), "js"),
        Asset("tld-graph-widget-css", _read_asset("graph_widget.css"), "css"),
    )


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _example(ex: Any) -> str | dict[str, list]:
    if isinstance(ex, Mapping):
        tokens = [str(t) for t in ex.get("tokens", [])]
        values = [_finite(v) for v in ex.get("values", [])]
        return {"tokens": tokens, "values": values}
    return str(ex)


def prepare_graph(
    graph_data: Mapping[str, Any], top_n: int | None = 12, max_edges: int | None = 400
) -> dict[str, Any]:
    """Validated, JSON-ready copy of `graph_data` with the `top_n` most important features per
    site and the `max_edges` edges of largest |weight| between kept features.

    Strings are coerced with `str()`, non-finite numbers become 0, zero-weight edges and edges
    to dropped or unknown features are removed. Feature ids must be unique across sites.
    """
    layers_out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for layer in graph_data.get("layers", []):
        feats: list[dict[str, Any]] = []
        for f in layer.get("features", []):
            fid = str(f["id"])
            if fid in seen:
                raise ValueError(f"feature id {fid!r} appears twice")
            seen.add(fid)
            module = f.get("module")
            feats.append(
                {
                    "id": fid,
                    "label": str(f.get("label", fid)),
                    "importance": _finite(f.get("importance", 0.0)),
                    "module": None if module is None else int(module),
                    "examples": [_example(e) for e in f.get("examples", []) or []],
                }
            )
        feats.sort(key=lambda f: -f["importance"])
        if top_n is not None:
            feats = feats[:top_n]
        layers_out.append({"site": str(layer.get("site", "")), "features": feats})

    kept = {f["id"] for layer in layers_out for f in layer["features"]}
    edges: list[dict[str, Any]] = []
    for e in graph_data.get("edges", []):
        s, t, w = str(e["source"]), str(e["target"]), _finite(e.get("weight", 0.0))
        if s in kept and t in kept and w != 0.0:
            edges.append({"source": s, "target": t, "weight": w})
    edges.sort(key=lambda e: -abs(e["weight"]))
    if max_edges is not None:
        edges = edges[:max_edges]
    return {"layers": layers_out, "edges": edges}


def graph_widget_html(
    graph_data: Mapping[str, Any],
    top_n: int | None = 12,
    width: int = 900,
    max_edges: int | None = 400,
    label_chars: int = 22,
    selected: str | None = None,
) -> Fragment:
    """The interactive graph as a page fragment (needs d3 and the widget script, inlined once
    per page by `render_page`). Hover shows site, feature, Λ and edge weights; click shows a
    feature's examples in the side panel; `selected` opens one feature's panel at load."""
    data = prepare_graph(graph_data, top_n=top_n, max_edges=max_edges)
    div_id = f"tld-graph-{uuid.uuid4().hex[:12]}"
    opts = {"width": int(width), "labelChars": int(label_chars), "selected": selected}
    n_nodes = sum(len(layer["features"]) for layer in data["layers"])
    script = (
        "(function(){var id=" + json_for_script(div_id) + ";"
        "try{tldGraph.render(id," + json_for_script(data) + "," + json_for_script(opts) + ");}"
        "catch(e){document.getElementById(id).textContent='graph failed: '+e;}})();"
    )
    body = (
        f'<div id="{div_id}" class="tld-graph" data-nodes="{n_nodes}" '
        f'data-edges="{len(data["edges"])}"></div>\n<script>{script}</script>\n'
    )
    return Fragment(body, graph_assets())


def synthetic_graph(
    sites: Sequence[str] = (
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_pre",
        "blocks.3.hook_resid_pre",
    ),
    n_features: int = 10,
    n_modules: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """A reproducible fake graph for demos and tests: Λ decays per site, features of the same
    module interact more strongly."""
    import random

    rng = random.Random(seed)
    layers: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for li, site in enumerate(sites):
        feats: list[dict[str, Any]] = []
        for j in range(n_features):
            feats.append(
                {
                    "id": f"{li}:{j}",
                    "label": f"L{li} f{j}",
                    "importance": round(10.0 * 0.7**j * rng.uniform(0.8, 1.2), 4),
                    "module": (j + li) % n_modules,
                    "examples": [f"example {k} of L{li} f{j}: the [[cat]] sat" for k in range(3)],
                }
            )
        layers.append({"site": site, "features": feats})
    for li in range(len(sites) - 1):
        for a in layers[li]["features"]:
            for b in layers[li + 1]["features"]:
                same = a["module"] == b["module"]
                w = rng.lognormvariate(0.0 if same else -2.5, 1.0)
                if w > 0.05:
                    edges.append({"source": a["id"], "target": b["id"], "weight": round(w, 4)})
    return {"layers": layers, "edges": edges}
