"""Modules of modular addition against the structure known to be there.

The network computes with a few key Fourier frequencies, so features of one frequency should
interact with each other and hardly with others. Each feature's dominant frequency (its Fourier
labels on all p² inputs, `tl_degeneracy.models.modadd.fourier`) is the ground truth; the adjusted
Rand index of the modules of the top features per site against it says how well module finding
recovers it (docs/modules.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import API
from tl_degeneracy.engine.edges import InteractionGraph, interaction_graph
from tl_degeneracy.engine.fit import Kind, LIBConfig, fit_basis
from tl_degeneracy.engine.module_finding import Modules, Node, adjusted_rand_index, with_singletons
from tl_degeneracy.engine.statistics import capture_sites, collect_statistics
from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint
from tl_degeneracy.models.modadd.fourier import fourier_labels
from tl_degeneracy.models.modadd.sites import REFERENCE_SITES

EVAL_SITES = (REFERENCE_SITES[1].name, REFERENCE_SITES[2].name)
"""`resid_mid` and `resid_post` at the last position: where the modules are judged."""
EVAL_TOP = 20
"""Features per site judged (the most important ones)."""


@dataclass
class FrequencyLabels:
    """Each feature's dominant non-zero Fourier frequency and the share of its power there,
    per site."""

    frequency: dict[str, Int[Tensor, " k"]]
    share: dict[str, Float[Tensor, " k"]]

    def labeller(self) -> Callable[[Node], str]:
        """Feature → `"w=15 (97%)"`, for `Modules.describe`."""

        def label(node: Node) -> str:
            site, i = node
            if site not in self.frequency:
                return ""
            return f"w={int(self.frequency[site][i])} ({100 * float(self.share[site][i]):.0f}%)"

        return label


@torch.no_grad()
def frequency_labels(
    model: nn.Module, basis: BasisResult, tokens: Int[Tensor, "p_sq pos"], p: int
) -> FrequencyLabels:
    """Dominant frequency of every feature of every site of `basis`, from its values on all p²
    inputs (`tokens` in the order of `ModAddDataset.tokens`)."""
    sites = basis.sites
    acts = capture_sites(model, tokens, sites)
    freq, share = {}, {}
    for site, act in zip(sites, acts):
        b = basis[site]
        labels = fourier_labels(b.features(act.to(torch.float64)), p)
        shares = labels.frequency_shares[:, 1:]
        freq[site.name] = labels.dominant_frequency
        share[site.name] = shares.max(dim=1).values
    return FrequencyLabels(freq, share)


def frequency_ari(
    modules: Modules | Mapping[Node, int],
    labels: FrequencyLabels,
    sites: Sequence[str] = EVAL_SITES,
    top: int = EVAL_TOP,
    min_share: float | None = None,
) -> float:
    """Adjusted Rand index of the modules of the first `top` features per site (a feature that
    took no part counts as a module of its own) against their dominant frequencies. With
    `min_share`, only features with at least that share of their power at one frequency."""
    nodes = [
        (s, i)
        for s in sites
        for i in range(min(top, len(labels.frequency[s])))
        if min_share is None or float(labels.share[s][i]) >= min_share
    ]
    assignment = modules.assignment if isinstance(modules, Modules) else modules
    found = with_singletons(assignment, nodes)
    truth = {(s, i): int(labels.frequency[s][i]) for s, i in nodes}
    return adjusted_rand_index(found, truth)


@dataclass
class ModAddGraphs:
    """Interaction graphs of one checkpoint in several bases, with the features' frequencies."""

    checkpoint: str
    graphs: dict[str, InteractionGraph]
    labels: dict[str, FrequencyLabels]
    seconds: dict[str, float] = field(default_factory=dict)


def fit_graphs(
    checkpoint: str | Path,
    kinds: Sequence[Kind] = ("lib", "pca", "neuron"),
    api: API | Literal["auto"] = "auto",
    progress: bool = False,
) -> ModAddGraphs:
    """Fit `kinds` at the reference's sites on the training inputs (float64), compute their
    interaction graphs, and label every feature by its dominant frequency on all p² inputs.
    PCA keeps the logits in raw coordinates, as the reference does (and as LIB does)."""
    ckpt = ModAddCheckpoint.open(checkpoint)
    model = ckpt.model(api=api, dtype=torch.float64)
    data = ckpt.dataset()
    train, _ = data.train()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    stats = collect_statistics(model, REFERENCE_SITES, train, 4096, progress=progress)
    seconds["statistics"] = time.perf_counter() - start
    bases: dict[str, BasisResult] = {}
    graphs: dict[str, InteractionGraph] = {}
    labels: dict[str, FrequencyLabels] = {}
    final = REFERENCE_SITES[-1].name
    for kind in kinds:
        start = time.perf_counter()
        config = LIBConfig(REFERENCE_SITES, kind=kind, batch_size=4096, progress=progress)
        bases[kind] = fit_basis(model, train, config, statistics=stats)
        if kind == "pca":
            raw = bases.get("lib") or fit_basis(
                model, train, LIBConfig(REFERENCE_SITES[-2:], progress=progress), statistics=stats
            )
            bases[kind].bases[final] = raw.bases[final]
        graphs[kind] = interaction_graph(
            model, train, bases[kind], batch_size=4096, progress=progress
        )
        labels[kind] = frequency_labels(model, bases[kind], data.tokens, data.p)
        seconds[kind] = time.perf_counter() - start
    return ModAddGraphs(str(checkpoint), graphs, labels, seconds)
