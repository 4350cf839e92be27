"""The interaction-graph widget: filtering, escaping of hostile labels, the vendored d3."""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import pytest

from tl_degeneracy.viz import graph_widget_html, prepare_graph, synthetic_graph
from tl_degeneracy.viz.graph_widget import d3_asset, graph_assets, short_site_label

HOSTILE = "</script><img src=x onerror=alert(1)>"


def _graph() -> dict:
    return {
        "layers": [
            {
                "site": "blocks.0.hook_resid_pre",
                "features": [
                    {"id": "a0", "label": "a0", "importance": 1.0, "module": 0},
                    {"id": "a1", "label": "a1", "importance": 5.0, "module": 1},
                    {"id": "a2", "label": "a2", "importance": float("nan")},
                ],
            },
            {
                "site": HOSTILE,
                "features": [
                    {
                        "id": "b0",
                        "label": HOSTILE,
                        "importance": 3.0,
                        "module": None,
                        "examples": [HOSTILE, {"tokens": [HOSTILE], "values": [1]}],
                    },
                    {"id": "b1", "importance": 2.0},
                ],
            },
        ],
        "edges": [
            {"source": "a1", "target": "b0", "weight": 0.5},
            {"source": "a0", "target": "b0", "weight": -2.0},
            {"source": "a2", "target": "b1", "weight": 1.0},
            {"source": "a1", "target": "b1", "weight": 0.0},
            {"source": "a1", "target": "zz", "weight": 1.0},
            {"source": "a0", "target": "b1", "weight": float("inf")},
        ],
    }


def _data(fragment_html: str) -> dict:
    m = re.search(r"tldGraph\.render\(id,(.*),(\{\"features\".*?\})\);}catch", fragment_html)
    assert m
    return json.loads(m.group(1))


def test_prepare_graph_keeps_top_features_and_their_edges():
    data = prepare_graph(_graph(), max_features=2, max_share=1.0, max_inputs=None)
    assert [f["id"] for f in data["layers"][0]["features"]] == ["a1", "a0"]
    assert [f["id"] for f in data["layers"][1]["features"]] == ["b0", "b1"]
    assert data["layers"][1]["features"][1]["label"] == "b1"
    # a2 dropped (NaN importance -> 0), zero/inf weights and unknown targets removed; a2 -> b1
    # still counts in b1's input although a2 is not drawn
    assert [(e["source"], e["target"]) for e in data["edges"]] == [("a0", "b0"), ("a1", "b0")]
    b0, b1 = data["layers"][1]["features"]
    assert b0["input_total"] == 2.5 and b1["input_total"] == 1.0
    for layer in data["layers"]:
        assert all(math.isfinite(f["importance"]) for f in layer["features"])
    assert [layer["block"] for layer in data["layers"]] == [0, 0]
    assert data["layers"][0]["label"] == "0 pre"


def test_edges_carry_the_share_of_each_target_input():
    """Per target, edges strongest first until `max_share` of its input; `share` and `cum`
    are fractions of the input over all its sources (`input_total` when given)."""
    layers = [
        {"site": "s0", "features": [{"id": f"a{j}", "importance": 10 - j} for j in range(5)]},
        {"site": "s1", "features": [{"id": "t", "importance": 1.0, "input_total": 20.0}]},
    ]
    weights = [8.0, 6.0, 3.0, 2.0, 1.0]  # 20 in all
    edges = [{"source": f"a{j}", "target": "t", "weight": w} for j, w in enumerate(weights)]
    data = prepare_graph({"layers": layers, "edges": edges}, max_share=0.8)
    got = [(e["source"], e["share"], e["cum"]) for e in data["edges"]]
    # 8 + 6 = 70% < 80%, so the third edge (to 85%) is needed; then 85% >= 80%: stop
    assert got == [("a0", 0.4, 0.0), ("a1", 0.3, 0.4), ("a2", 0.15, 0.7)]
    # a feature not drawn still counts towards the share, and max_inputs caps the list
    few = prepare_graph({"layers": layers, "edges": edges}, max_features=1, max_share=0.99)
    assert [(e["source"], e["cum"]) for e in few["edges"]] == [("a0", 0.0)]
    capped = prepare_graph({"layers": layers, "edges": edges}, max_share=0.99, max_inputs=2)
    assert [e["source"] for e in capped["edges"]] == ["a0", "a1"]
    # without input_total the given edges are the whole input
    del layers[1]["features"][0]["input_total"]
    data = prepare_graph({"layers": layers, "edges": edges[:2]}, max_share=0.5)
    assert [(e["share"], e["cum"]) for e in data["edges"]] == [(8 / 14, 0.0)]


def test_widget_wire_format_and_options():
    frag = graph_widget_html(_graph(), features=1, share=0.5, blocks=(0, 0))
    data = _data(frag.html)
    ids = [f["id"] for layer in data["layers"] for f in layer["features"]]
    assert ids == ["a1", "a0", "a2", "b0", "b1"]
    src, dst = ids.index("a0"), ids.index("b0")
    assert data["edges"][0][:2] == [src, dst] and data["edges"][0][2] == -2.0
    opts = json.loads(re.search(r",(\{\"features\".*?\})\);}catch", frag.html).group(1))
    assert opts["features"] == 1 and opts["share"] == 0.5 and opts["blocks"] == [0, 0]
    with pytest.raises(ValueError, match="share"):
        graph_widget_html(_graph(), share=1.0, max_share=0.9)


def test_short_site_labels():
    assert short_site_label("blocks.12.hook_resid_mid") == "12 mid"
    assert short_site_label("blocks.3.attn.hook_z") == "3 attn.z"
    assert short_site_label("blocks.0.hook_resid_post[-1]") == "0 post[-1]"
    assert short_site_label("blocks.0.hook_resid_pre[1,2,3,4,5,6,7]") == "0 pre"
    assert short_site_label("logits") == "logits"


def test_hostile_labels_stay_inside_json():
    frag = graph_widget_html(_graph())
    assert "</script><img" not in frag.html and "<img" not in frag.html
    assert frag.html.count("<script") == 1 and frag.html.count("</script>") == 1
    data = _data(frag.html)
    b0 = data["layers"][1]["features"][0]
    assert data["layers"][1]["site"] == HOSTILE and b0["label"] == HOSTILE
    assert b0["examples"] == [HOSTILE, {"tokens": [HOSTILE], "values": [1.0]}]


def test_widget_script_never_writes_html():
    js = (resources.files("tl_degeneracy") / "assets" / "graph_widget.js").read_text()
    assert ".html(" not in js and "innerHTML" not in js and "insertAdjacentHTML" not in js
    assert "tld-node" in js and "data-id" in js


def test_vendored_d3_and_assets():
    d3 = d3_asset()
    assert re.fullmatch(r"d3-7\.\d+\.\d+", d3.key)
    assert "window.tldD3=ns.d3" in d3.source
    lic = (resources.files("tl_degeneracy") / "assets" / "d3.LICENSE.txt").read_text()
    assert "Mike Bostock" in lic
    assert [a.kind for a in graph_assets()] == ["js", "js", "css"]


def test_synthetic_graph_is_reproducible():
    g1, g2 = synthetic_graph(seed=3), synthetic_graph(seed=3)
    assert g1 == g2 and len(g1["layers"]) == 4 and g1["edges"]
    frag = graph_widget_html(g1, max_features=5)
    assert 'data-features="20"' in frag.html and 'data-sites="4"' in frag.html


def test_a_nan_activation_in_an_example_is_missing_not_zero():
    """An example's NaN or infinite activation travels as null, which the panel shows as
    missing (no colour, "NaN (missing)" on hover) rather than as 0."""
    graph = _graph()
    graph["layers"][1]["features"][0]["examples"] = [
        {"tokens": ["a", "b", "c"], "values": [float("nan"), 1.5, float("inf")], "center": 1}
    ]
    data = prepare_graph(graph)
    example = next(f for la in data["layers"] for f in la["features"] if f["id"] == "b0")
    assert example["examples"][0]["values"] == [None, 1.5, None]
    script = next(a.source for a in graph_assets() if a.key == "tld-graph-widget-js")
    assert "tld-ex-missing" in script and '"NaN (missing)"' in script
