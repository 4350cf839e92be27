"""Degeneracy of the modular-addition seed-0 checkpoint (needs ../shared; slow).

The full report and the step-size / temperature grid are produced by `tl-degeneracy degeneracy
../shared/reference/modadd/seed0 --grid-step-sizes ...`; these tests check the parts that must
hold."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tl_degeneracy.engine.compat import build_model
from tl_degeneracy.engine.degeneracy import (
    ModelProblem,
    SGLDConfig,
    SGLDWarning,
    SourcesConfig,
    estimate_llc,
    measure_sources,
)


def _load(reference_dir, dtype):
    cfg = json.loads((reference_dir / "seed0" / "config.json").read_text())["model"]
    model = build_model(
        cfg, load_file(str(reference_dir / "seed0" / "model.safetensors")), dtype=dtype
    )
    p = 113
    tokens = torch.tensor([[a, b, p] for a in range(p) for b in range(p)])
    train = load_file(str(reference_dir / "split.safetensors"))["train_indices"]
    return model, tokens[train]


@pytest.mark.slow
def test_modadd_sources(reference_dir):
    model, tokens = _load(reference_dir, torch.float64)
    res = measure_sources(model, tokens, SourcesConfig(batch_size=512))
    total = sum(p.numel() for p in model.parameters())
    assert sum(res.section_params.values()) == total == 227_442
    neurons = res.neurons["blocks.0.mlp"]
    assert neurons.n_dead == 0
    assert neurons.free_synchronised > 0  # measured: 38 groups of 2–6 neurons, 178 directions
    assert 0 < res.upper_bound() < total
    assert bool((res.bound_curve()[1:] <= res.bound_curve()[:-1]).all())


@pytest.mark.slow
def test_modadd_llc_is_positive_and_below_the_bound(reference_dir):
    model, tokens = _load(reference_dir, torch.float32)
    cfg = SGLDConfig(step_size=1e-4, n_chains=2, n_steps=200, n_burnin=100, batch_size=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        res = estimate_llc(ModelProblem(model, tokens), cfg)
    assert not bool(res.diverged.any())
    assert 50 < res.llc < 227_442 / 2
