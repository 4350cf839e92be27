"""The interaction-graph widget: sites as columns, top features as nodes, interactions as edges.

Input is a plain dict, so the widget does not depend on the core::

    {"layers": [{"site": "blocks.0.hook_resid_pre",            # "label", "block": optional
                 "features": [{"id": "0:3", "label": "3", "importance": 1.2,
                               "module": 0,                     # None or −1: no module
                               "input_total": 7.5,              # optional, see below
                               "examples": ["a [[b]] c", {"tokens": [...], "values": [...],
                                                          "center": 1}],
                               "logits": {"promoted": [["tok", 1.3]], "suppressed": [...]}}]}],
     "edges": [{"source": "0:3", "target": "1:0", "weight": 0.4}]}

`prepare_graph` validates it, keeps the `max_features` most important features of each site and,
for each target feature, only the strongest incoming edges that together carry `max_share` of its
input (at most `max_inputs`). A feature's input is `input_total` when given (the sum of |weight|
over *all* its inputs, shown or not), else the sum over the edges given. Each kept edge records
its `share` of the target's input and `cum`, the share of the stronger edges before it, so the
browser can show "the edges that carry 80% of each feature's input" for any share up to
`max_share` without the data again.

The browser side (`assets/graph_widget.js`, on a vendored d3 v7) draws it with controls for the
number of features per site, that share and the block range; edge width is proportional to
|weight| within each section; clicking a feature shows its inputs and outputs, examples and
logit effects. Every string reaches the page as JSON and is written as text, never as markup.
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

__all__ = [
    "d3_asset",
    "graph_assets",
    "graph_widget_html",
    "module_label",
    "prepare_graph",
    "short_site_label",
    "synthetic_graph",
]


def read_asset(name: str) -> str:
    """The text of a file in the package's `assets/` folder."""
    return (resources.files("tl_degeneracy") / "assets" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def d3_asset() -> Asset:
    """The vendored d3 v7 UMD bundle, exposed as `window.tldD3` only.

    The bundle runs with `define`/`module`/`exports` hidden (so Jupyter's RequireJS does not
    swallow it) and a private `globalThis` (so a page's own `window.d3` is left alone).
    """
    src = read_asset("d3.min.js")
    m = re.search(r"d3js\.org v(\d+\.\d+\.\d+)", src[:200])
    version = m.group(1) if m else "7"
    wrapped = (
        "(function(){var ns={};(function(define,exports,module,globalThis){\n"
        + src
        + "\n}).call(ns,undefined,undefined,undefined,ns);window.tldD3=ns.d3;})();"
    )
    return Asset(f"d3-{version}", wrapped, "js")


def viewer_script(name: str) -> str:
    """A graph viewer's script from `assets/`, after the hover tooltip both viewers share
    (`tooltip.js`, which defines `window.tldTooltip`)."""
    return read_asset("tooltip.js") + "\n" + read_asset(name)


@lru_cache(maxsize=1)
def graph_assets() -> tuple[Asset, ...]:
    """Everything the widget needs, in load order: d3, the widget script, its CSS."""
    return (
        d3_asset(),
        Asset("tld-graph-widget-js", viewer_script("graph_widget.js"), "js"),
        Asset("tld-graph-widget-css", read_asset("graph_widget.css"), "css"),
    )


def short_site_label(site: str) -> str:
    """`blocks.12.hook_resid_mid` -> `12 mid`, `blocks.3.attn.hook_z` -> `3 attn.z`; long
    position lists are dropped (`[-1]` stays)."""
    base, _, pos = site.partition("[")
    pos = f"[{pos}" if pos and len(pos) <= 6 else ""
    m = re.fullmatch(r"blocks\.(\d+)\.(.*)", base)
    if m:
        rest = m.group(2).replace("hook_", "").replace("resid_", "")
        return f"{m.group(1)} {rest}{pos}"
    return base.replace("hook_", "") + pos


def module_label(label: Any) -> int | None:
    """A feature's module as the widget draws it: None (grey, no legend entry) for no module,
    which a module labelling marks with −1 (`module_finding.UNASSIGNED`, as
    `Modules.by_site()` gives it) or leaves out; the label itself otherwise. The one place
    that decides it, for every graph the package draws."""
    if label is None:
        return None
    value = int(label)
    return None if value < 0 else value


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _round(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (keeps the page small)."""
    return float(f"{x:.{digits}g}")


def _missing_or_round(x: Any, digits: int = 2) -> float | None:
    """An example's activation rounded, or None where it is not a finite number."""
    v = _finite(x, math.nan)
    return _round(v, digits) if math.isfinite(v) else None


def _example(ex: Any) -> str | dict[str, Any]:
    if isinstance(ex, Mapping):
        out: dict[str, Any] = {
            "tokens": [str(t) for t in ex.get("tokens", [])],
            # a NaN or infinite activation travels as null: the panel marks it missing
            "values": [_missing_or_round(v) for v in ex.get("values", [])],
        }
        if ex.get("center") is not None:
            out["center"] = int(ex["center"])
        return out
    return str(ex)


def _token_values(items: Any) -> list[list[Any]]:
    return [[str(tok), _round(_finite(val), 3)] for tok, val in items or []]


def _feature(f: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(f["id"]),
        "label": str(f.get("label", f["id"])),
        "importance": _round(_finite(f.get("importance", 0.0))),
        "module": module_label(f.get("module")),
        "examples": [_example(e) for e in f.get("examples", []) or []],
    }
    if f.get("input_total") is not None:
        out["input_total"] = _finite(f["input_total"])
    if f.get("mean_input") is not None:
        out["mean_input"] = _round(_finite(f["mean_input"]))
    logits = f.get("logits")
    if logits:
        out["logits"] = {
            "promoted": _token_values(logits.get("promoted")),
            "suppressed": _token_values(logits.get("suppressed")),
        }
    return out


def _block_of(site: str, previous: int) -> int:
    m = re.match(r"blocks\.(\d+)\.", site)
    return int(m.group(1)) if m else previous


def prepare_graph(
    graph_data: Mapping[str, Any],
    max_features: int | None = 32,
    max_share: float = 0.99,
    max_inputs: int | None = 16,
) -> dict[str, Any]:
    """Validated, JSON-ready copy of `graph_data`: the `max_features` most important features
    per site and, per target feature, its strongest inputs up to `max_share` of its input (at
    most `max_inputs`), each edge with its `share` and `cum` (see the module docstring).

    Strings are coerced with `str()`, non-finite numbers become 0 (an example's activation
    becomes None, which the panel shows as missing), a negative module is no module
    (`module_label`), zero-weight edges and edges to unknown features are removed. Feature ids
    must be unique across sites.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    layers_out: list[dict[str, Any]] = []
    seen: set[str] = set()
    block = 0
    for layer in graph_data.get("layers", []):
        feats = [_feature(f) for f in layer.get("features", [])]
        for f in feats:
            if f["id"] in seen:
                raise ValueError(f"feature id {f['id']!r} appears twice")
            seen.add(f["id"])
        feats.sort(key=lambda f: -f["importance"])
        if max_features is not None:
            feats = feats[:max_features]
        site = str(layer.get("site", ""))
        block = int(layer["block"]) if layer.get("block") is not None else _block_of(site, block)
        label = str(layer.get("label") or short_site_label(site))
        layers_out.append({"site": site, "label": label, "block": block, "features": feats})

    kept = {f["id"]: f for layer in layers_out for f in layer["features"]}
    incoming: dict[str, list[tuple[str, float]]] = {}
    for e in graph_data.get("edges", []):
        s, t, w = str(e["source"]), str(e["target"]), _finite(e.get("weight", 0.0))
        if t in kept and w != 0.0:  # a source not listed still counts in the input
            incoming.setdefault(t, []).append((s, w))
    edges: list[dict[str, Any]] = []
    for t, inputs in incoming.items():
        inputs.sort(key=lambda sw: -abs(sw[1]))
        total = kept[t].get("input_total") or sum(abs(w) for _, w in inputs)
        kept[t]["input_total"] = _round(total)
        before = 0.0
        for rank, (s, w) in enumerate(inputs):
            if before >= max_share * total or (max_inputs is not None and rank >= max_inputs):
                break
            if s in kept:
                share = abs(w) / total
                edges.append(
                    {"source": s, "target": t, "weight": w, "share": share, "cum": before / total}
                )
            before += abs(w)
    edges.sort(key=lambda e: -abs(e["weight"]))
    return {"layers": layers_out, "edges": edges}


def _wire(data: Mapping[str, Any]) -> dict[str, Any]:
    """The browser's compact form: edges as [source index, target index, weight, cum] over the
    features in layer order (the share is |weight| / the target's `input_total`)."""
    index = {f["id"]: i for i, f in enumerate(f for la in data["layers"] for f in la["features"])}
    edges = [
        [index[e["source"]], index[e["target"]], _round(e["weight"], 3), _round(e["cum"], 3)]
        for e in data["edges"]
    ]
    return {"layers": data["layers"], "edges": edges}


def graph_widget_html(
    graph_data: Mapping[str, Any],
    features: int = 12,
    share: float = 0.8,
    blocks: tuple[int, int] | None = None,
    max_features: int | None = 32,
    max_share: float = 0.99,
    max_inputs: int | None = 16,
    label_chars: int = 18,
    selected: str | None = None,
) -> Fragment:
    """The interactive graph as a page fragment (d3 and the widget script are inlined once per
    page by `render_page`).

    It opens with `features` features per site, the edges carrying `share` of each feature's
    input, and the sites of `blocks` (first, last; None: all); the reader changes all three.
    `max_features`, `max_share` and `max_inputs` bound what the page holds (`prepare_graph`).
    `selected` opens one feature's panel at load.
    """
    data = prepare_graph(graph_data, max_features, max_share, max_inputs)
    if not 0 < share <= max_share:
        raise ValueError(f"share must be in (0, max_share={max_share}], got {share}")
    div_id = f"tld-graph-{uuid.uuid4().hex[:12]}"
    opts = {
        "features": int(features),
        "share": float(share),
        "maxShare": float(max_share),
        "maxInputs": max_inputs,
        "blocks": list(blocks) if blocks is not None else None,
        "labelChars": int(label_chars),
        "selected": selected,
    }
    n_features = sum(len(layer["features"]) for layer in data["layers"])
    args = json_for_script(_wire(data)) + "," + json_for_script(opts)
    script = (
        "(function(){var id=" + json_for_script(div_id) + ";"
        "try{tldGraph.render(id," + args + ");}"
        "catch(e){document.getElementById(id).textContent='graph failed: '+e;}})();"
    )
    body = (
        f'<div id="{div_id}" class="tld-graph" data-features="{n_features}" '
        f'data-sites="{len(data["layers"])}" data-stored-edges="{len(data["edges"])}"></div>\n'
        f"<script>{script}</script>\n"
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
    """A reproducible fake graph for demos and tests: importance decays per site, features of
    the same module interact more strongly."""
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
