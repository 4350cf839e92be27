"""Report views from a model: composite features with no fixed stream direction, and a raw
site whose most important features are not its first columns."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from support import APIS, post_norm_model, random_tokens, tiny_model

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import has_hooked_transformer
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.logit_effects import direct_logit_effects
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.experiments.report_views import (
    add_model_views,
    feature_examples,
    feature_logit_effects,
)
from tl_degeneracy.viz.feature_views import topk_examples
from tl_degeneracy.viz.graph_data import result_graph_data, token_labels
from tl_degeneracy.viz.report import StudyReportInputs, study_report


@pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TL < 4")
def test_logit_effects_leave_out_composite_sites_behind_a_norm():
    """Norms after attention and the MLP: the residual site gets its logit effects, the MLP
    site is left out with a warning saying why (instead of the report failing)."""
    model = post_norm_model()
    sites = (Site("blocks.0.hook_resid_pre"), Site("blocks.0.mlp.hook_post"), Site("logits"))
    result = fit_basis(model, random_tokens(model, 40), LIBConfig(sites, progress=False))
    names = ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"]
    with pytest.warns(UserWarning, match="no logit effects at blocks.0.mlp.hook_post"):
        effects = feature_logit_effects(model, result, str, names, n_features=3, k=2)
    assert list(effects) == ["blocks.0.hook_resid_pre"]
    want = direct_logit_effects(model, result["blocks.0.hook_resid_pre"], range(3))
    top = want[0].topk(2).indices.tolist()
    assert [t for t, _ in effects["blocks.0.hook_resid_pre"].promoted[0]] == [str(i) for i in top]


def _raw_logits_basis(model, order: list[int]) -> SiteBasis:
    """A raw basis at the logits site whose importances rank its columns as `order` (feature
    `j` is logit `j`, its direction the one-hot row `j` of `C⁺`)."""
    d = model.cfg.d_vocab
    eye = torch.eye(d, dtype=torch.float64)
    imp = torch.zeros(d, dtype=torch.float64)
    imp[torch.tensor(order)] = torch.arange(len(order), 0, -1, dtype=torch.float64)
    mean = torch.zeros(d, dtype=torch.float64)
    return SiteBasis(Site("logits"), "raw", eye, eye.clone(), imp, mean, imp.sort()[0])


@pytest.mark.parametrize("api", APIS)
def test_views_cover_a_raw_sites_most_important_features(api):
    """A raw final site ranks its coordinates by variance, not by column: the report's views
    (the graph, the feature tables) show the most important first, so the examples and logit
    effects are those features' own, found by feature id (old code: the first columns'
    examples, none for the graph's top features)."""
    model = tiny_model(api)
    tokens = random_tokens(model, 12)
    order = [7, 2, 9, 4, 0, 1, 3, 5, 6, 8, 10]
    b = _raw_logits_basis(model, order)
    assert b.importance_order().tolist() == order
    inputs = add_model_views(
        StudyReportInputs({"lib": BasisResult({"logits": b}, {})}), model, tokens, str,
        logit_sites=["logits"], n_features=3, k=4,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(tokens).to(torch.float64)  # [n, pos, vocab]: feature j = logit j
    best = logits.max(dim=1).values  # one example per sequence

    ex, le = inputs.examples["lib"]["logits"], inputs.logit_effects["lib"]["logits"]
    data = result_graph_data(
        {"logits": b}, {}, max_features=4, examples=inputs.examples["lib"],
        logit_effects=inputs.logit_effects["lib"], labels={"logits": token_labels(le)},
    )  # fmt: skip
    feats = data["layers"][0]["features"]
    assert [f["id"] for f in feats] == ["logits:7", "logits:2", "logits:9", "logits:4"]
    for f in feats[:3]:
        j = int(f["id"].split(":")[1])
        peaks = [e["values"][e["center"]] for e in f["examples"]]  # the graph shows 3 of 4
        assert peaks == pytest.approx(best[:, j].topk(3).values.tolist(), abs=1e-4), j
        assert f["logits"]["promoted"][0] == (str(j), 1.0) and f["label"].startswith(str(j))
    assert "examples" not in feats[3] and "logits" not in feats[3] and feats[3]["label"] == "4"

    assert ex.feature_ids == le.feature_ids == [7, 2, 9]
    for j in [7, 2, 9]:
        r = ex.row_of(j)
        assert torch.allclose(ex.values[r].double(), best[:, j].topk(4).values, atol=1e-5), j
        assert le.promoted[le.row_of(j)][0] == (str(j), 1.0)
    assert ex.row_of(0) is None and le.row_of(4) is None

    # the report's feature tables name the same features, most important first
    page = study_report(replace(inputs, feature_sites=["logits"])).to_html()
    part = page[page.index('data-part="features"') :]
    props = json.loads(re.search(r"CircuitsVis\.TopkSamples,(.*?)\);}catch", part).group(1))
    assert props["firstDimensionLabels"] == ["LIB 7", "LIB 2", "LIB 9"]
    assert props["activations"][0][0] == ex.acts[ex.row_of(7)]
    table = part[part.index("tld-logit-effects") :]
    assert re.findall(r"<tr><td>(LIB \d+)</td>", table) == ["LIB 7", "LIB 2", "LIB 9"]


def test_sorted_bases_keep_their_first_features():
    """For a sorted basis the most important features are its first columns: ids 0..n-1, the
    examples as before (the first columns of the features)."""
    model = tiny_model(APIS[0])
    tokens = random_tokens(model, 8)
    b = _raw_logits_basis(model, list(range(11)))
    ex = feature_examples(model, {"logits": b}, tokens, str, n_features=3, k=2)["logits"]
    assert ex.feature_ids == [0, 1, 2]
    with torch.no_grad():
        logits = model(tokens).to(torch.float64)
    want = topk_examples(logits[..., :3], [[str(int(t)) for t in r] for r in tokens], k=2)
    assert torch.equal(ex.values, want.values) and ex.tokens == want.tokens
