"""Edges required into a section's top output features (experiments.lm_edges_required),
held to the generic edge-ablation path on small random pre-norm models."""

from __future__ import annotations

import pytest
import torch
from support import DEVICES, random_tokens, tiny_model

from tl_degeneracy.engine.ablation import evaluate, next_token_loss
from tl_degeneracy.engine.bases import pca_basis
from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.edge_ablation import edge_ablation_score
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.engine.structures import autograd_only
from tl_degeneracy.experiments.lm_edges_required import TopOutputAblator, top_output_edges_required

SECTIONS = {
    "attention": ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"),
    "mlp": ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"),
}
N_TOP = 3


def setup(section: str):
    model = tiny_model(available_apis()[0], "ln", n_layers=2, n_ctx=6, d_vocab=13)
    tokens = random_tokens(model, 10)
    sites = [Site(h) for h in SECTIONS[section]]
    stats = collect_statistics(model, sites, tokens, progress=False)
    b_in, b_out = (pca_basis(s, stats[s].mean, stats[s].gram) for s in sites)
    return model, tokens, b_in, b_out


@pytest.mark.parametrize("section", SECTIONS)
def test_all_edges_give_the_clean_loss(section):
    model, tokens, b_in, b_out = setup(section)
    ablator = TopOutputAblator(model, tokens, b_in, b_out, N_TOP)
    clean = evaluate(model, tokens, next_token_loss)
    keep_all = torch.ones(N_TOP, b_in.k, dtype=torch.bool)
    assert ablator.loss(keep_all) == pytest.approx(clean, abs=1e-12)
    assert ablator.loss(~keep_all) != pytest.approx(clean, abs=1e-3)  # ablation does something


@pytest.mark.parametrize("section", SECTIONS)
def test_equals_generic_path_with_other_outputs_kept_whole(section):
    model, tokens, b_in, b_out = setup(section)
    ablator = TopOutputAblator(model, tokens, b_in, b_out, N_TOP)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        mask = torch.rand(N_TOP, b_in.k, generator=gen) < 0.5
        full = torch.ones(b_out.k, b_in.k, dtype=torch.bool)
        full[:N_TOP] = mask
        with autograd_only():
            generic = edge_ablation_score(model, tokens, b_in, b_out, full, next_token_loss)
        assert ablator.loss(mask) == pytest.approx(generic, abs=1e-10)


def test_bisection_returns_the_boundary():
    model, tokens, b_in, b_out = setup("mlp")
    ablator = TopOutputAblator(model, tokens, b_in, b_out, N_TOP)
    edges = torch.rand(
        N_TOP, b_in.k, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    clean = evaluate(model, tokens, next_token_loss)
    spread = ablator.loss(torch.zeros(N_TOP, b_in.k, dtype=torch.bool)) - clean
    tol = abs(spread) / 4
    result = top_output_edges_required(ablator, edges, tol, clean, "pca")
    req = result.edges_required
    assert result.total_edges == N_TOP * b_in.k and 1 <= req <= result.total_edges
    assert result.scores[req] - clean <= tol
    assert req == 1 or result.scores[req - 1] - clean > tol  # the next smaller n fails
    again = top_output_edges_required(ablator, edges, tol, clean, "pca", scores=result.scores)
    assert again.edges_required == req


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_on_a_device_gives_the_cpu_loss(device):
    """Bases and masks on the CPU, the model and its activations on `device`."""
    from tl_degeneracy.engine.compat import move_model

    model, tokens, b_in, b_out = setup("mlp")
    mask = torch.rand(N_TOP, b_in.k, generator=torch.Generator().manual_seed(4)) < 0.5
    expected = TopOutputAblator(model, tokens, b_in, b_out, N_TOP).loss(mask)
    moved = move_model(model, device)
    ablator = TopOutputAblator(moved, tokens.to(device), b_in, b_out, N_TOP)
    assert ablator.loss(mask) == pytest.approx(expected, rel=1e-9)
