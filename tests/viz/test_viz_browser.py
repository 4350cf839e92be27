"""A saved page in headless Chromium, offline: the views render, nothing is requested from the
network, hostile strings stay text. Needs Debian's chromium (scripts/install_browser.sh)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tl_degeneracy.viz import (
    HtmlReprMixin,
    PageSection,
    feature_activations_view,
    graph_widget_html,
    json_for_script,
    synthetic_graph,
)
from tl_degeneracy.viz.screenshot import dump_dom, screenshot

pytestmark = pytest.mark.browser


def test_graph_nodes_render(rendered_demo):
    run, dom = rendered_demo
    nodes = dom.find("g", "tld-node")
    assert len(nodes) == 4 * 8
    assert {n.attrs["data-id"] for n in nodes} >= {"0:0", "hostile", "3:7"}
    assert len(dom.find("path", "tld-edge")) > 20
    graph = dom.find("div", "tld-graph")[0]
    assert graph.attrs.get("data-rendered") == "true"
    panel = dom.find("div", "tld-panel")[0]  # the probe clicked the hostile node last
    assert panel.attrs.get("data-selected") == "hostile" and "Strongest inputs" in panel.text
    assert "failed" not in graph.text


def test_circuitsvis_views_and_table_render(rendered_demo):
    _, dom = rendered_demo
    widgets = {w.attrs["data-component"]: w for w in dom.find("div", "tld-cv")}
    assert set(widgets) == {"ColoredTokensMulti", "TopkSamples"}
    tokens = widgets["ColoredTokensMulti"].text.replace("\xa0", " ")
    assert "The cat sat" in tokens and " mat" in tokens
    assert " w0" in widgets["TopkSamples"].text.replace("\xa0", " ")
    table = dom.find("table", "tld-logit-effects")
    assert table and "cat" in table[0].text and len(dom.find("tr")) >= 3
    imgs = dom.find("img")
    assert imgs and all(i.attrs["src"].startswith("data:image/png;base64,") for i in imgs)


def test_no_request_leaves_the_machine(rendered_demo):
    run, _ = rendered_demo
    assert run.remote_page_requests == []
    assert [r for r in run.page_requests if not r.url.startswith(("file:", "data:"))] == []


def test_request_detector_catches_remote_urls(chromium, tmp_path):
    """Positive control: a page that does reach out is caught (the request goes to the closed
    proxy on 127.0.0.1:9 and to a name in `.invalid`, so nothing leaves)."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="https://tld-test.invalid/x.png">'
        '<script>fetch("http://tld-test.invalid/y").catch(function(){});</script></body></html>'
    )
    run = dump_dom(page, budget_ms=1000)
    urls = sorted(r.url for r in run.remote_page_requests)
    assert urls == ["http://tld-test.invalid/y", "https://tld-test.invalid/x.png"]


def test_hostile_strings_stay_text(rendered_demo, hostile):
    _, dom = rendered_demo
    html_el = dom.find("html")[0]
    assert "data-alert" not in html_el.attrs
    assert not [i for i in dom.find("img") if i.attrs.get("src") == "x"]
    assert not dom.find("svg", onload="alert(3)")
    # circuitsvis tokens (non-breaking spaces aside) and the SVG label show the string as text
    tokens = dom.find("div", "tld-cv", data_component="ColoredTokensMulti")[0]
    assert hostile in tokens.text.replace("\xa0", " ")
    labels = [t.text for t in dom.find("text", "tld-node-label")]
    assert any(t.startswith("<img src=x onerr") for t in labels)
    sites = [t.text for t in dom.find("text", "tld-site-label")]  # text + its <title>
    site = '"><svg onload=alert(3)>'  # shown shortened, in full in its <title>
    assert sites[2].startswith(site[:10]) and sites[2].endswith(site)
    probe = dom.find("div", id="tld-probe")[0].attrs
    assert "data-error" not in probe
    assert hostile in probe["data-tooltip"] and "importance" in probe["data-tooltip"]
    assert (
        hostile in probe["data-panel"]
        and "</script><script>alert(2)</script>" in probe["data-panel"]
    )


def test_screenshot(chromium, demo_page, tmp_path):
    png = screenshot(demo_page, tmp_path / "demo.png", width=1200, height=900)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1200, 900)


class _Result(HtmlReprMixin):
    def _html_sections(self):
        return [
            PageSection("Graph", graph_widget_html(synthetic_graph(n_features=5))),
            PageSection("Tokens", feature_activations_view(["a", " b"], np.eye(2), ["x", "y"])),
        ]


def test_repr_html_works_like_jupyter(chromium, tmp_path, parse_dom):
    """The `_repr_html_` fragment inserted as JupyterLab does (innerHTML, then each script
    re-created in order), with a RequireJS-style AMD `define` on the page as in classic
    Jupyter."""
    page = tmp_path / "jupyter.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><script>"
        "window.define=function(){throw new Error('AMD define called');};window.define.amd={};"
        "</script></head><body><div id='out'></div><script>"
        "var out=document.getElementById('out');out.innerHTML="
        + json_for_script(_Result()._repr_html_())
        + ";out.querySelectorAll('script').forEach(function(old){"
        "var s=document.createElement('script');s.textContent=old.textContent;"
        "old.parentNode.replaceChild(s,old);});</script></body></html>",
        encoding="utf-8",
    )
    dom = parse_dom(dump_dom(page, budget_ms=2000).dom)
    assert len(dom.find("g", "tld-node")) == 4 * 5
    tokens = dom.find("div", "tld-cv")[0].text.replace("\xa0", " ")
    assert "a b" in tokens and "failed" not in tokens
