"""Report views on models whose composite features have no fixed stream direction."""

from __future__ import annotations

import pytest
from support import post_norm_model, random_tokens

from tl_degeneracy.engine.compat import has_hooked_transformer
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.logit_effects import direct_logit_effects
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.experiments.report_views import feature_logit_effects


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
