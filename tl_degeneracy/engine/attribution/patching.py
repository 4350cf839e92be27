"""True activation patching at a site and of features in a basis, the ground truth that
attribution patching estimates (docs/attribution.md)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.attribution.gradients import (
    AttributionMetric,
    batch_metric,
    checked_mean,
)
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.capture import capture_sites, injection_hooks
from tl_degeneracy.engine.compat import model_cfg, run_with_hooks
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.tokens import validate_pair

LOGIT_BUDGET = 1 << 27
"""Most logits (batch · pos · vocab) one patching forward may produce (1 GiB in float64)."""


@torch.no_grad()
def patched_metrics(
    model: nn.Module,
    site: Site,
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
    corrupt_act: Float[Tensor, "batch site_pos d"],
    deltas: Callable[[int, int], Float[Tensor, "r batch site_pos d"]],
    n_groups: int,
    max_rows: int,
    scalar_metric: bool,
) -> Float[Tensor, " n_groups"]:
    """Batch-mean metric of the corrupted run with the site set to `corrupt_act + deltas(start,
    stop)[j]`, for every group; groups run side by side in one forward by repeating the batch
    (at most `max_rows` sequences, and at most `LOGIT_BUDGET` logits, per forward)."""
    batch, n_pos = corrupted_tokens.shape
    cfg = model_cfg(model)
    vocab = int(getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)
    rows = max(1, min(max_rows, LOGIT_BUDGET // (n_pos * vocab)))
    per_forward = 1 if scalar_metric else max(1, rows // batch)
    values = torch.empty(n_groups, dtype=torch.float64)
    base = corrupt_act.to(torch.float64)
    for start in range(0, n_groups, per_forward):
        stop = min(n_groups, start + per_forward)
        r = stop - start
        new = (base[None] + deltas(start, stop)).flatten(0, 1)
        hooks = injection_hooks(model, site, new)
        logits = run_with_hooks(model, corrupted_tokens.repeat(r, 1), hooks)
        for j in range(r):
            part = slice(j * batch, (j + 1) * batch)
            values[start + j] = float(batch_metric(metric, logits[part], corrupted_tokens))
    return values


def feature_patching_effects(
    model: nn.Module,
    basis: SiteBasis,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
    groups: Sequence[Sequence[int]] | None = None,
    max_rows: int = 4096,
) -> Float[Tensor, " n_groups"]:
    """True activation patching in a basis: the change of the batch-mean metric when the
    corrupted run's features in each group are set to their clean values (everything else
    corrupted, the part outside the basis's span too). Default: every feature alone.

    Editing features by `Δf̂` moves the activation by `Δf̂ C⁺`, as `attach` does. Groups are
    batched by repeating the corrupted batch up to `max_rows` sequences per forward (a metric
    that returns one scalar for the whole batch runs one group per forward).
    """
    clean_tokens, corrupted_tokens = validate_pair(model, clean_tokens, corrupted_tokens)
    site = basis.site
    (clean,) = capture_sites(model, clean_tokens, [site])
    (corrupt,) = capture_sites(model, corrupted_tokens, [site])
    groups = [[i] for i in range(basis.k)] if groups is None else [list(g) for g in groups]
    for g in groups:
        bad = [i for i in g if not _is_feature(i, basis.k)]
        if bad:
            raise IndexError(
                f"{site.name}: feature {bad[0]!r} in groups is not a feature of this basis, "
                f"whose features are 0 to {basis.k - 1} (k = {basis.k}; negative indices are "
                "not read from the end)"
            )
    masks = torch.zeros(len(groups), basis.k, dtype=torch.float64, device=clean.device)
    for j, g in enumerate(groups):
        masks[j, g] = 1.0
    b = basis.to(clean.device)
    dfeat = (clean.to(torch.float64) - corrupt.to(torch.float64)) @ b.C
    return feature_patching(model, b, corrupted_tokens, metric, corrupt, dfeat, masks, max_rows)


def _is_feature(i: object, k: int) -> bool:
    """Whether `i` is a feature id of a basis of `k` features: an integer (Python, NumPy or a
    0-d tensor; not a bool) in `[0, k)`."""
    if isinstance(i, bool):
        return False
    try:
        return 0 <= operator.index(i) < k  # type: ignore[arg-type]
    except TypeError:
        return False


@dataclass(frozen=True)
class Baseline:
    """The unpatched corrupted run: its batch-mean metric, and whether the metric returns one
    scalar per batch (then groups are patched one per forward). Made once and shared by every
    site's patching (`corrupted_baseline`), it saves a forward per site."""

    value: Float[Tensor, ""]
    scalar: bool


@torch.no_grad()
def corrupted_baseline(
    model: nn.Module, corrupted_tokens: Tensor, metric: AttributionMetric
) -> Baseline:
    """The metric of the corrupted run, once (see `Baseline`)."""
    raw = metric(model(corrupted_tokens), corrupted_tokens)
    scalar = not isinstance(raw, Tensor) or raw.ndim == 0
    return Baseline(checked_mean(raw, corrupted_tokens.shape[0]), scalar)


def feature_patching(
    model: nn.Module,
    basis: SiteBasis,
    corrupted_tokens: Tensor,
    metric: AttributionMetric,
    corrupt_act: Tensor,
    dfeat: Float[Tensor, "batch site_pos k"],
    masks: Float[Tensor, "groups k"] | Float[Tensor, "groups site_pos k"],
    max_rows: int,
    baseline: Baseline | None = None,
) -> Float[Tensor, " groups"]:
    """Metric change per group of features patched by `dfeat` (see `feature_patching_effects`):
    a `[groups, k]` mask patches its features at every position of the site, a `[groups,
    site_pos, k]` one each feature at its own positions."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(
            f"max_rows must be a whole number of at least 1 (sequences per patching forward), "
            f"got {max_rows!r}"
        )
    baseline = baseline or corrupted_baseline(model, corrupted_tokens, metric)
    pattern = "bpk,rk,kd->rbpd" if masks.ndim == 2 else "bpk,rpk,kd->rbpd"

    def deltas(start: int, stop: int) -> Tensor:
        return torch.einsum(pattern, dfeat, masks[start:stop], basis.C_pinv)

    values = patched_metrics(
        model,
        basis.site,
        corrupted_tokens,
        metric,
        corrupt_act,
        deltas,
        masks.shape[0],
        max_rows,
        baseline.scalar,
    )
    return values - baseline.value.cpu()


def site_patching_effect(
    model: nn.Module,
    site: Site,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> float:
    """Change of the batch-mean metric when the site's whole activation (at its positions) is
    patched from corrupted to clean."""
    clean_tokens, corrupted_tokens = validate_pair(model, clean_tokens, corrupted_tokens)
    (clean,) = capture_sites(model, clean_tokens, [site])
    (corrupt,) = capture_sites(model, corrupted_tokens, [site])
    return site_patching(model, site, corrupted_tokens, metric, clean, corrupt)


def site_patching(
    model: nn.Module,
    site: Site,
    corrupted_tokens: Tensor,
    metric: AttributionMetric,
    clean_act: Tensor,
    corrupt_act: Tensor,
    baseline: Baseline | None = None,
) -> float:
    """`site_patching_effect` from captured activations (and the shared `baseline`)."""
    baseline = baseline or corrupted_baseline(model, corrupted_tokens, metric)
    with torch.no_grad():
        base = baseline.value
        hooks = injection_hooks(model, site, clean_act)
        value = batch_metric(
            metric, run_with_hooks(model, corrupted_tokens, hooks), corrupted_tokens
        )
    return float(value - base)
