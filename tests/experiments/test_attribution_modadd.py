"""The modular-addition attribution experiment (experiments.attribution_modadd)."""

from __future__ import annotations

import time

import pytest
import torch

from tl_degeneracy.engine.attribution import format_correlation_table
from tl_degeneracy.experiments.attribution_modadd import modadd_attribution_demo
from tl_degeneracy.models.modadd import list_reference_checkpoints


@pytest.mark.slow
def test_modadd_demonstration():
    """LIB and PCA on the trained p = 113 model: per-feature attribution against patching and Λ
    at resid_mid[-1] and resid_post[-1] (printed; docs/attribution.md holds a measured table)."""
    seed0 = [p for p in list_reference_checkpoints() if p.name == "seed0"]
    if not seed0:
        pytest.skip("reference modular-addition checkpoint seed0 not found (../shared)")
    start = time.perf_counter()
    comparisons = modadd_attribution_demo(seed0[0], n_pairs=128, seed=0)
    print()
    print(format_correlation_table(comparisons))
    print(format_correlation_table(comparisons, top=20))
    print(f"total {time.perf_counter() - start:.1f} s")
    for kind, comparison in comparisons.items():
        assert comparison.clean_metric > comparison.corrupted_metric
        for name, sa in comparison.sites.items():
            assert sa.tl_relative_difference < 1e-6, (kind, name)
            assert sa.gap == pytest.approx(sa.site_attribution - sa.feature_sum)
            if name.startswith("blocks.0.hook_resid_post"):
                # the rest of the model is the linear unembedding: first order is exact
                torch.testing.assert_close(sa.attribution, sa.patching, rtol=1e-8, atol=1e-9)
