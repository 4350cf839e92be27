"""circuitsvis feature views, the top-k computation and the logit-effects table."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

from tl_degeneracy.viz import (
    LogitEffects,
    TopkExamples,
    feature_activations_view,
    logit_effects_view,
    top_logit_effects,
    topk_examples,
    topk_examples_view,
)

HOSTILE = "<img src=x onerror=alert(1)>"
BREAKOUT = "</script><script>alert(2)</script>"


def _props(fragment_html: str) -> dict:
    """The props object passed to CircuitsVis.render in a widget script."""
    m = re.search(r"CircuitsVis\.render\(id,CircuitsVis\.\w+,(.*)\);}catch", fragment_html)
    assert m, fragment_html[:300]
    return json.loads(m.group(1))


def test_feature_activations_view_escapes_tokens():
    toks = ["a", HOSTILE, BREAKOUT, " b&c"]
    frag = feature_activations_view(toks, torch.randn(4, 3), ["f0", BREAKOUT, "f2"])
    assert HOSTILE not in frag.html and "</script><script>" not in frag.html
    assert frag.html.count("<script") == 1
    props = _props(frag.html)
    # circuitsvis writes tokens as innerHTML, so they travel HTML-escaped; labels are React text
    assert props["tokens"] == [html.escape(t, quote=False) for t in toks]
    assert props["labels"] == ["f0", BREAKOUT, "f2"]
    assert np.asarray(props["values"]).shape == (4, 3)
    assert frag.assets and frag.assets[0].key.startswith("circuitsvis-")


def test_feature_activations_view_limits_features_and_checks_shapes():
    acts = np.zeros((2, 50))
    acts[0, 7], acts[1, 3] = 5.0, -4.0
    props = _props(feature_activations_view(["x", "y"], acts, max_features=2).html)
    assert props["labels"] == ["3", "7"]
    with pytest.raises(ValueError):
        feature_activations_view(["x"], acts)
    with pytest.raises(ValueError):
        feature_activations_view(["x", "y"], acts, ["only one"])


def _brute_topk(x: torch.Tensor, lengths: list[int], k: int, per_seq: bool):
    """Reference: loop over features, rank (seq, pos) pairs by value."""
    out = []
    for f in range(x.shape[2]):
        cands = []
        for s in range(x.shape[0]):
            vals = [(x[s, p, f].item(), s, p) for p in range(lengths[s])]
            cands += [max(vals)] if per_seq else vals
        out.append(sorted(cands, key=lambda c: -c[0])[:k])
    return out


@pytest.mark.parametrize("per_seq", [True, False])
def test_topk_examples_matches_brute_force(per_seq):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 9, 5, generator=g)
    lengths = [9, 4, 9, 9, 2, 9, 6]
    strs = [[f"s{s}p{p}" for p in range(n)] for s, n in enumerate(lengths)]
    ex = topk_examples(x, strs, k=4, context=(3, 1), one_per_sequence=per_seq)
    ref = _brute_topk(x, lengths, 4, per_seq)
    assert ex.values.shape == (5, 4)
    for f in range(5):
        assert torch.allclose(ex.values[f], torch.tensor([c[0] for c in ref[f]]))
        for e, (_, s, p) in enumerate(ref[f]):
            assert (ex.seq_idx[f, e].item(), ex.pos_idx[f, e].item()) == (s, p)
            lo, hi = max(0, p - 3), min(lengths[s], p + 2)
            assert ex.tokens[f][e] == strs[s][lo:hi]
            assert ex.acts[f][e] == pytest.approx(x[s, lo:hi, f].tolist())
            assert ex.tokens[f][e][ex.center[f][e]] == strs[s][p]
    assert "[[" in ex.snippets(0)[0]
    assert ex.graph_examples(0)[0]["tokens"] == ex.tokens[0][0]


def test_topk_examples_absolute_ranks_by_magnitude():
    x = torch.zeros(3, 2, 1)
    x[1, 1, 0] = -9.0
    x[2, 0, 0] = 1.0
    ex = topk_examples(x, [["a", "b"]] * 3, k=1, absolute=True)
    assert ex.values[0, 0].item() == -9.0 and ex.seq_idx[0, 0].item() == 1


def test_topk_examples_view_escapes_tokens():
    x = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(0))
    strs = [["a", HOSTILE, "c", "d"]] * 3
    frag = topk_examples_view(topk_examples(x, strs, k=2), [BREAKOUT, "g"], site=BREAKOUT)
    assert HOSTILE not in frag.html and "</script><script>" not in frag.html
    props = _props(frag.html)
    flat = [t for sample in props["tokens"][0][0] for t in sample]
    assert html.escape(HOSTILE, quote=False) in flat
    assert props["firstDimensionLabels"] == [BREAKOUT, "g"]
    assert props["zerothDimensionLabels"] == [BREAKOUT]
    acts = props["activations"]
    assert len(acts) == 1 and [len(f) for f in acts[0]] == [2, 2]
    assert [[len(s) for s in f] for f in acts[0]] == [
        [len(s) for s in f] for f in props["tokens"][0]
    ]


def test_logit_effects_table_escapes_everything():
    frag = logit_effects_view({BREAKOUT: [(HOSTILE, 1.0)]}, {BREAKOUT: [("\n", -2.0)]})
    assert HOSTILE not in frag.html and BREAKOUT not in frag.html
    assert "&lt;img src=x onerror=alert(1)&gt;" in frag.html
    assert "<script" not in frag.html and "\u21b5" in frag.html
    assert frag.html.count("<tr>") == 2


def test_top_logit_effects():
    eff = torch.tensor([[0.0, 3.0, -1.0, 2.0], [1.0, -5.0, 0.5, 0.0]])
    vocab = ["a", "b", "c", "d"]
    promoted, suppressed = top_logit_effects(eff, vocab, k=2)
    assert promoted == [[("b", 3.0), ("d", 2.0)], [("a", 1.0), ("c", 0.5)]]
    assert suppressed[1] == [("b", -5.0), ("d", 0.0)]
    frag = logit_effects_view(promoted, suppressed, ["f0", "f1"])
    assert frag.html.count("tld-tok-pos") == 4


def test_topk_examples_from_token_ids():
    x = torch.zeros(2, 3, 1)
    x[1, 2, 0] = 1.0
    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    ex = topk_examples(x, ids, k=1, context=(1, 0), vocab=["a", "b", "c"])
    assert ex.tokens[0][0] == ["b", "a"]
    assert topk_examples(x, ids, k=1, vocab=lambda i: f"<{i}>").tokens[0][0][-1] == "<0>"
    with pytest.raises(ValueError, match="vocab"):
        topk_examples(x, ids)


def test_nan_activations_are_marked_missing_and_never_ranked():
    """circuitsvis would draw a NaN as 0: the token is marked [NaN] (and counted above the
    view), and a NaN is never a top-activating example."""
    frag = feature_activations_view(["a", "b"], torch.tensor([[float("nan"), 2.0], [1.0, 0.5]]))
    props = _props(frag.html)
    assert props["tokens"] == ["a [NaN]", "b"] and props["labels"] == ["0 (NaN at 1)", "1"]
    assert "1 value is NaN or infinite (missing)" in frag.html
    x = torch.tensor([[[float("nan")], [0.5]], [[2.0], [1.0]], [[0.2], [0.1]]])
    ex = topk_examples(x, [["p", "q"]] * 3, k=2)
    assert ex.seq_idx[0].tolist() == [1, 0] and ex.values[0].tolist() == [2.0, 0.5]
    flat = [t for s in _props(topk_examples_view(ex).html)["tokens"][0][0] for t in s]
    assert flat == ["p", "q", "p [NaN]", "q"]
    assert "tld-missing" not in feature_activations_view(["a"], torch.ones(1, 1)).html


def test_nan_logit_effects_are_never_ranked():
    eff = torch.tensor([[float("nan"), 1.0, 2.0], [float("nan")] * 3])
    promoted, suppressed = top_logit_effects(eff, ["nan-token", "b", "c"], k=2)
    assert promoted == [[("c", 2.0), ("b", 1.0)], []]
    assert suppressed == [[("b", 1.0), ("c", 2.0)], []]


def test_long_and_blank_tokens_are_cut_and_shown():
    """A 200-character token does not push the table or the views off the page (cut with an
    ellipsis, in CSS with the full text in the tooltip, in the circuitsvis views in the data),
    and blank or newline tokens show as ␣ and ↵ in every view."""
    from tl_degeneracy.viz.feature_views import CV_TOKEN_CHARS, visible_token
    from tl_degeneracy.viz.graph_widget import graph_assets
    from tl_degeneracy.viz.html import BASE_CSS

    long = "L" * 200
    assert visible_token(" ") == "\u2423" and visible_token("  ") == "\u2423\u2423"
    assert visible_token("\n") == "\u21b5" and visible_token(" the") == " the"
    props = _props(feature_activations_view([long, " ", "\n", " a"], torch.ones(4, 1)).html)
    assert props["tokens"] == ["L" * (CV_TOKEN_CHARS - 1) + "\u2026", "\u2423", "\u21b5", " a"]
    frag = logit_effects_view([[(long, 1.0), (" ", 0.5)]], [[("x", -1.0)]])
    assert f'title="{html.escape(repr(long))}"' in frag.html and "\u2423" in frag.html
    tok_rule = re.search(r"\.tld-tok \{([^}]*)\}", BASE_CSS).group(1)
    assert "text-overflow: ellipsis" in tok_rule and "max-width" in tok_rule
    css = next(a.source for a in graph_assets() if a.kind == "css")
    chip_rule = re.search(r"\.tld-chip \{([^}]*)\}", css).group(1)
    assert "text-overflow: ellipsis" in chip_rule and "max-width" in chip_rule
    assert "overflow-wrap: anywhere" in re.search(r"\.tld-ex-tok \{([^}]*)\}", css).group(1)


def test_examples_and_logit_effects_are_found_by_feature_id():
    """Rows hold the features `feature_ids` names (default 0..n-1); `row_of` finds a
    feature's row, `subset` keeps the ids of its rows, the view labels rows by their ids."""
    x = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0))
    strs = [["a", "b", "c"]] * 4
    plain = topk_examples(x, strs, k=2)
    assert plain.feature_ids == [0, 1, 2] and plain.row_of(2) == 2 and plain.row_of(3) is None
    ex = topk_examples(x, strs, k=2, feature_ids=[57, 11, 82])
    assert [ex.row_of(f) for f in (57, 11, 82, 0)] == [0, 1, 2, None]
    assert torch.equal(ex.values, plain.values)  # the ids name the rows, nothing else changes
    sub = ex.subset([2, 0])
    assert sub.feature_ids == [82, 57] and sub.tokens == [ex.tokens[2], ex.tokens[0]]
    props = _props(topk_examples_view(ex, site="s", features=[82, 5, 57]).html)
    assert props["firstDimensionLabels"] == ["82", "57"]  # 5 has no examples: left out
    assert props["activations"][0] == [ex.acts[2], ex.acts[0]]
    le = LogitEffects.from_effects(torch.eye(3), ["a", "b", "c"], k=1, feature_ids=[57, 11, 82])
    assert le.promoted[le.row_of(82)] == [("c", 1.0)] and le.row_of(0) is None
    assert LogitEffects([[]], [[]]).feature_ids == [0]
    with pytest.raises(ValueError, match="2 feature ids for 3 rows"):
        topk_examples(x, strs, feature_ids=[1, 2])
    with pytest.raises(ValueError, match="repeated"):
        LogitEffects([[], []], [[], []], [4, 4])


def test_feature_ids_round_trip_and_old_files_load():
    """`to_json`/`from_json` keep the ids (through JSON text); a dict written before there
    were ids (no `feature_ids`) loads as features 0..n-1."""
    x = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(1))
    ex = topk_examples(x, [["p", "q", "r", "s"]] * 3, k=2, feature_ids=[9, 3])
    back = TopkExamples.from_json(json.loads(json.dumps(ex.to_json())))
    assert back.feature_ids == [9, 3] and back.row_of(3) == 1
    assert back.tokens == ex.tokens and torch.allclose(back.values, ex.values)
    le = LogitEffects([[("a", 1.0)], [("b", 2.0)]], [[("c", -1.0)], []], [9, 3])
    assert LogitEffects.from_json(json.loads(json.dumps(le.to_json()))) == le
    old_ex = {k: v for k, v in ex.to_json().items() if k != "feature_ids"}
    assert TopkExamples.from_json(old_ex).feature_ids == [0, 1]
    old_le = {"promoted": [[["a", 1.0]]], "suppressed": [[["b", -1.0]]]}
    assert LogitEffects.from_json(old_le) == LogitEffects([[("a", 1.0)]], [[("b", -1.0)]], [0])
