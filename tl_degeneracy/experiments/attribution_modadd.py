"""Attribution patching against true patching and Λ on a modular-addition checkpoint: the
experiment behind docs/attribution.md's modular-addition table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from tl_degeneracy.engine.attribution import AttributionComparison, compare_attribution

DEMO_SITES = ("blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]")


def modadd_attribution_demo(
    checkpoint: str | Path | None = None,
    n_pairs: int = 256,
    seed: int = 0,
    kinds: Sequence[Literal["lib", "ib", "pca", "neuron"]] = ("lib", "pca"),
    sites: Sequence[str] = DEMO_SITES,
    api: Literal["auto", "hooked", "bridge"] = "auto",
    progress: bool = False,
) -> dict[str, AttributionComparison]:
    """Attribution patching against true patching and Λ on a modular-addition checkpoint.

    Fits `kinds` at the reference sites on the training inputs (float64, reference settings),
    draws `n_pairs` inputs `[a, b, =]` from all p² and corrupts the first operand
    (`a' = a + u mod p`, `u` uniform in 1 … p−1), and uses the logit difference
    `logit[(a+b) mod p] − logit[(a'+b) mod p]` at the last position as the metric.
    """
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.statistics import collect_statistics
    from tl_degeneracy.models.modadd.checkpoints import load_checkpoint
    from tl_degeneracy.models.modadd.data import all_inputs
    from tl_degeneracy.models.modadd.sites import REFERENCE_SITES

    model, data = load_checkpoint(checkpoint, api=api, dtype=torch.float64)
    p = data.p
    train, _ = data.train()
    gen = torch.Generator().manual_seed(seed)
    clean = all_inputs(p)[torch.randperm(p * p, generator=gen)[:n_pairs]]
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + torch.randint(1, p, (clean.shape[0],), generator=gen)) % p
    right = (clean[:, 0] + clean[:, 1]) % p
    wrong = (corrupted[:, 0] + corrupted[:, 1]) % p

    def logit_difference(logits: Tensor, tokens: Tensor) -> Tensor:
        last = logits[:, -1].to(torch.float64)
        return last.gather(1, right[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]

    stats_ = collect_statistics(model, REFERENCE_SITES, train, 4096, progress=progress)
    out: dict[str, AttributionComparison] = {}
    for kind in kinds:
        start = time.perf_counter()
        config = LIBConfig(REFERENCE_SITES, kind=kind, batch_size=4096, progress=progress)
        result = fit_basis(model, train, config, statistics=stats_)
        fit_s = time.perf_counter() - start
        comparison = compare_attribution(
            model,
            result,
            list(sites),
            clean,
            corrupted,
            logit_difference,
            metric_name="logit[(a+b) mod p] - logit[(a'+b) mod p]",
        )
        comparison.metadata.update(
            checkpoint=str(checkpoint), seed=seed, fit_seconds=fit_s, kind=kind, p=p
        )
        out[kind] = comparison
    return out
