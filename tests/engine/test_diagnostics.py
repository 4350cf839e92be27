"""Dominant-direction (attention-sink) diagnostic: shares from the Gram spectrum equal a brute
force eigendecomposition of the captured activations, and a token given a massive embedding is
found and named; leaving its position out removes the flag."""

from __future__ import annotations

import re

import pytest
import torch
from support import tiny_model

from tl_degeneracy.engine.bases import pca_basis
from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.diagnostics import (
    SinkDiagnostic,
    direction_sources,
    dominant_directions,
    top_direction_shares,
)
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites, collect_statistics

API = available_apis()[0]
SINK = 0  # the token given a massive embedding


def _model():
    model = tiny_model(API, "mlp", seed=4, n_layers=2, n_ctx=8, d_vocab=13)
    with torch.no_grad():
        model.W_E[SINK] *= 60.0
    return model


def _tokens(n: int, seed: int, sink_at_zero: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 13, (n, 8), generator=gen)
    if sink_at_zero:
        toks[:, 0] = SINK
    else:  # the sink token at one random position per row
        toks[torch.arange(n), torch.randint(0, 8, (n,), generator=gen)] = SINK
    return toks


def _pca(model, sites, tokens):
    stats = collect_statistics(model, sites, tokens, batch_size=16, progress=False)
    return stats, {s.name: pca_basis(s, stats[s].mean, stats[s].gram) for s in sites}


def decode(i: int) -> str:
    return f"<t{i}>"


def test_share_equals_brute_force_spectrum():
    model, toks = _model(), _tokens(40, 1)
    sites = [Site("blocks.0.hook_resid_pre"), Site("blocks.1.hook_resid_mid")]
    stats, bases = _pca(model, sites, toks)
    acts = capture_sites(model, toks, sites)
    for site, act in zip(sites, acts):
        x = act.reshape(-1, act.shape[-1]).to(torch.float64)
        cov = torch.cov(x.T, correction=0)
        ev = torch.linalg.eigvalsh(cov).flip(0)
        top, second = top_direction_shares(bases)[site.name]
        assert top == pytest.approx(float(ev[0] / ev.sum()), rel=1e-9)
        assert second == pytest.approx(float(ev[1] / ev.sum()), rel=1e-9)
        assert top_direction_shares(stats)[site.name] == pytest.approx((top, second), rel=1e-9)


def test_massive_token_at_position_zero_is_named():
    model, toks = _model(), _tokens(40, 1)
    site = Site("blocks.0.hook_resid_pre")
    _, bases = _pca(model, [site], toks)
    diag = dominant_directions(bases, model, toks, decode, top=6, batch_size=16)
    assert diag.flagged == [site.name] and diag.n_tokens == toks.numel()
    (d,) = diag.directions
    assert d.share > 0.9
    assert {h.position for h in d.hits} == {0} and {h.token for h in d.hits} == {"<t0>"}
    # centred: the sink sits at (1 - 1/8) of its offset from the mean, the 7 other positions
    # at 1/8 each, so it holds 49/56 = 7/8 of the squared projection
    assert d.position_share[0] == pytest.approx(7 / 8, abs=0.01)
    assert d.token_share["<t0>"] == pytest.approx(7 / 8, abs=0.01)
    text = d.explanation()
    assert "Mostly position 0 (token '<t0>')" in text and "attention sink" in text
    assert re.search(r"from tokens '<t0>' 8[78]%, .*; by position 0 8[78]%, ", text)
    # the top hit's projection, by hand
    (act,) = capture_sites(model, toks, [site])
    b = bases[site.name]
    proj = (act.to(torch.float64) - b.mean) @ (b.C[:, 0] / b.C[:, 0].norm())
    for h in d.hits:  # (every row's position 0 ties: the same token at the same position)
        assert h.projection == pytest.approx(float(proj[h.sequence, h.position]), rel=1e-12)
    assert abs(d.hits[0].projection) == pytest.approx(float(proj.abs().max()), rel=1e-12)
    # statistics as the source trace the same direction (up to its sign)
    stats = collect_statistics(model, [site], toks, batch_size=16, progress=False)
    again = dominant_directions(stats, model, toks, decode, top=6, batch_size=16)
    assert [abs(h.projection) for h in again.directions[0].hits] == pytest.approx(
        [abs(h.projection) for h in d.hits], rel=1e-9
    )


def test_leaving_the_position_out_clears_the_flag():
    model, toks = _model(), _tokens(40, 1)
    site = Site("blocks.0.hook_resid_pre", tuple(range(1, 8)))
    _, bases = _pca(model, [site], toks)
    diag = dominant_directions(bases, model, toks, decode)
    assert diag.flagged == [] and diag.shares[site.name] < 0.5


def test_massive_token_at_varying_positions_is_one_token():
    model, toks = _model(), _tokens(64, 2, sink_at_zero=False)
    site = Site("blocks.0.hook_resid_pre")
    _, bases = _pca(model, [site], toks)
    (d,) = dominant_directions(bases, model, toks, decode).directions
    assert max(d.position_share.values()) < 0.5 and d.token_share["<t0>"] > 0.85
    assert "Mostly the token '<t0>', at several positions" in d.explanation()


def test_lib_spectrum_gives_shares_but_no_tokens_and_json_round_trip(tmp_path):
    model, toks = _model(), _tokens(32, 3)
    sites = (Site("blocks.0.hook_resid_pre"), Site("blocks.1.hook_resid_post"))
    lib = fit_basis(model, toks, LIBConfig(sites, progress=False))
    diag = dominant_directions(lib, model, toks, decode)
    assert diag.flagged and not diag.directions[0].located
    assert "not traced" in diag.directions[0].explanation()
    _, bases = _pca(model, list(sites), toks)
    traced = dominant_directions(bases, model, toks, decode)
    assert traced.shares == pytest.approx(diag.shares, rel=1e-9)
    loaded = SinkDiagnostic.load(traced.save(tmp_path / "diag.json"))
    assert loaded == traced


def test_direction_sources_sums_squares_per_position_and_token():
    acts = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.5, 1.0]]])
    ids = torch.tensor([[5, 6], [5, 7]])
    hits, per_pos, per_tok = direction_sources(
        acts, torch.tensor([3, 4]), ids, torch.tensor([1.0, 0.0]), torch.zeros(2), decode, top=2
    )
    assert [(h.sequence, h.position, h.token, h.projection) for h in hits] == [
        (1, 3, "<t5>", 3.0),
        (0, 3, "<t5>", 1.0),
    ]
    assert per_pos.tolist() == [10.0, 0.25]
    assert per_tok == {5: 10.0, 6: 0.0, 7: 0.25}
