"""A caller's hook on the model is part of the model every pass sees: the structures that
compute from the weights step aside while any module carries a forward hook
(`compat.forward_hooks_on`), so that a fit, its edges, node and edge ablation and the SGLD
loss describe the model as it runs. Checked on a LayerNorm-free model, whose sections all
have such structures, against a copy with the hook's effect written into its weights."""

from __future__ import annotations

import copy

import pytest
import torch
from support import random_tokens, tiny_model

from tl_degeneracy.engine.ablation import node_ablation_curve
from tl_degeneracy.engine.compat import forward_hooks_on
from tl_degeneracy.engine.degeneracy.problems import ModelProblem
from tl_degeneracy.engine.edge_ablation import edge_ablation_score
from tl_degeneracy.engine.edges import interaction_graph
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures import structure_of

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid"),
    Site("blocks.1.hook_resid_pre"),
    Site("blocks.1.hook_resid_mid"),
    Site("logits", "last"),
)


def _doubled_mlp_out(model):
    """A copy of `model` whose block-0 MLP output weights are doubled: what a hook doubling
    `blocks.0.mlp.hook_post` computes."""
    baked = copy.deepcopy(model)
    weights = baked.state_dict(keep_vars=True)
    [name] = [n for n in weights if n in ("blocks.0.mlp.W_out", "blocks.0.mlp.out.weight")]
    with torch.no_grad():
        weights[name].mul_(2.0)
    return baked


def _metric(logits, tokens):
    return logits[:, -1, 3] - logits[:, -1, 4]


_metric.last_position_only = True  # type: ignore[attr-defined]  # as last_position_accuracy


def _everything(model, lib, toks):
    """What each pass computes on `model`: the fit's importances, the edges, a node-ablation
    curve read through the last block's written-out tail, an edge-ablation score and the
    SGLD problem's reference log-probabilities."""
    fit = fit_basis(model, toks, LIBConfig(SITES, progress=False, batch_size=48))
    graph = interaction_graph(model, toks[:48], lib, progress=False)
    curve = node_ablation_curve(
        model, lib, "blocks.1.hook_resid_pre", toks[:48], _metric, ks=[1, 3], progress=False
    )
    b_in, b_out = lib["blocks.0.hook_resid_mid"], lib["blocks.1.hook_resid_pre"]
    mask = torch.zeros(b_out.C.shape[1], b_in.C.shape[1], dtype=torch.bool)
    mask[:, :2] = True
    edge = edge_ablation_score(model, toks[:48], b_in, b_out, mask, _metric)
    reference = ModelProblem(model, toks[:16], positions="last").reference
    return (
        [fit[s.name].importance for s in SITES[:-1]],
        [s.edges for s in graph.sections.values()],
        [curve.baseline, *curve.scores.values()],
        edge,
        reference,
    )


@pytest.mark.filterwarnings("ignore:this basis was fitted")  # on the doubled copy, on purpose
def test_a_callers_steering_hook_is_seen_by_every_pass(api):
    model = tiny_model(api, "mlp", n_layers=2)
    toks = random_tokens(model, 96)
    baked = _doubled_mlp_out(model)
    lib = fit_basis(baked, toks, LIBConfig(SITES, progress=False, batch_size=48))
    section = Section(SITES[1], SITES[2])
    fast = structure_of(model, section).kind
    assert fast != "generic" and not forward_hooks_on(model)
    expected = _everything(baked, lib, toks)

    model.add_hook("blocks.0.mlp.hook_post", lambda act, hook=None: act * 2.0)
    try:
        assert forward_hooks_on(model)
        assert structure_of(model, section).kind in ("generic", "block_local")
        got = _everything(model, lib, toks)
    finally:
        model.reset_hooks()
    assert structure_of(model, section).kind == fast  # the weights' structures are back

    for g, e in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert got[2] == pytest.approx(expected[2], rel=1e-9, abs=1e-12)
    assert got[3] == pytest.approx(expected[3], rel=1e-9, abs=1e-12)
    torch.testing.assert_close(got[4], expected[4], rtol=1e-9, atol=1e-12)
    # and the hook made a difference: without it the model is another one
    without = _everything(model, lib, toks)
    assert abs(without[3] - expected[3]) > 0.01
    assert float((without[0][0] - expected[0][0]).abs().max()) > 1e-3
