"""The study report of a small real fit in headless Chromium, offline: the summary with its
numbers, the graph with every site's top features, a feature's example tokens after a click,
the graph's controls, a circuitsvis token view and the attribution table; nothing requested
from the network, hostile token strings kept as text."""

from __future__ import annotations

import json

import pytest

from tl_degeneracy import cli
from tl_degeneracy.viz.graph_data import result_graph_data
from tl_degeneracy.viz.graph_widget import prepare_graph
from tl_degeneracy.viz.screenshot import dump_dom

pytestmark = pytest.mark.browser

CLICKED = "blocks.1.hook_resid_pre[1:]:0"

# Runs in a copy of the page: clicks a LIB feature, records the side panel, then drives the
# controls (features per site, share, block range) and records what the graph draws.
PROBE = """<div id="tld-report-probe"></div>
<script>
window.alert = window.confirm = window.prompt = function () {
  document.documentElement.setAttribute("data-alert", "1");
};
window.addEventListener("load", function () {
  setTimeout(function () {
    var probe = document.getElementById("tld-report-probe");
    var record = function (k, v) { probe.setAttribute("data-" + k, String(v)); };
    var graph = document.querySelector('.tld-part[data-part="graph"] .tld-graph');
    var counts = {};
    graph.querySelectorAll(".tld-node").forEach(function (n) {
      var s = n.getAttribute("data-site");
      counts[s] = (counts[s] || 0) + 1;
    });
    record("initial", JSON.stringify(counts));
    record("edges-80", graph.getAttribute("data-edges"));
    graph.querySelector('.tld-node[data-id="CLICKED"]')
      .dispatchEvent(new MouseEvent("click", { bubbles: true }));
    var panel = graph.querySelector(".tld-panel");
    record("selected", panel.getAttribute("data-selected"));
    record("panel", panel.textContent);
    record("panel-tokens", panel.querySelectorAll(".tld-ex-tok").length);
    var set = function (sel, value, type) {
      var el = graph.querySelector(sel);
      el.value = value;
      el.dispatchEvent(new Event(type));
    };
    set(".tld-ctl-share", "30", "input");
    record("edges-30", graph.getAttribute("data-edges"));
    set(".tld-ctl-share", "99", "input");
    record("edges-99", graph.getAttribute("data-edges"));
    set(".tld-ctl-features", "3", "input");
    record("nodes-3", graph.getAttribute("data-nodes"));
    set(".tld-ctl-block-hi", "0", "change");
    record("columns-block-0", graph.getAttribute("data-columns"));
    record("attribution-rows", document.querySelectorAll(".tld-attribution tbody tr").length);
  }, 0);
});
</script>
""".replace("CLICKED", CLICKED)


@pytest.fixture(scope="module")
def rendered_report(chromium, small_study, parse_dom, tmp_path_factory):
    out, _, _ = small_study
    page = tmp_path_factory.mktemp("report") / "report.html"
    assert cli.main(["report", str(out), "--page", str(page)]) == 0
    probed = page.with_name("probed.html")
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>", 1),
        encoding="utf-8",
    )
    run = dump_dom(probed, budget_ms=6000)
    dom = parse_dom(run.dom)
    return run, dom, dom.find("div", id="tld-report-probe")[0].attrs


def _expected_edges(inputs, share: float, features: int = 12) -> int:
    """Edges the widget draws at `share`, from the data it is given (`cum` as sent)."""
    data = prepare_graph(result_graph_data(inputs.bases["lib"], inputs.edges["lib"]))

    def row(fid: str) -> int:
        return int(fid.rsplit(":", 1)[1])

    return sum(
        row(e["source"]) < features
        and row(e["target"]) < features
        and float(f"{e['cum']:.3g}") < share - 1e-9
        for e in data["edges"]
    )


def test_summary_shows_the_numbers(rendered_report, small_study):
    _, dom, _ = rendered_report
    _, inputs, _ = small_study
    (summary,) = dom.find("div", "tld-part", data_part="summary")
    n = inputs.bases["lib"].metadata["n_tokens"]
    assert f"{n:,} token positions" in summary.text
    assert "Edges needed for 99% of the edge weight" in summary.text
    assert "LIB needs fewer edges than PCA in" in summary.text


def test_graph_shows_ten_features_per_site_and_its_controls_work(rendered_report, small_study):
    _, dom, probe = rendered_report
    _, inputs, _ = small_study
    sites = list(inputs.bases["lib"].bases)
    counts = json.loads(probe["data-initial"])
    assert list(counts) == sites and min(counts.values()) >= 10
    for graph in dom.find("div", "tld-graph"):
        assert graph.attrs["data-rendered"] == "true" and "failed" not in graph.text
    assert int(probe["data-edges-80"]) == _expected_edges(inputs, 0.8) > 0
    assert int(probe["data-edges-30"]) == _expected_edges(inputs, 0.3)
    assert int(probe["data-edges-99"]) == _expected_edges(inputs, 0.99)
    assert _expected_edges(inputs, 0.3) < _expected_edges(inputs, 0.99)
    assert probe["data-nodes-3"] == str(3 * len(sites))
    assert probe["data-columns-block-0"] == "2"  # blocks.0 resid_pre and resid_mid


def test_clicked_feature_shows_its_examples(rendered_report, small_study):
    _, _, probe = rendered_report
    _, inputs, _ = small_study
    assert probe["data-selected"] == CLICKED
    site, i = CLICKED.rsplit(":", 1)
    ex = inputs.examples["lib"][site]
    assert int(probe["data-panel-tokens"]) == sum(len(t) for t in ex.tokens[int(i)])
    assert "".join(ex.tokens[int(i)][0]) in probe["data-panel"]
    assert "Top-activating examples" in probe["data-panel"]


def test_circuitsvis_views_and_attribution_table(rendered_report, small_study):
    _, dom, probe = rendered_report
    _, inputs, _ = small_study
    views = dom.find("div", "tld-cv", data_component="TopkSamples")
    assert views and all("failed" not in v.text for v in views)
    first = inputs.examples["lib"][list(inputs.examples["lib"])[0]]
    peak = first.tokens[0][0][first.center[0][0]]
    assert peak.replace(" ", "") in views[0].text.replace("\xa0", "").replace(" ", "")
    (table,) = dom.find("div", "tld-attribution")
    assert "ρ attribution ~ patching" in table.text
    assert int(probe["data-attribution-rows"]) == sum(
        len(c.sites) for c in inputs.attribution.values()
    )


def test_offline_and_hostile_tokens_stay_text(rendered_report, hostile):
    run, dom, _ = rendered_report
    assert run.remote_page_requests == []
    assert "data-alert" not in dom.find("html")[0].attrs
    assert not [i for i in dom.find("img") if i.attrs.get("src") == "x"]
    assert hostile in dom.find("body")[0].text.replace("\xa0", " ")
