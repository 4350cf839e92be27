import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, rebuild, replace_hooks, run_with_hooks
from tl_degeneracy.engine.identity import model_identity


@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_same_weights_same_logits_on_both_apis(tiny, tokens_for, kind):
    hooked = tiny("hooked", kind)
    bridge = rebuild(hooked, "bridge")
    toks = tokens_for(hooked, 8)
    with torch.no_grad():
        assert torch.allclose(hooked(toks), bridge(toks), atol=1e-12)
    assert model_identity(hooked)["weight_digest"] == model_identity(bridge)["weight_digest"]


def test_writing_resid_mid_changes_the_residual(api, tiny, tokens_for):
    """A write at hook_resid_mid must reach hook_resid_post through the residual too (on the
    Bridge the hook is an alias of the MLP's input and needs the change carried)."""
    model = tiny(api)
    toks = tokens_for(model, 4)
    seen = {}

    def read(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()

        return hook

    with torch.no_grad():
        run_with_hooks(
            model,
            toks,
            [("blocks.0.hook_resid_mid", read("mid")), ("blocks.0.hook_resid_post", read("post"))],
        )
        base_post = seen["post"]
        mlp_base = base_post - seen["mid"]
        hooks = replace_hooks(model, "blocks.0.hook_resid_mid", lambda a: a + 1.0)
        run_with_hooks(model, toks, hooks + [("blocks.0.hook_resid_post", read("post2"))])
    # post = (mid + 1) + mlp(mid + 1): the residual part moved by exactly 1
    mlp_new = seen["post2"] - (seen["mid"] + 1.0)
    assert not torch.allclose(mlp_new, mlp_base)
    hooks = replace_hooks(model, "blocks.0.hook_resid_mid", lambda a: a)
    with torch.no_grad():
        run_with_hooks(model, toks, hooks + [("blocks.0.hook_resid_post", read("post3"))])
    assert torch.equal(seen["post3"], base_post)
