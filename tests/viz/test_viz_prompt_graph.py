"""The prompt-graph viewer: its data, escaping, and (in headless Chromium) hover, click, pin and
hide on a graph of a small model, offline."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from support import APIS, random_tokens, tiny_model

from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.prompt_graph import Target, prompt_graph
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.viz.html import Fragment, HtmlPage
from tl_degeneracy.viz.prompt_graph import graph_details, prompt_graph_html
from tl_degeneracy.viz.screenshot import dump_dom

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "</script><script>alert(2)</script>"


@functools.cache
def small_graph():
    model = tiny_model(APIS[0], "ln", n_layers=2)
    hooks = [f"blocks.{b}.hook_resid_{s}" for b in range(2) for s in ("pre", "mid")]
    sites = (*(Site(h) for h in hooks), Site("blocks.1.hook_resid_post"), Site("logits", "last"))
    result = fit_basis(model, random_tokens(model, 200), LIBConfig(sites, progress=False))
    graph = prompt_graph(
        model, result, random_tokens(model, 1, seed=9), Target.logit_difference(3, 4),
        node_share=0.95,
    )  # fmt: skip
    details = graph_details(model, graph, random_tokens(model, 12, seed=3), k=3, n_logits=4)
    return model, graph.with_details(details)


def hostile_graph():
    _, graph = small_graph()
    data = graph.to_viewer_data()
    data["tokens"][1] = HOSTILE
    data["sites"][2] = HOSTILE_SCRIPT
    key = next(iter(data["details"]))
    data["details"][key]["examples"].append({"tokens": [HOSTILE], "values": [1.0]})
    data["details"][key]["promoted"].append([HOSTILE_SCRIPT, 1.0])
    return data


def test_viewer_data_holds_the_kept_graph():
    _, graph = small_graph()
    data = graph.to_viewer_data()
    assert len(data["nodes"]) == graph.n_kept
    assert len(data["edges"]) == int(graph.kept_edges.sum())
    kinds = {n["kind"] for n in data["nodes"]}
    assert {"feature", "target"} <= kinds
    feature_nodes = [n for n in data["nodes"] if n["kind"] == "feature"]
    assert all(n["details"] in data["details"] for n in feature_nodes)
    some = data["details"][feature_nodes[0]["details"]]
    assert len(some["examples"]) == 3 and len(some["promoted"]) == 4
    assert json.loads(json.dumps(data)) == data  # plain JSON


def test_details_are_the_features_top_contexts():
    """The first context of a feature holds its largest value over the corpus."""
    model, graph = small_graph()
    corpus = random_tokens(model, 12, seed=3)
    node = next(n for n in graph.to_viewer_data()["nodes"] if n["kind"] == "feature")
    basis = graph.basis[node["site"]]
    from tl_degeneracy.engine.statistics import capture_sites

    (act,) = capture_sites(model, corpus, [Site(node["site"])])
    values = basis.features(act)[..., node["feature"]]
    best = graph.details[node["details"]]["examples"][0]
    assert max(best["values"]) == pytest.approx(float(values.max()), abs=1e-3)


def test_html_escapes_every_label():
    html = prompt_graph_html(hostile_graph()).html
    assert HOSTILE not in html and "</script><script>" not in html
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in html
    _, graph = small_graph()
    page = graph._repr_html_()
    assert 'class="tld-pg"' in page and "Completeness" in page


PROBE = Fragment(
    """<div id="tld-probe"></div>
<script>
window.alert = function () { document.documentElement.setAttribute("data-alert", "1"); };
window.addEventListener("load", function () {
  setTimeout(function () {
    var probe = document.getElementById("tld-probe");
    var root = document.querySelector(".tld-pg");
    var feat = document.querySelector('.tld-pg-node[data-kind="feature"]');
    feat.dispatchEvent(new MouseEvent("mouseenter", {clientX: 30, clientY: 30}));
    probe.setAttribute("data-tooltip", document.querySelector(".tld-tooltip").textContent);
    feat.dispatchEvent(new MouseEvent("click", {bubbles: true}));
    probe.setAttribute("data-panel", document.querySelector(".tld-pg-panel").textContent);
    feat.dispatchEvent(new MouseEvent("click", {bubbles: true, shiftKey: true}));
    probe.setAttribute("data-pinned", root.getAttribute("data-pinned"));
    document.querySelector(".tld-pg-hide").dispatchEvent(new MouseEvent("click"));
    probe.setAttribute("data-hidden", root.getAttribute("data-hidden"));
    probe.setAttribute("data-after-hide", root.getAttribute("data-pinned"));
    probe.setAttribute("data-display", feat.style.display);
    var box = document.querySelector(".tld-pg-rest-toggle");
    box.checked = false;
    box.dispatchEvent(new Event("change"));
    var rest = document.querySelector('.tld-pg-node[data-kind="rest"]');
    probe.setAttribute("data-rest", rest ? rest.style.display : "no rest node");
  }, 0);
});
</script>"""
)


@pytest.mark.browser
def test_viewer_in_chromium(chromium, tmp_path, parse_dom):
    page = HtmlPage("prompt graph").add("", PROBE).add("graph", prompt_graph_html(hostile_graph()))
    run = dump_dom(page.save(tmp_path / "pg.html"), budget_ms=3000)
    dom = parse_dom(run.dom)
    root = dom.find("div", "tld-pg")[0]
    assert root.attrs.get("data-rendered") == "true" and "failed" not in root.text
    _, graph = small_graph()
    assert len(dom.find("g", "tld-pg-node")) == graph.n_kept
    assert len(dom.find("path", "tld-pg-edge")) == int(graph.kept_edges.sum())
    probe = dom.find("div", id="tld-probe")[0].attrs
    assert "attribution" in probe["data-tooltip"] and "influence" in probe["data-tooltip"]
    panel = probe["data-panel"]
    assert "Top-activating contexts" in panel and "Promotes" in panel and "Strongest" in panel
    assert probe["data-pinned"] == "1"
    assert probe["data-hidden"] == "1" and probe["data-after-hide"] == "0"
    assert probe["data-display"] == "none" and probe["data-rest"] == "none"
    # hostile strings stay text
    assert "data-alert" not in dom.find("html")[0].attrs
    tokens = [t.text for t in dom.find("text", "tld-pg-token")]
    assert any(t.startswith("<img src=x") for t in tokens)
    labels = [t.text for t in dom.find("text", "tld-pg-row-label")]
    assert any("</script>" in t for t in labels)
    assert run.remote_page_requests == []
    assert torch.is_tensor(graph.influence)
