"""Independent modules add their learning coefficients (the degeneracy view of modularity)."""

from __future__ import annotations

import math

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.degeneracy import (
    ModelProblem,
    SGLDConfig,
    estimate_llc,
    model_additivity,
    parameter_masks,
    sections_partition,
)
from tl_degeneracy.engine.degeneracy.invariance import PlantedModulesConfig, planted_modules_model
from tl_degeneracy.engine.degeneracy.parameters import union

needs_hooked = pytest.mark.skipif(
    "hooked" not in available_apis(), reason="planted masks use HookedTransformer names"
)


@needs_hooked
def test_planted_masks_partition_the_module_weights():
    """Each planted module owns its block of every weight; the modules are disjoint and
    together own every weight that is not a cross-module zero."""
    planted = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4), api="hooked")
    masks = [planted.parameter_masks(i) for i in range(3)]
    joined = union(masks)
    assert isinstance(joined, dict)
    state = dict(planted.model.state_dict())
    for name, mask in joined.items():
        counts = sum(m[name].to(torch.int64) for m in masks)
        assert int(counts.max()) == 1  # disjoint
        off = state[name][~mask]
        if name.endswith(("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")):
            assert bool((off == 0).all()), name  # only cross-module zeros are left out
    with pytest.raises(ValueError, match="share entries"):
        model_additivity(planted.model, planted.tokens, {"a": masks[0], "b": masks[0]})


def test_sections_partition_selects_whole_sections(tiny):
    model = tiny(available_apis()[0], "mlp")
    part = sections_partition({"mlp": ["blocks.0.mlp"], "ends": ["embed", "unembed"]})
    mlp = parameter_masks(model, part["mlp"])
    ends = parameter_masks(model, part["ends"])
    assert mlp and ends and not set(mlp) & set(ends)
    assert all(bool(m.all()) for m in [*mlp.values(), *ends.values()])
    with pytest.raises(ValueError, match="cannot join"):
        union([part["mlp"], {next(iter(mlp)): next(iter(mlp.values()))}])


@pytest.mark.slow
@needs_hooked
def test_planted_modules_add_their_learning_coefficients(record_property):
    """Three planted modules with squared-error outputs: the loss is a sum over modules, so
    λ̂ over their union equals the sum of their own λ̂ within the standard errors; moving the
    cross-module weights too (every parameter) costs more, since they are not free."""
    planted = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4), api="hooked")
    model, tokens = planted.model, planted.tokens
    partition = {f"module{i}": planted.parameter_masks(i) for i in range(3)}
    cfg = SGLDConfig(
        step_size=1e-3, gamma=100.0, n_chains=4, n_steps=600, n_burnin=150, batch_size=10**9
    )
    res = model_additivity(model, tokens, partition, cfg, divergence="mse")
    for key, r in {**res.modules, "whole": res.whole}.items():
        record_property(f"llc_{key}", f"{r.llc:.4g} ± {r.llc_se:.2g}")
        assert r.rhat < 1.1 and not bool(r.diverged.any())
    assert res.whole.n_params == sum(r.n_params for r in res.modules.values())
    assert abs(res.gap) < 3 * res.gap_se
    assert res.ratio == pytest.approx(1.0, abs=0.08)
    every = estimate_llc(ModelProblem(model, tokens, None, divergence="mse"), cfg)
    record_property("llc_every_parameter", f"{every.llc:.4g} ± {every.llc_se:.2g}")
    assert every.llc > res.whole.llc + 5 * math.hypot(every.llc_se, res.whole.llc_se)
