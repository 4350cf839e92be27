"""A feature's direct effect on the logits (engine.logit_effects). Its exactness at an MLP
site of a model without normalisation is checked against injection in test_composite.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.logit_effects import direct_logit_effects
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.models.tiny import tiny_model


@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_the_same_on_both_apis(arch):
    """One basis, the same effects through either API's weights: GPT-2's final LayerNorm
    weight, Gemma's final RMSNorm gain (1 + w) and its MLP site's W_out."""
    hooked, bridge = tiny_model(arch, "hooked"), tiny_model(arch, "bridge")
    toks = torch.randint(1, hooked.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    sites = (Site("blocks.1.hook_resid_mid"), Site("blocks.1.mlp.hook_post"), Site("logits"))
    result = fit_basis(hooked, toks, LIBConfig(sites, kind="pca", progress=False))
    for site in sites[:2]:
        a = direct_logit_effects(hooked, result[site.name], range(4))
        b = direct_logit_effects(bridge, result[site.name], range(4))
        assert a.shape == (4, hooked.cfg.d_vocab)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_a_model_without_an_unembedding_names_the_fix():
    class Net(nn.Module):
        pass

    basis = fit_basis(
        tiny_model("gpt2"),
        torch.randint(1, 40, (4, 8), generator=torch.Generator().manual_seed(0)),
        LIBConfig((Site("blocks.1.hook_resid_mid"), Site("logits")), kind="pca", progress=False),
    )["blocks.1.hook_resid_mid"]
    with pytest.raises(ValueError, match="has no W_U: pass unembed="):
        direct_logit_effects(Net(), basis)
