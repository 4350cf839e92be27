"""The written-out last layer equals the model's own forward on both TransformerLens APIs."""

import pytest
import torch

from tl_degeneracy.engine.compat import hooked_state_dict
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.engine.structures import structure_of
from tl_degeneracy.engine.structures.plain import PlainBlock, PlainModel, PlainTail, is_plain


@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post"])
def test_tail_logits_equal_model(api, tiny, tokens_for, hook):
    model = tiny(api)
    toks = tokens_for(model, 12)
    tail = PlainTail.of(model)
    assert tail is not None
    (act,) = capture_sites(model, toks, [Site(f"blocks.0.{hook}")])
    queries = [1, toks.shape[1] - 1]
    ours = tail.logits(f"blocks.0.{hook}", act.to(torch.float64), queries)
    torch.testing.assert_close(
        ours, model(toks)[:, queries].to(torch.float64), rtol=1e-10, atol=1e-10
    )


def test_attention_equals_hooked_attention_output(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 12)
    block = PlainBlock.of(model, 0)
    pre, mid = capture_sites(
        model, toks, [Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid")]
    )
    queries = torch.arange(toks.shape[1])
    torch.testing.assert_close(pre + block.attention(pre, queries), mid, rtol=1e-10, atol=1e-10)


def test_two_layer_tail_enters_at_previous_resid_post(api, tiny, tokens_for):
    model = tiny(api, n_layers=2)
    toks = tokens_for(model, 8)
    tail = PlainTail.of(model)
    assert (
        tail.stage("blocks.0.hook_resid_post") == "pre"
        and tail.stage("blocks.0.hook_resid_mid") is None
    )
    (act,) = capture_sites(model, toks, [Site("blocks.0.hook_resid_post")])
    ours = tail.logits("blocks.0.hook_resid_post", act, [toks.shape[1] - 1])
    torch.testing.assert_close(ours, model(toks)[:, -1:], rtol=1e-10, atol=1e-10)


def test_models_with_normalisation_are_not_plain(api, tiny):
    model = tiny(api, "ln")
    assert not is_plain(model) and PlainTail.of(model) is None and PlainBlock.of(model, 0) is None
    plain = tiny(api)
    pre, mid = Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid", "last")
    attention = structure_of(plain, Section(pre, mid))
    assert attention.kind == "attention" and attention.every_input_position
    assert not structure_of(plain, Section(pre.with_positions("last"), mid)).every_input_position
    assert structure_of(model, Section(pre, mid)).kind in ("block_local", "generic")


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_layers": 2, "act_fn": "gelu"}, {"n_layers": 2, "attn_only": True, "d_mlp": None}],
    ids=["one-layer", "two-layer-gelu", "attn-only"],
)
@pytest.mark.parametrize("n_seq", [4, 40], ids=["embed", "token-table"])
@pytest.mark.parametrize("n_ctx", [4, 40], ids=["few-positions", "many-positions"])
def test_whole_model_logits_equal_model(api, tiny, tokens_for, overrides, n_seq, n_ctx):
    """`PlainModel.logits` equals the model's forward at chosen positions, with block 0's
    projections computed per input (fewer sequences than tokens) or looked up in a
    (position, token) table (more)."""
    model = tiny(api, n_ctx=n_ctx, **overrides)
    toks = tokens_for(model, n_seq)
    plain = PlainModel.of(model)
    assert plain is not None
    queries = [0, toks.shape[1] - 1]
    expected = model(toks)[:, queries]
    torch.testing.assert_close(plain.logits(toks, queries), expected, rtol=1e-10, atol=1e-10)
    if model.cfg.n_layers > 1:
        (resid,) = capture_sites(model, toks, [Site("blocks.1.hook_resid_pre")])
        ours = plain.logits(None, queries, resid=resid, start_layer=1)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_whole_model_is_differentiable_in_the_model_parameters(api, tiny, tokens_for):
    """Written out in `hooked_state_dict(keep_vars=True)` weights, the logits back-propagate
    into the model's own parameters exactly as the model's forward does."""
    model = tiny(api, n_layers=2)
    toks = tokens_for(model, 30)
    plain = PlainModel.of(model, hooked_state_dict(model, keep_vars=True), dtype=None)
    params = list(model.parameters())
    ours = torch.autograd.grad(plain.logits(toks, [3]).square().sum(), params, allow_unused=True)
    theirs = torch.autograd.grad(model(toks)[:, [3]].square().sum(), params, allow_unused=True)
    assert sum(g is not None for g in ours) == sum(g is not None for g in theirs) > 10
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
