"""The study report without a browser: the page from a small real fit (through the `report`
command), its summary numbers against the results they come from, the loader's round trip,
readable settings, and the graph data built from edge tensors."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import replace

import pytest
import torch

from tl_degeneracy import cli
from tl_degeneracy.engine.ablation import AblationCurve
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.edges import SectionEdges
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.experiments.study_output import load_study_artifacts
from tl_degeneracy.viz import report_summary as rs
from tl_degeneracy.viz.feature_views import LogitEffects, topk_examples
from tl_degeneracy.viz.graph_data import result_graph_data, token_labels
from tl_degeneracy.viz.report import StudyReportInputs, study_report


@pytest.fixture(scope="module")
def page(small_study):
    out, _, _ = small_study
    assert cli.main(["report", str(out)]) == 0
    return (out / "report.html").read_text(encoding="utf-8")


def _part(html_text: str, name: str) -> str:
    start = html_text.index(f'data-part="{name}"')
    return html_text[start : html_text.index("</section>", start)]


def test_page_is_self_contained_and_small(page, small_study):
    out, _, _ = small_study
    assert (out / "report.html").stat().st_size < 5_000_000
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles == [
        "Summary",
        "Interaction graph (LIB)",
        "Interaction graph (PCA)",
        "Features",
        "Node ablation",
        "Attribution vs patching on indirect-object pairs",
        "Edge sparsity",
        "Dominant directions",
        "Spectra",
        "Settings and timings",
    ]
    assert (
        page.count('data-tld-asset="circuitsvis-') == 1 and page.count('data-tld-asset="d3-') == 1
    )
    assert "<img src=x" not in page  # the hostile token of the vocabulary stays text


def test_summary_numbers_come_from_the_results(page, small_study):
    _, inputs, _ = small_study
    summary = _part(page, "summary")
    assert f"{inputs.bases['lib'].metadata['n_tokens']:,} token positions" in summary
    for site, by_kind in inputs.curves.items():
        ks = {kind: c.min_k(inputs.tolerance) for kind, c in by_kind.items()}
        assert f"at {site}, LIB {ks['lib']}, PCA {ks['pca']}" in summary
    for kind in ("lib", "pca"):
        n99 = [se.edges_for_fraction(0.99) for se in inputs.edges[kind].values()]
        assert f"{statistics.median(n99):g} for {kind.upper()}" in summary
    lib, pca = inputs.edges["lib"], inputs.edges["pca"]
    fewer = sum(lib[s].edges_for_fraction(0.99) < pca[s].edges_for_fraction(0.99) for s in lib)
    assert f"LIB needs fewer edges than PCA in {fewer} of {len(lib)} sections" in summary
    top = max(inputs.diagnostic.shares.values())
    assert f"the largest share is {top:.1%}" in summary


def test_settings_and_timings_are_readable(page, small_study):
    _, inputs, _ = small_study
    settings = _part(page, "settings")
    cells = re.findall(r"<td>(.*?)</td>", settings)
    assert "ablation sites" in cells and "truncation relative" in cells and "1e-10" in cells
    assert not [c for c in cells if re.search(r"[{}]|\w\(|^\(|^\[", c)], cells
    rows = rs.timing_rows(inputs.timings)
    assert rows[-1]["phase"] == "total (wall clock)" and rows[0]["time"].endswith(" s")


def test_loader_reads_back_what_was_saved(small_study):
    out, inputs, _ = small_study
    loaded = load_study_artifacts(out)
    assert sorted(loaded.bases) == sorted(inputs.bases)
    for kind, result in inputs.bases.items():
        for name, b in result.bases.items():
            assert torch.equal(loaded.bases[kind].bases[name].C, b.C)
        for name, se in inputs.edges[kind].items():
            got = loaded.edges[kind][name]
            assert torch.equal(got.edges, se.edges) and got.count == se.count
            assert got.section.name == se.section.name
        for site, ex in inputs.examples[kind].items():
            assert loaded.examples[kind][site].tokens == ex.tokens
            assert loaded.examples[kind][site].feature_ids == ex.feature_ids
        assert loaded.logit_effects[kind] == inputs.logit_effects[kind]
        saved = json.loads(json.dumps(inputs.attribution[kind].to_json()))  # tuples -> lists
        assert loaded.attribution[kind].to_json() == saved
    for site, by_kind in inputs.curves.items():
        for kind, c in by_kind.items():
            assert loaded.curves[site][kind].scores == pytest.approx(c.scores, rel=1e-12)
            assert loaded.curves[site][kind].min_k(0.05) == c.min_k(0.05)
    assert loaded.diagnostic == inputs.diagnostic
    assert loaded.settings["ablation_sites"] == list(inputs.settings["ablation_sites"])


def test_loader_without_views_computes_the_shares(small_study, tmp_path):
    import shutil

    out, inputs, _ = small_study
    for f in ("bases", "graphs/lib", "curves"):
        shutil.copytree(out / f, tmp_path / f)
    shutil.copy(out / "study.json", tmp_path / "study.json")
    loaded = load_study_artifacts(tmp_path)
    assert loaded.diagnostic.shares == pytest.approx(inputs.diagnostic.shares, rel=1e-9)
    assert list(loaded.edges) == ["lib"] and not loaded.examples and not loaded.attribution
    html_text = study_report(loaded).to_html()
    assert "Interaction graph (LIB)" in html_text and "Features</h2>" not in html_text


def test_jupyter_view_is_the_report(small_study):
    _, inputs, _ = small_study
    frag = inputs._repr_html_()
    assert "tldGraph.render" in frag and "CircuitsVis.render" in frag and "<h3>Summary" in frag


def test_bases_alone_render():
    site = Site("blocks.0.hook_resid_pre")
    b = _basis(site, 4)
    from tl_degeneracy.engine.basis_result import BasisResult

    html_text = study_report(StudyReportInputs({"pca": BasisResult({site.name: b}, {})})).to_html()
    assert "<h2>Summary</h2>" in html_text and "Settings and timings" in html_text


def _basis(site: Site, k: int, d: int = 6) -> SiteBasis:
    c = torch.eye(d, dtype=torch.float64)[:, :k]
    imp = torch.arange(k, 0, -1, dtype=torch.float64)
    z = torch.zeros(d, dtype=torch.float64)
    return SiteBasis(site, "pca", c, c.T.clone(), imp, z, torch.ones(d, dtype=torch.float64))


def test_result_graph_data_takes_each_features_strongest_inputs():
    a, b = Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid")
    bases = {a.name: _basis(a, 6), b.name: _basis(b, 3)}
    e = torch.tensor(
        [[5.0, 3.0, 1.0, 0.5, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0, 10.0], [1.0] * 6],
        dtype=torch.float64,
    )
    sec = SectionEdges(Section(a, b), e, torch.tensor([0.1, 0.2, 0.3]), 8, "exact")
    strs = [[f" t{s}{p}" for p in range(5)] for s in range(4)]
    ex = {a.name: topk_examples(torch.rand(4, 5, 6), strs, k=2)}
    le = {b.name: LogitEffects([[(" x", 2.0), ("\n", 1.0)]] * 3, [[(" y", -1.0)]] * 3)}
    data = result_graph_data(
        bases, {sec.section.name: sec}, max_features=4, max_share=0.9, max_inputs=3,
        examples=ex, logit_effects=le, labels={b.name: token_labels(le[b.name])},
    )  # fmt: skip
    pairs = [(e["source"].split(":")[1], e["target"].split(":")[1]) for e in data["edges"]]
    # output 0: 5 + 3 = 80% < 90%, then 1 (90%): stop; output 1: its only input is feature 5,
    # beyond the 4 drawn features: listed as an edge from a feature not drawn; output 2: six
    # equal inputs, capped at 3 (ties in index order)
    assert pairs == [
        ("0", "0"), ("1", "0"), ("2", "0"), ("5", "1"), ("0", "2"), ("1", "2"), ("2", "2")
    ]  # fmt: skip
    outs = {f["id"]: f for f in data["layers"][1]["features"]}
    assert outs[f"{b.name}:0"]["input_total"] == pytest.approx(10.0)
    assert outs[f"{b.name}:2"]["mean_input"] == pytest.approx(0.3)
    assert outs[f"{b.name}:0"]["label"] == "x · ↵"
    assert outs[f"{b.name}:0"]["logits"]["promoted"][0] == (" x", 2.0)
    ins = data["layers"][0]["features"]
    assert len(ins) == 4 and len(ins[0]["examples"]) == 2 and "center" in ins[0]["examples"][0]


def test_summary_sentences_on_known_numbers():
    def curve(scores):
        return AblationCurve("s", "lib", scores, 1.0, higher_is_better=False)

    curves = {
        "blocks.1.hook_resid_mid": {
            "pca": curve({0: 3.0, 8: 1.2, 16: 1.04, 32: 1.0}),
            "lib": curve({0: 3.0, 8: 1.04, 16: 1.01, 32: 1.0}),
        }
    }
    text = " ".join(rs.ablation_sentences(curves, 0.05, "loss"))
    assert "at blocks.1.hook_resid_mid, LIB 8, PCA 16 (unablated 1)" in text
    assert "fewer features than PCA at 1 of 1 ablated sites, as many at 0 and more at 0" in text
    never = {"x": {"lib": curve({0: 3.0, 4: 2.0}), "pca": curve({0: 3.0, 4: 2.5})}}
    first, tally = rs.ablation_sentences({**curves, **never}, 0.05, "loss")
    assert "at x, LIB more than 4, PCA more than 4" in first
    assert "fewer features than PCA at 1 of 2 ablated sites, as many at 0 and more at 0" in tally
    assert "at 1 no evaluated k of either basis is within the tolerance" in tally
    assert rs.duration(4.25) == "4.2 s" and rs.duration(83.2) == "1 min 23 s"
    assert rs.duration(3725) == "1 h 02 min" and rs.duration(math.nan) == "–"
    rows = rs.setting_rows({"kinds": ("lib", "pca"), "t": {"a": 1e-10, "b": None}, "x": True})
    assert rows == [
        {"setting": "kinds", "value": "lib, pca"},
        {"setting": "t a", "value": "1e-10"},
        {"setting": "t b", "value": "–"},
        {"setting": "x", "value": "yes"},
    ]


def test_settings_of_the_study_config_flatten(small_study):
    _, inputs, _ = small_study
    rows = {r["setting"]: r["value"] for r in rs.setting_rows(inputs.settings)}
    cfg = inputs.settings
    assert rows["edge outputs"] == str(cfg["edge_outputs"])
    assert rows["truncation absolute"] == "1e-15" and rows["truncation relative"] == "1e-10"
    assert rows["ablation ks"] == ", ".join(str(k) for k in cfg["ablation_ks"])


def test_diagnostic_sentence_names_each_kind_of_source_once():
    from tl_degeneracy.engine.diagnostics import DominantDirection, SinkDiagnostic

    def direction(site: str, share: float, pos: dict, tok: dict) -> DominantDirection:
        return DominantDirection(site, share, 0.01, [], pos, tok)

    dirs = [
        direction("blocks.3.hook_resid_pre", 0.8, {0: 0.3, 4: 0.1}, {" the": 0.6, "<s>": 0.3}),
        direction("blocks.4.hook_resid_pre", 0.7, {0: 0.3, 4: 0.1}, {" the": 0.6, "<s>": 0.3}),
        direction("blocks.12.hook_resid_pre", 0.99, {0: 0.98}, {"<s>": 0.98}),
    ]
    shares = {d.site: d.share for d in dirs} | {"blocks.0.hook_resid_pre": 0.2}
    text = rs.diagnostic_sentence(SinkDiagnostic(0.5, shares, dirs, 100))
    assert text.startswith("3 of 4 sites have one direction carrying more than 50%")
    assert "(3 pre, 4 pre, 12 pre)" in text
    assert text.count("One direction carries") == 2  # blocks 3 and 12, not 4 again
    assert "Mostly the token ' the'" in text and "Mostly position 0 (token '<s>')" in text
    none = SinkDiagnostic(0.5, {"blocks.0.hook_resid_pre": 0.2, "blocks.1.hook_resid_pre": 0.3}, [])
    assert rs.diagnostic_sentence(none) == (
        "No site has a direction carrying more than 50% of its variance "
        "(the largest share is 30.0%, at 1 pre)."
    )


def test_an_interaction_graph_stands_for_its_sections_and_modules(small_study):
    from tl_degeneracy.engine.edges import InteractionGraph

    _, inputs, _ = small_study
    lib = inputs.bases["lib"]
    modules = {name: [i % 3 for i in range(b.k)] for name, b in lib.bases.items()}
    graph = InteractionGraph(lib, inputs.edges["lib"], modules)
    got = StudyReportInputs({"lib": lib}, edges={"lib": graph})
    assert got.edges["lib"] == inputs.edges["lib"] and got.modules["lib"] == modules
    html_text = study_report(got).to_html()
    assert '"module":2' in html_text


def test_no_module_is_drawn_grey_without_a_legend_entry():
    """`Modules.by_site()` marks a feature that took no part with −1: the report's graph data
    gives it no module (None), as `InteractionGraph`'s own view does; the widget drops any
    negative label the same way."""
    from tl_degeneracy.engine.module_finding import UNASSIGNED
    from tl_degeneracy.viz.graph_widget import module_label, prepare_graph

    a, b = Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid")
    bases = {a.name: _basis(a, 3), b.name: _basis(b, 3)}
    modules = {a.name: [0, UNASSIGNED, 1], b.name: [UNASSIGNED] * 3}
    data = result_graph_data(bases, {}, modules=modules)
    assert [f["module"] for f in data["layers"][0]["features"]] == [0, None, 1]
    assert {f["module"] for f in data["layers"][1]["features"]} == {None}
    widget = prepare_graph(data)
    assert {f["module"] for la in widget["layers"] for f in la["features"]} == {0, 1, None}
    assert module_label(UNASSIGNED) is None and module_label(-3) is None
    assert module_label(2) == 2 and module_label(None) is None
    assert prepare_graph({"layers": [{"features": [{"id": "x", "module": -1}]}]})["layers"][0][
        "features"
    ][0]["module"] is None  # fmt: skip


def test_a_raw_sites_most_important_coordinates_are_shown_with_their_edges():
    """A raw final site's coordinates are in model order: the graph lists the ones of largest
    variance, most important first, and their edges are the rows of those coordinates; edges
    computed into the truncated basis (its first columns) cover only those."""
    a, b = Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_post")
    eye = torch.eye(6, dtype=torch.float64)
    imp = torch.tensor([1.0, 5.0, 2.0, 6.0, 0.5, 3.0], dtype=torch.float64)
    raw = SiteBasis(b, "raw", eye, eye.clone(), imp, torch.zeros(6, dtype=torch.float64), imp)
    bases = {a.name: _basis(a, 6), b.name: raw}
    e = torch.arange(36, dtype=torch.float64).reshape(6, 6) + 1.0  # row i: inputs of coord i
    sec = SectionEdges(Section(a, b), e, torch.arange(6, dtype=torch.float64), 8, "exact")
    data = result_graph_data(bases, {sec.section.name: sec}, max_features=3, max_inputs=6)
    outs = data["layers"][1]["features"]
    assert [f["label"] for f in outs] == ["3", "1", "5"]
    assert [f["input_total"] for f in outs] == [float(e[i].sum()) for i in (3, 1, 5)]
    assert [f["mean_input"] for f in outs] == [3.0, 1.0, 5.0]
    targets = {x["target"] for x in data["edges"]}
    assert targets == {f"{b.name}:{i}" for i in (3, 1, 5)}
    strongest = next(x for x in data["edges"] if x["target"] == f"{b.name}:3")
    assert strongest == {"source": f"{a.name}:5", "target": f"{b.name}:3", "weight": 24.0}
    # edges into `raw.truncated(2)`: rows for coordinates 0 and 1; of those, 1 is shown
    cut = SectionEdges(Section(a, b), e[:2], torch.zeros(2, dtype=torch.float64), 8, "exact")
    data = result_graph_data(bases, {cut.section.name: cut}, max_features=3)
    assert {x["target"] for x in data["edges"]} == {f"{b.name}:1"}
    outs = {f["label"]: f for f in data["layers"][1]["features"]}
    assert outs["1"]["input_total"] == float(e[1].sum()) and "input_total" not in outs["3"]


def test_a_raw_sites_views_are_saved_and_found_by_feature_id(tmp_path):
    """Examples and logit effects of a raw site's most important coordinates (3, 1, 5) keep
    their feature ids through `save_report_views`/`load_report_views`: the graph and the
    feature tables give each coordinate its own, before and after (on the old code, a saved
    file had no ids and the graph looked rows up by position)."""
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.viz.report_artifacts import load_report_views, save_report_views

    site = Site("blocks.0.hook_resid_post")
    eye = torch.eye(6, dtype=torch.float64)
    imp = torch.tensor([1.0, 5.0, 2.0, 6.0, 0.5, 3.0], dtype=torch.float64)
    raw = SiteBasis(site, "raw", eye, eye.clone(), imp, torch.zeros(6, dtype=torch.float64), imp)
    top = raw.importance_order()[:3].tolist()
    assert top == [3, 1, 5]
    acts = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0))
    strs = [[f" w{s}{p}" for p in range(4)] for s in range(5)]
    ex = topk_examples(acts[..., top], strs, k=2, feature_ids=top)
    le = LogitEffects([[(f" up{j}", 1.0)] for j in top], [[(f" dn{j}", -1.0)] for j in top], top)
    inputs = StudyReportInputs(
        {"lib": BasisResult({site.name: raw}, {})},
        examples={"lib": {site.name: ex}},
        logit_effects={"lib": {site.name: le}},
    )
    save_report_views(inputs, tmp_path)
    saved = json.loads((tmp_path / "examples_lib.json").read_text())
    assert saved[site.name]["feature_ids"] == [3, 1, 5]
    views = load_report_views(tmp_path, ["lib"])
    back_ex, back_le = views["examples"]["lib"][site.name], views["logit_effects"]["lib"][site.name]
    assert back_ex.feature_ids == back_le.feature_ids == [3, 1, 5] and back_le == le
    for examples, effects in ((ex, le), (back_ex, back_le)):
        data = result_graph_data(
            {site.name: raw}, {}, max_features=4, examples={site.name: examples},
            logit_effects={site.name: effects}, labels={site.name: token_labels(effects)},
        )  # fmt: skip
        feats = data["layers"][0]["features"]
        assert [f["id"].split(":")[1] for f in feats] == ["3", "1", "5", "2"]
        for f in feats[:3]:
            j = int(f["id"].split(":")[1])
            peak = max(acts[:, :, j].max(dim=1).values.tolist())
            first = f["examples"][0]
            assert first["values"][first["center"]] == pytest.approx(peak, abs=1e-4)
            assert f["logits"]["promoted"] == [(f" up{j}", 1.0)] and f["label"] == f"up{j}"
        assert "examples" not in feats[3] and "logits" not in feats[3]  # 2: row 2 is 5's
    loaded = replace(inputs, examples=views["examples"], logit_effects=views["logit_effects"])
    page = study_report(loaded).to_html()
    features = _part(page, "features")
    assert re.findall(r"<tr><td>(LIB \d+)</td>", features) == ["LIB 3", "LIB 1", "LIB 5"]
    assert '"firstDimensionLabels":["LIB 3","LIB 1","LIB 5"]' in features


def test_nan_ablation_scores_leave_the_count_undecided():
    """A NaN score is never within the tolerance, and a curve that cannot be decided is named
    as such and left out of the LIB-vs-PCA tally."""

    def curve(scores, baseline=1.0):
        return AblationCurve("s", "lib", scores, baseline, higher_is_better=False)

    nan = math.nan
    curves = {
        "a": {"lib": curve({0: nan, 8: 1.01, 16: 1.0}), "pca": curve({0: 3.0, 8: 1.2, 16: 1.0})},
        "b": {"lib": curve({0: 3.0, 8: 1.0}, nan), "pca": curve({0: 3.0, 8: 1.0})},
    }
    assert rs.features_needed(curves, 0.05) == {
        "a": {"lib": 8, "pca": 16},
        "b": {"lib": None, "pca": 8},
    }
    first, tally = rs.ablation_sentences(curves, 0.05, "loss")
    assert "at a, LIB 8, PCA 16" in first and "at b, LIB undecided (NaN scores), PCA 8" in first
    assert tally.startswith(
        "LIB needs fewer features than PCA at 1 of 2 ablated sites, as many at 0 and more at 0; "
        "at 1 a NaN score leaves it undecided."
    )
    html_text = study_report(StudyReportInputs({"lib": _result()}, curves=curves)).to_html()
    ablation = _part(html_text, "ablation")
    assert "<td>–</td>" in ablation and "<td>0</td>" not in ablation


def _result():
    from tl_degeneracy.engine.basis_result import BasisResult

    site = Site("blocks.0.hook_resid_pre")
    return BasisResult({site.name: _basis(site, 4)}, {"model": {"model_name": "m"}})


def test_edge_sparsity_is_drawn_as_points_on_a_log_axis(small_study, drawn_figures):
    """Bars on a log axis whose bottom depends on the data misstate the ratios: the report
    draws one point per section and basis on its log axis."""
    _, inputs, _ = small_study
    seen = drawn_figures
    html_text = study_report(StudyReportInputs(inputs.bases, edges=inputs.edges)).to_html()
    (ax,) = next(f for f in seen if f.axes[0].get_ylabel() == "edges for 99% of the weight").axes
    assert ax.get_yscale() == "log" and not ax.patches  # no bars
    needed = rs.edges_needed(inputs.edges)
    lib = [line for line in ax.lines if line.get_label() == "LIB"]
    assert list(lib[0].get_ydata()) == [float(v["lib"]) for v in needed.values()]
    assert "one point per section and basis (log scale" in html_text


def test_a_rerendered_report_states_the_run_as_the_first_page(small_study, tmp_path):
    """The page `write_study` writes and a later `tl-degeneracy report` state the same total
    time and timings as `summary.json`, and the settings list the ablation ks that ran (each
    clipped to its basis's width), not the ones asked for."""
    from dataclasses import replace

    from tl_degeneracy.experiments.study import Study
    from tl_degeneracy.experiments.study_output import write_study

    out, _, _ = small_study
    study = Study.load(out)
    study.config = replace(study.config, ablation_ks=(0, 4, 16, 64, 576))
    study.timings = {"fit_s": 2.0, "total_s": 2.0}
    write_study(study, tmp_path)
    assert cli.main(["report", str(tmp_path), "--page", str(tmp_path / "again.html")]) == 0
    first, again = (tmp_path / "report.html").read_text(), (tmp_path / "again.html").read_text()
    total = json.loads((tmp_path / "summary.json").read_text())["timings_s"]["total_s"]
    assert total == study.timings["total_s"] > 2.0
    said = [re.findall(r"; ([^;]*?) in all\.", p) for p in (first, again)]
    assert said[0] == said[1] == [rs.duration(total)]
    assert _part(first, "settings") == _part(again, "settings")
    ran = sorted(
        {k for by_kind in study.curves.values() for c in by_kind.values() for k in c.scores}
    )
    cells = re.findall(r"<td>(.*?)</td>", _part(first, "settings"))
    assert cells[cells.index("ablation ks") + 1] == ", ".join(map(str, ran))
    assert "576" not in cells[cells.index("ablation ks") + 1]
