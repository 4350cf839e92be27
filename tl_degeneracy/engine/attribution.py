"""Attribution patching in a basis (method.md §8), checked against activation patching.

At a site with clean activation `a`, corrupted activation `a'` and the metric's gradient `g`
on the corrupted run, feature `i` of a basis (`f̂ = (f − μ) C`, `f ≈ μ + f̂ C⁺`) scores

    s_i = Σ_positions ((a − a') C)_i · (g C⁺ᵀ)_i,

the first-order estimate of what patching that one feature from corrupted to clean does to the
metric. `Σ_i s_i = (a − a') C C⁺ gᵀ` is the site-level attribution `(a − a')·g` when `C C⁺ = I`
(an untruncated basis); otherwise the difference is the *truncation gap*. The ground truth is
activation patching: the corrupted run with feature `i` set to its clean value.

Batch convention: a metric gives one value per sequence and every number here is a change of
its **batch mean** (TransformerLens's `attribution_patch` averages per-pair scores the same
way), so a score is the mean over pairs of the per-pair score.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import (
    frozen_parameters,
    is_bridge,
    model_cfg,
    model_identity,
    parameters_requiring_grad,
    replace_hooks,
    run_with_hooks,
)
from tl_degeneracy.engine.result import BasisResult
from tl_degeneracy.engine.sites import Site, SiteLike, as_site
from tl_degeneracy.engine.statistics import capture_sites
from tl_degeneracy.viz.html import Fragment, HtmlReprMixin, PageSection, table

__all__ = [
    "AttributionComparison",
    "AttributionMetric",
    "SiteAttribution",
    "compare_attribution",
    "feature_patching_effects",
    "format_correlation_table",
    "modadd_attribution_demo",
    "site_gradients",
    "site_patching_effect",
    "spearman",
    "tl_site_attribution",
]

LOGIT_BUDGET = 1 << 27
"""Most logits (batch · pos · vocab) one patching forward may produce (1 GiB in float64)."""

AttributionMetric = Callable[
    [Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"]],
    Float[Tensor, " batch"] | Float[Tensor, ""],
]
"""`metric(logits, tokens)`: one value per sequence (averaged here) or one scalar. `tokens` are
the tokens the run was fed (the corrupted ones for corrupted and patched runs)."""


def _reduce(value: Tensor | float, batch: int) -> Tensor:
    """A metric's output as one float64 scalar: the mean over sequences."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value, dtype=torch.float64)
    if value.ndim == 0:
        return value.to(torch.float64)
    if value.shape != (batch,):
        raise ValueError(
            f"the metric must return one value per sequence ({batch},) or a scalar, "
            f"got shape {tuple(value.shape)}"
        )
    return value.to(torch.float64).mean()


def _batch_metric(metric: AttributionMetric, logits: Tensor, tokens: Tensor) -> Tensor:
    """The batch-mean metric of one run."""
    return _reduce(metric(logits, tokens), tokens.shape[0])


def _bases(result: BasisResult | Mapping[str, SiteBasis]) -> Mapping[str, SiteBasis]:
    return result.bases if isinstance(result, BasisResult) else result


def _lookup(bases: Mapping[str, SiteBasis], site: SiteLike) -> SiteBasis:
    """The basis at a site given as a `Site`, its name (`"blocks.0.hook_resid_mid[-1]"`) or a
    site spec."""
    if isinstance(site, str) and site in bases:
        return bases[site]
    name = as_site(site).name
    if name not in bases:
        raise KeyError(f"no basis at site {name!r}; sites: {list(bases)}")
    return bases[name]


def _check_pair(clean: Tensor, corrupted: Tensor) -> None:
    if clean.ndim != 2 or clean.shape != corrupted.shape:
        raise ValueError(
            "clean and corrupted tokens must be [batch, pos] of the same shape, got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Gradients, TransformerLens's site-level value, patching
# ---------------------------------------------------------------------------------------------


def site_gradients(
    model: nn.Module,
    sites: Sequence[Site],
    tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Activations and the batch-mean metric's gradient at every site, in one forward and one
    backward: `(activations, gradients, metric value)`, tensors `[batch, site_pos, d]` float64.

    A zero leaf is added at each site's positions; its gradient is the gradient with respect to
    the activation, through every path (on the Bridge `replace_hooks` carries a write at
    `hook_resid_mid` into the residual as well).
    """
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    hooks: list = []
    for site in sites:

        def add_leaf(act: Tensor, site: Site = site) -> Tensor:
            idx = site.index(act.shape[1]).to(act.device)
            acts[site.name] = act[:, idx].detach().to(torch.float64)
            leaf = torch.zeros_like(act[:, idx], requires_grad=True)
            leaves[site.name] = leaf
            return act.index_add(1, idx, leaf)

        hooks += replace_hooks(model, site.hook, add_leaf)
    with frozen_parameters(model), torch.enable_grad():
        logits = run_with_hooks(model, tokens, hooks)
        value = _batch_metric(metric, logits, tokens)
        names = [s.name for s in sites]
        grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
    out = {
        n: (torch.zeros_like(acts[n]) if g is None else g.to(torch.float64))
        for n, g in zip(names, grads)
    }
    return acts, out, float(value.detach())


def _hook_gradient_cache(
    model: nn.Module,
    tokens: Tensor,
    metric_fn: Callable[[Tensor], Tensor],
    names_filter: Sequence[str],
    compute_gradient: bool = True,
) -> SimpleNamespace:
    """Fallback for TransformerLens versions without `cache_activation_and_gradient`: forward
    hooks keep the hook points' outputs, `autograd.grad` differentiates the metric by them."""
    live: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook: Any = None) -> None:
            live[name] = act

        return hook

    hooked: Any = model  # hooks() is a method of either API, not of nn.Module
    with torch.set_grad_enabled(compute_gradient):
        with hooked.hooks(fwd_hooks=[(n, keep(n)) for n in names_filter]):
            value = metric_fn(model(tokens))
        acts = {n: t.detach().clone() for n, t in live.items()}
        grads: dict[str, Tensor | None] = dict.fromkeys(live)
        if compute_gradient:
            got = torch.autograd.grad(value, list(live.values()), allow_unused=True)
            grads = {n: None if g is None else g.detach() for n, g in zip(live, got)}
    return SimpleNamespace(activations=acts, gradients=grads, metric=value.detach())


def _tracked_parameters(model: nn.Module) -> AbstractContextManager[None]:
    """Parameters require grad inside the block, so that hook outputs are part of the autograd
    graph for TransformerLens's gradient cache (which differentiates by them, never by the
    parameters) even when the caller froze the model."""
    return parameters_requiring_grad(model, True)


def _tl_gradient_cache() -> Callable[..., Any]:
    try:
        from transformer_lens.tools.analysis.attribution_patching import (
            cache_activation_and_gradient,
        )
    except ImportError:  # pragma: no cover - TransformerLens releases without the module
        return _hook_gradient_cache
    return cache_activation_and_gradient


def tl_site_attribution(
    model: nn.Module,
    site: Site,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> float:
    """The site-level attribution `(a − a')·g` (batch mean) computed by TransformerLens's own
    gradient cache (`tools.analysis.attribution_patching.cache_activation_and_gradient`, the
    machinery of its `attribution_patch`), summed over the site's positions.

    On the Bridge `hook_resid_mid` is an alias of the MLP's input, whose gradient misses the
    residual path; there the gradient at `hook_resid_post` (that path) is added.
    """
    cache = _tl_gradient_cache()
    names = [site.hook]
    alias = is_bridge(model) and site.hook.endswith("hook_resid_mid")
    if alias:
        names.append(site.hook.replace("hook_resid_mid", "hook_resid_post"))
    clean = cache(
        model,
        clean_tokens,
        lambda logits: _batch_metric(metric, logits, clean_tokens),
        names_filter=[site.hook],
        compute_gradient=False,
    )
    with torch.enable_grad(), _tracked_parameters(model):
        corrupt = cache(
            model,
            corrupted_tokens,
            lambda logits: _batch_metric(metric, logits, corrupted_tokens),
            names_filter=names,
        )
    grad = corrupt.gradients[site.hook]
    if grad is None:
        return 0.0
    grad = grad.to(torch.float64)
    if alias and corrupt.gradients[names[1]] is not None:
        grad = grad + corrupt.gradients[names[1]].to(torch.float64)
    delta = clean.activations[site.hook].to(torch.float64) - corrupt.activations[site.hook]
    idx = site.index(delta.shape[1])
    return float((delta[:, idx] * grad[:, idx]).sum())


@torch.no_grad()
def _patched_metrics(
    model: nn.Module,
    site: Site,
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
    deltas: Callable[[int, int], Float[Tensor, "r batch site_pos d"]],
    n_groups: int,
    max_rows: int,
    scalar_metric: bool,
) -> Float[Tensor, " n_groups"]:
    """Batch-mean metric of the corrupted run with `deltas(start, stop)[j]` added at the site,
    for every group; groups run side by side in one forward by repeating the batch (at most
    `max_rows` sequences, and at most `LOGIT_BUDGET` logits, per forward)."""
    batch, n_pos = corrupted_tokens.shape
    cfg = model_cfg(model)
    vocab = int(getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)
    rows = max(1, min(max_rows, LOGIT_BUDGET // (n_pos * vocab)))
    per_forward = 1 if scalar_metric else max(1, rows // batch)
    values = torch.empty(n_groups, dtype=torch.float64)
    for start in range(0, n_groups, per_forward):
        stop = min(n_groups, start + per_forward)
        r = stop - start
        delta = deltas(start, stop).flatten(0, 1)

        def write(act: Tensor, delta: Tensor = delta) -> Tensor:
            idx = site.index(act.shape[1]).to(act.device)
            new = act[:, idx].to(torch.float64) + delta
            return act.index_copy(1, idx, new.to(act.dtype))

        hooks = replace_hooks(model, site.hook, write)
        logits = run_with_hooks(model, corrupted_tokens.repeat(r, 1), hooks)
        for j in range(r):
            part = slice(j * batch, (j + 1) * batch)
            values[start + j] = _batch_metric(metric, logits[part], corrupted_tokens)
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
    _check_pair(clean_tokens, corrupted_tokens)
    site = basis.site
    (clean,) = capture_sites(model, clean_tokens, [site])
    (corrupt,) = capture_sites(model, corrupted_tokens, [site])
    groups = [[i] for i in range(basis.k)] if groups is None else [list(g) for g in groups]
    masks = torch.zeros(len(groups), basis.k, dtype=torch.float64)
    for j, g in enumerate(groups):
        masks[j, g] = 1.0
    dfeat = (clean.to(torch.float64) - corrupt.to(torch.float64)) @ basis.C
    return _feature_patching(model, basis, corrupted_tokens, metric, dfeat, masks, max_rows)


def _feature_patching(
    model: nn.Module,
    basis: SiteBasis,
    corrupted_tokens: Tensor,
    metric: AttributionMetric,
    dfeat: Float[Tensor, "batch site_pos k"],
    masks: Float[Tensor, "groups k"],
    max_rows: int,
) -> Float[Tensor, " groups"]:
    with torch.no_grad():
        raw = metric(model(corrupted_tokens), corrupted_tokens)
    scalar = not isinstance(raw, Tensor) or raw.ndim == 0
    base_value = _reduce(raw, corrupted_tokens.shape[0])

    def deltas(start: int, stop: int) -> Tensor:
        return torch.einsum("bpk,rk,kd->rbpd", dfeat, masks[start:stop], basis.C_pinv)

    values = _patched_metrics(
        model, basis.site, corrupted_tokens, metric, deltas, masks.shape[0], max_rows, scalar
    )
    return values - base_value


def site_patching_effect(
    model: nn.Module,
    site: Site,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> float:
    """Change of the batch-mean metric when the site's whole activation (at its positions) is
    patched from corrupted to clean."""
    _check_pair(clean_tokens, corrupted_tokens)
    (clean,) = capture_sites(model, clean_tokens, [site])
    (corrupt,) = capture_sites(model, corrupted_tokens, [site])
    delta = clean.to(torch.float64) - corrupt.to(torch.float64)
    return _site_patching(model, site, corrupted_tokens, metric, delta)


def _site_patching(
    model: nn.Module,
    site: Site,
    corrupted_tokens: Tensor,
    metric: AttributionMetric,
    delta: Float[Tensor, "batch site_pos d"],
) -> float:
    with torch.no_grad():
        base = _batch_metric(metric, model(corrupted_tokens), corrupted_tokens)
    value = _patched_metrics(
        model, site, corrupted_tokens, metric, lambda s, e: delta[None], 1, 1, True
    )
    return float(value[0] - base)


# ---------------------------------------------------------------------------------------------
# Rank correlation
# ---------------------------------------------------------------------------------------------


def spearman(x: Tensor | np.ndarray | Sequence[float], y: Tensor | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant
    or has fewer than two values."""
    xv = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    yv = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
    if xv.shape != yv.shape:
        raise ValueError(f"x and y differ in shape: {xv.shape} vs {yv.shape}")
    if xv.size < 2 or np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return math.nan
    rx, ry = stats.rankdata(xv), stats.rankdata(yv)
    return float(np.corrcoef(rx, ry)[0, 1])


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@dataclass
class SiteAttribution:
    """Per-feature attribution, patching effect and importance at one site, and the site-level
    sums (all changes of the batch-mean metric)."""

    site: str
    kind: str
    attribution: Float[Tensor, " k"]
    """s_i = Σ_pos ((a − a') C)_i (g C⁺ᵀ)_i."""
    patching: Float[Tensor, " k"]
    """Metric change when feature i alone is patched to its clean value."""
    importance: Float[Tensor, " k"]
    """Λ for LIB/IB, the variance for PCA and neuron bases."""
    site_attribution: float
    """(a − a')·g at the site, from our gradient."""
    tl_site_attribution: float | None
    """The same from TransformerLens's gradient cache (None when not computed)."""
    site_patching: float
    """Metric change when the whole site is patched to clean."""
    d: int
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.attribution.numel())

    @property
    def feature_sum(self) -> float:
        """Σ_i s_i."""
        return float(self.attribution.sum())

    @property
    def gap(self) -> float:
        """(a − a')·g − Σ_i s_i: zero for an untruncated basis, the truncation's share else."""
        return self.site_attribution - self.feature_sum

    @property
    def relative_gap(self) -> float:
        scale = abs(self.site_attribution)
        return abs(self.gap) / scale if scale > 0 else (0.0 if self.gap == 0 else math.inf)

    @property
    def tl_relative_difference(self) -> float | None:
        """|ours − TransformerLens's| / |TransformerLens's|."""
        if self.tl_site_attribution is None:
            return None
        diff = abs(self.site_attribution - self.tl_site_attribution)
        scale = abs(self.tl_site_attribution)
        return diff / scale if scale > 0 else diff

    def correlations(self, top: int | None = None) -> dict[str, float]:
        """Spearman ρ: signed attribution vs signed patching; and, since Λ is a magnitude,
        |attribution| and |patching| vs Λ. With `top`, over the `top` features of largest
        |patching| only (over all features, near-zero effects can dominate the ranks)."""
        a, p, lam = self.attribution, self.patching, self.importance
        if top is not None:
            keep = torch.argsort(p.abs(), descending=True)[:top]
            a, p, lam = a[keep], p[keep], lam[keep]
        return {
            "attribution~patching": spearman(a, p),
            "|attribution|~|patching|": spearman(a.abs(), p.abs()),
            "|attribution|~importance": spearman(a.abs(), lam),
            "|patching|~importance": spearman(p.abs(), lam),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per feature, in basis order (most important first)."""
        return [
            {
                "site": self.site,
                "kind": self.kind,
                "feature": i,
                "attribution": float(self.attribution[i]),
                "patching": float(self.patching[i]),
                "importance": float(self.importance[i]),
            }
            for i in range(self.k)
        ]

    def summary(self) -> dict[str, Any]:
        rho = self.correlations()
        return {
            "site": self.site,
            "kind": self.kind,
            "d": self.d,
            "k": self.k,
            "site attribution (ours)": self.site_attribution,
            "site attribution (TransformerLens)": self.tl_site_attribution,
            "sum of feature scores": self.feature_sum,
            "gap": self.gap,
            "relative gap": self.relative_gap,
            "site patching": self.site_patching,
            "rho attribution~patching": rho["attribution~patching"],
            "rho |attribution|~importance": rho["|attribution|~importance"],
            "rho |patching|~importance": rho["|patching|~importance"],
            "seconds": self.seconds,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "kind": self.kind,
            "d": self.d,
            "k": self.k,
            "attribution": self.attribution.tolist(),
            "patching": self.patching.tolist(),
            "importance": self.importance.tolist(),
            "site_attribution": self.site_attribution,
            "tl_site_attribution": self.tl_site_attribution,
            "site_patching": self.site_patching,
            "feature_sum": self.feature_sum,
            "gap": self.gap,
            "relative_gap": _finite(self.relative_gap),
            "correlations": {k: _finite(v) for k, v in self.correlations().items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteAttribution:
        """Inverse of `to_json` (derived fields are recomputed)."""

        def vec(key: str) -> Tensor:
            return torch.tensor(d[key], dtype=torch.float64)

        return cls(
            d["site"],
            d["kind"],
            vec("attribution"),
            vec("patching"),
            vec("importance"),
            d["site_attribution"],
            d["tl_site_attribution"],
            d["site_patching"],
            d["d"],
            d.get("seconds", 0.0),
        )


@dataclass
class AttributionComparison(HtmlReprMixin):
    """Attribution patching in a basis against true patching and Λ, at one or more sites."""

    sites: dict[str, SiteAttribution]
    clean_metric: float
    corrupted_metric: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, site: str) -> SiteAttribution:
        return self.sites[site]

    def table(self, site: str | None = None, top: int | None = None) -> list[dict[str, Any]]:
        """Per-feature rows (site, kind, feature, attribution, patching, importance); with `top`,
        only the `top` features of largest |patching| per site."""
        out = []
        for name, sa in self.sites.items():
            if site is not None and name != site:
                continue
            rows = sa.rows()
            if top is not None:
                rows = sorted(rows, key=lambda r: -abs(r["patching"]))[:top]
            out += rows
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per site: site-level sums, the gap, rank correlations, time."""
        return [sa.summary() for sa in self.sites.values()]

    def correlations(self, top: int | None = None) -> dict[str, dict[str, float]]:
        """`SiteAttribution.correlations` of every site."""
        return {name: sa.correlations(top) for name, sa in self.sites.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "metadata": self.metadata,
            "sites": {name: sa.to_json() for name, sa in self.sites.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AttributionComparison:
        """Inverse of `to_json`."""
        sites = {name: SiteAttribution.from_json(v) for name, v in d["sites"].items()}
        return cls(sites, d["clean_metric"], d["corrupted_metric"], d.get("metadata", {}))

    @classmethod
    def load_json(cls, path: str | Path) -> AttributionComparison:
        return cls.from_json(json.loads(Path(path).read_text()))

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        return path

    def __repr__(self) -> str:
        parts = [
            f"{n}: rho={sa.correlations()['attribution~patching']:.3f}"
            for n, sa in self.sites.items()
        ]
        return f"AttributionComparison({', '.join(parts)})"

    def _html_title(self) -> str:
        return "Attribution patching in a basis"

    def _html_sections(self) -> list[PageSection]:
        from tl_degeneracy.viz.plots import figure_to_html, plot_scatter

        metric = str(self.metadata.get("metric", "metric"))
        intro = (
            f"Metric {metric}: clean {self.clean_metric:.6g}, corrupted "
            f"{self.corrupted_metric:.6g}, {self.metadata.get('n_pairs', '?')} pairs. "
            "Attribution s_i = ((a − a')C)_i (g C⁺ᵀ)_i; patching = metric change when feature i "
            "alone is set to its clean value (batch means)."
        )
        sections = [PageSection("Summary", table(self.summary()), intro)]
        for name, sa in self.sites.items():
            labels = list(range(sa.k))
            a, p, lam = (t.numpy() for t in (sa.attribution, sa.patching, sa.importance))
            a_abs, p_abs = np.abs(a), np.abs(p)
            log_a = bool((lam > 0).all() and (a_abs > 0).all())
            log_p = bool((lam > 0).all() and (p_abs > 0).all())
            plots = [
                plot_scatter(
                    a, p, labels, "attribution", "patching effect", diagonal=True, max_labels=12
                ),
                plot_scatter(
                    lam, a_abs, labels, "importance", "|attribution|", log=log_a, max_labels=12
                ),
                plot_scatter(
                    lam, p_abs, labels, "importance", "|patching effect|", log=log_p, max_labels=12
                ),
            ]
            figs = [figure_to_html(f, alt=f"{name} scatter") for f in plots]
            content: list[Fragment | str] = [
                '<div style="display:flex;flex-wrap:wrap;gap:1em">',
                *figs,
                "</div>",
                table(sa.rows()[:50]),
            ]
            sections.append(
                PageSection(
                    f"{sa.kind.upper()} at {name}",
                    content,
                    "Scatter plots: attribution vs patching (dashed: y = x), |attribution| and "
                    "|patching| vs importance; table: the first 50 features in basis order.",
                )
            )
        return sections


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def compare_attribution(
    model: nn.Module,
    basis_result: BasisResult | Mapping[str, SiteBasis],
    sites: Sequence[SiteLike] | None,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
    max_rows: int = 4096,
    tl_check: bool = True,
    metric_name: str | None = None,
) -> AttributionComparison:
    """Per-feature attribution patching at each site (default: every non-final site of the
    result), true patching of each feature, importances, and site-level sums (ours,
    TransformerLens's when `tl_check`, and the truncation gap).

    One forward + backward on the corrupted tokens serves all sites' gradients; patching runs
    `k` groups per site, `max_rows` sequences per forward.
    """
    _check_pair(clean_tokens, corrupted_tokens)
    bases = _bases(basis_result)
    if sites is None:
        chosen = [b for b in bases.values() if not b.site.is_logits and b.kind != "raw"]
    else:
        chosen = [_lookup(bases, s) for s in sites]
    if any(b.site.is_logits for b in chosen):
        raise ValueError("attribution at the logits is not a patching experiment; pick a hook site")
    site_list = [b.site for b in chosen]
    with torch.no_grad():
        clean_value = float(_batch_metric(metric, model(clean_tokens), clean_tokens))
    clean_acts = capture_sites(model, clean_tokens, site_list)
    corrupt_acts, grads, corrupted_value = site_gradients(
        model, site_list, corrupted_tokens, metric
    )
    results: dict[str, SiteAttribution] = {}
    for basis, clean in zip(chosen, clean_acts):
        start = time.perf_counter()
        name = basis.site.name
        delta = clean.to(torch.float64) - corrupt_acts[name]
        g = grads[name]
        dfeat = delta @ basis.C
        gfeat = g @ basis.C_pinv.T
        attribution = torch.einsum("bpk,bpk->k", dfeat, gfeat)
        site_value = float((delta * g).sum())
        masks = torch.eye(basis.k, dtype=torch.float64)
        patching = _feature_patching(model, basis, corrupted_tokens, metric, dfeat, masks, max_rows)
        site_patch = _site_patching(model, basis.site, corrupted_tokens, metric, delta)
        tl_value = (
            tl_site_attribution(model, basis.site, clean_tokens, corrupted_tokens, metric)
            if tl_check
            else None
        )
        results[name] = SiteAttribution(
            name,
            basis.kind,
            attribution,
            patching,
            basis.importance.to(torch.float64).clone(),
            site_value,
            tl_value,
            site_patch,
            basis.d,
            time.perf_counter() - start,
        )
    metadata = {
        "metric": metric_name or getattr(metric, "__name__", "metric"),
        "n_pairs": int(clean_tokens.shape[0]),
        "batch_reduction": "mean over pairs",
        "basis_kind": (basis_result.kind if isinstance(basis_result, BasisResult) else "mixed"),
        "model": model_identity(model),
    }
    return AttributionComparison(results, clean_value, corrupted_value, metadata)


# ---------------------------------------------------------------------------------------------
# Modular-addition demonstration
# ---------------------------------------------------------------------------------------------

DEMO_SITES = ("blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]")


def format_correlation_table(
    comparisons: Mapping[str, AttributionComparison], top: int | None = None
) -> str:
    """A Markdown table of the rank correlations of several comparisons (keyed by basis kind);
    with `top`, over each site's `top` features of largest |patching| (see
    `SiteAttribution.correlations`)."""
    head = (
        "| basis | site | k | ρ(attribution, patching) | ρ(\\|attribution\\|, Λ) | "
        "ρ(\\|patching\\|, Λ) | site attribution | Σ s_i | relative gap | site patching |"
    )
    lines = [head, "|" + "---|" * 10]
    for kind, comparison in comparisons.items():
        for name, sa in comparison.sites.items():
            rho = sa.correlations(top)
            lines.append(
                f"| {kind.upper()} | `{name}` | {sa.k} | {rho['attribution~patching']:.3f} | "
                f"{rho['|attribution|~importance']:.3f} | {rho['|patching|~importance']:.3f} | "
                f"{sa.site_attribution:.4g} | {sa.feature_sum:.4g} | {sa.relative_gap:.2e} | "
                f"{sa.site_patching:.4g} |"
            )
    return "\n".join(lines)


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
    from tl_degeneracy.experiments.modadd_fit import REFERENCE_SITES
    from tl_degeneracy.models.modadd.checkpoints import load_checkpoint
    from tl_degeneracy.models.modadd.data import all_inputs

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
