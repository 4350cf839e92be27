import pytest
import torch

from tl_degeneracy.engine.ablation import evaluate, last_position_accuracy
from tl_degeneracy.engine.edge_ablation import (
    ablated_output_features,
    edge_ablation_score,
    edges_required,
    keep_mask,
)
from tl_degeneracy.engine.edges import section_edges
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures import autograd_only

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)


@pytest.fixture
def setup(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 40)
    return model, toks, fit_basis(model, toks, LIBConfig(SITES, progress=False))


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (2, 3)])
def test_fast_paths_equal_generic(setup, pair):
    model, toks, lib = setup
    b_in, b_out = lib[SITES[pair[0]]], lib[SITES[pair[1]]]
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(b_out.k, b_in.k, generator=gen) < 0.4
    fast = ablated_output_features(model, toks, b_in, b_out, mask)
    with autograd_only():
        slow = ablated_output_features(model, toks, b_in, b_out, mask)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def test_all_edges_kept_is_unablated(setup):
    model, toks, lib = setup
    metric = last_position_accuracy(lambda t: t[:, 1])
    base = evaluate(model, toks, metric)
    for a, b in zip(SITES, SITES[1:]):
        mask = torch.ones(lib[b].k, lib[a].k, dtype=torch.bool)
        assert edge_ablation_score(model, toks, lib[a], lib[b], mask, metric) == base


def test_bisection_finds_smallest_passing_n(setup):
    model, toks, lib = setup
    metric = last_position_accuracy(lambda t: t[:, 1])
    b_in, b_out = lib[SITES[1]], lib[SITES[2]]
    edges = section_edges(model, toks, b_in, b_out, progress=False)
    res = edges_required(model, toks, edges, b_in, b_out, metric, tolerance=0.05)
    n = res.edges_required
    assert n is not None and 1 <= n <= edges.total_edges
    assert res.baseline - res.scores[n] <= 0.05
    if n - 1 in res.scores:
        assert res.baseline - res.scores[n - 1] > 0.05
    assert keep_mask(edges.edges, 3).sum() == 3


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (2, 3)])
def test_scorer_fast_path_equals_hook_path(setup, pair):
    """Rows reached along the path, cached rows, and the closed-form rest of the model give
    the generic path's score for sparse, half and dense masks."""
    from tl_degeneracy.engine.edge_ablation import EdgeAblationScorer

    def metric(logits, tokens):  # continuous, so that no difference hides behind an argmax
        return logits[:, -1].gather(-1, tokens[:, 1:2])[:, 0].to(torch.float64)

    metric.last_position_only = True
    model, toks, lib = setup
    b_in, b_out = lib[SITES[pair[0]]], lib[SITES[pair[1]]]
    fast = EdgeAblationScorer(model, toks, b_in, b_out, metric, batch_size=16)
    with autograd_only():
        slow = EdgeAblationScorer(model, toks, b_in, b_out, metric)
    assert fast.tail is not None and slow.tail is None
    gen = torch.Generator().manual_seed(1)
    for density in (0.1, 0.5, 0.9, 0.5):  # the repeat is served from the row cache
        mask = torch.rand(b_out.k, b_in.k, generator=gen) < density
        mask[0] = True
        mask[1] = False
        assert fast.score(mask) == pytest.approx(slow.score(mask), rel=1e-10, abs=1e-10)


def test_row_path_visits_every_row_once():
    from tl_degeneracy.engine.structures.rows import row_path as _row_path

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(9, 12, generator=gen) < 0.5
    masks[3] = True
    masks[4] = False
    path = _row_path(masks)
    assert sorted(r for r, _ in path) == list(range(9))
    starts = dict(path)
    assert starts[path[0][0]] is not None  # the first row starts from the empty or full row
    assert starts[3] in (True, None) and starts[4] in (False, None)
