"""The written-out last layer equals the model's own forward on both TransformerLens APIs."""

import pytest
import torch

from tl_degeneracy.plain_forward import PlainBlock, PlainTail, attention_layer, is_plain
from tl_degeneracy.sites import Site
from tl_degeneracy.statistics import capture_sites


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
    assert (
        attention_layer(
            plain, Site("blocks.0.hook_resid_pre"), Site("blocks.0.hook_resid_mid", "last")
        )
        == 0
    )
    assert (
        attention_layer(
            plain, Site("blocks.0.hook_resid_pre", "last"), Site("blocks.0.hook_resid_mid")
        )
        is None
    )
