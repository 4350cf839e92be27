"""Independent modules add their learning coefficients (the degeneracy view of modularity)."""

from __future__ import annotations

import math

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, hooked_state_dict
from tl_degeneracy.engine.degeneracy import (
    ModelProblem,
    SGLDConfig,
    estimate_llc,
    model_additivity,
    parameter_masks,
    sections_partition,
)
from tl_degeneracy.engine.degeneracy.invariance import PlantedModulesConfig, planted_modules_model
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters, union


def test_planted_masks_partition_the_module_weights(api):
    """Each planted module owns its block of every weight; the modules are disjoint and
    together own every parameter entry that is not a cross-module zero, under the model's own
    names and layouts on either API (a Bridge's `blocks.0.attn.q.weight`)."""
    planted = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4), api=api)
    masks = [planted.parameter_masks(i) for i in range(3)]
    joined = union(masks)
    assert isinstance(joined, dict)
    params = state_dict_parameters(planted.model)
    assert set(joined) == set(params)  # every parameter, under the names SGLD moves
    for name, mask in joined.items():
        counts = sum(m[name].to(torch.int64) for m in masks)
        assert int(counts.max()) == 1  # disjoint
        assert bool((params[name].detach()[~mask] == 0).all()), name  # cross-module zeros
        assert parameter_masks(planted.model, {name: mask})[name].shape == params[name].shape
    with pytest.raises(ValueError, match="share entries"):
        model_additivity(planted.model, planted.tokens, {"a": masks[0], "b": masks[0]})


def test_planted_masks_select_the_same_weights_on_either_api(api):
    """A module's masks pick, in the model's own tensors, the entries its HookedTransformer-
    named masks pick in the model's HookedTransformer-form weights (`hooked_state_dict`, the
    inverse of the Bridge conversion); the unembedding bias only where it is a parameter (a
    buffer on TransformerLens 4's Bridge)."""
    planted = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4), api=api)
    params = state_dict_parameters(planted.model)
    hooked = hooked_state_dict(planted.model)
    bias_moves = "unembed.b_U" in params or "unembed.bias" in params
    for module in range(3):
        masks = planted.parameter_masks(module)
        reference = planted._hooked_masks(module)
        if not bias_moves:
            del reference["unembed.b_U"]
        assert len(masks) == len(reference)
        picked = sorted(float(x) for n, m in masks.items() for x in params[n].detach()[m])
        expected = sorted(float(x) for n, m in reference.items() for x in hooked[n][m])
        assert picked == expected and len(picked) > 100


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
def test_planted_modules_add_their_learning_coefficients(record_property):
    """Three planted modules with squared-error outputs: the loss is a sum over modules, so
    λ̂ over their union equals the sum of their own λ̂ within the standard errors; moving the
    cross-module weights too (every parameter) costs more, since they are not free. On the
    first API available (a HookedTransformer on TransformerLens 3.9, a Bridge on 4.x)."""
    planted = planted_modules_model(PlantedModulesConfig(n_layers=1, n_values=4))
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
