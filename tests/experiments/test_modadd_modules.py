"""Modules of modular addition against the dominant Fourier frequency of each feature: the
labelling and the score on a network built by hand, and seed 0 of the reference checkpoints
(slow, skips without ../shared)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tl_degeneracy.engine.modularity import REFERENCE_MODULES, find_modules
from tl_degeneracy.engine.module_finding import UNASSIGNED
from tl_degeneracy.experiments.modadd_modules import FrequencyLabels, frequency_ari


def _labels(freqs: dict[str, list[int]], shares: dict[str, list[float]] | None = None):
    return FrequencyLabels(
        {s: torch.tensor(v) for s, v in freqs.items()},
        {s: torch.tensor((shares or {}).get(s, [1.0] * len(v))) for s, v in freqs.items()},
    )


def test_frequency_ari_counts_features_that_took_no_part_as_singletons():
    labels = _labels({"mid": [3, 3, 5, 5], "post": [3, 5, 5, 7]})
    exact = {("mid", 0): 0, ("mid", 1): 0, ("mid", 2): 1, ("mid", 3): 1}
    exact |= {("post", 0): 0, ("post", 1): 1, ("post", 2): 1, ("post", 3): UNASSIGNED}
    assert frequency_ari(exact, labels, sites=("mid", "post"), top=4) == pytest.approx(1.0)
    merged = {n: 0 for n in exact}
    assert frequency_ari(merged, labels, sites=("mid", "post"), top=4) < 0.1
    # only the first `top` features per site are judged; unclear labels can be left out
    assert frequency_ari(exact, labels, sites=("mid",), top=2) == pytest.approx(1.0)
    unclear = _labels({"mid": [3, 3, 5, 5]}, {"mid": [1.0, 0.2, 1.0, 1.0]})
    wrong = {("mid", 0): 0, ("mid", 1): 1, ("mid", 2): 1, ("mid", 3): 1}
    assert frequency_ari(wrong, unclear, sites=("mid",), top=4, min_share=0.5) == 1.0
    assert frequency_ari(wrong, unclear, sites=("mid",), top=4) < 1.0
    assert labels.labeller()(("mid", 2)) == "w=5 (100%)"


@pytest.mark.slow
def test_seed0_lib_modules_follow_the_frequencies(reference_dir):
    """Seed 0, LIB at the reference's sites: modules of the top features per site at resid_mid
    and resid_post against their dominant frequency. Measured with the default: ARI 0.41 (top
    20; the benchmark's ceiling for this seed is 0.42-0.50) and 0.66 (top 10); the reference's
    setting (log weights over every feature) gives 0.05 with 303 modules."""
    from tl_degeneracy.experiments.modadd_modules import fit_graphs

    torch.set_num_threads(1)
    fitted = fit_graphs(reference_dir / "seed0", kinds=("lib",))
    graph, labels = fitted.graphs["lib"], fitted.labels["lib"]
    modules = find_modules(graph)
    assert frequency_ari(modules, labels) >= 0.40
    assert frequency_ari(modules, labels, top=10) >= 0.65
    reference = find_modules(graph, REFERENCE_MODULES)
    assert frequency_ari(reference, labels) < 0.1 and reference.n_modules > 200
    # module 0 (most edge mass) is the network's strongest frequency, 15, and holds most of it
    summary = modules.describe(labels.labeller(), min_size=2)
    frequencies = Counter(lab.split(" ")[0] for lab in summary[0].labels)
    assert frequencies.most_common(1)[0][0] == "w=15"
    shares = [s.edge_share for s in modules.describe()]
    assert shares[0] > 0.5 and sum(shares) <= 1 + 1e-9
