"""Gradients of a metric at sites, ours and TransformerLens's (docs/attribution.md).

`site_gradients` runs one forward and one backward for all single-part sites (zero leaves added
at their positions: total derivatives) and one for each composite site, whose parts are replaced
by leaves of their clean values, so that its gradient is the partial derivative of each part
with the other held fixed (the site is a cut; `capture.gradient_hooks`). `tl_site_attribution`
is TransformerLens's own site-level value (`tools.analysis.attribution_patching`), the
cross-check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import per_sequence
from tl_degeneracy.engine.capture import as_positions, capture_sites, gradient_hooks
from tl_degeneracy.engine.compat import (
    frozen_parameters,
    hook_names,
    is_bridge,
    parameters_requiring_grad,
    run_with_hooks,
    temporary_hooks,
)
from tl_degeneracy.engine.sites import Site, site_parts
from tl_degeneracy.engine.tokens import validate_pair, validate_tokens

AttributionMetric = Callable[
    [Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"]],
    Float[Tensor, " batch"] | Float[Tensor, ""],
]
"""`metric(logits, tokens)`: one value per sequence (averaged here) or one scalar. `tokens` are
the tokens the run was fed (the corrupted ones for corrupted and patched runs)."""


def batch_metric(metric: AttributionMetric, logits: Tensor, tokens: Tensor) -> Tensor:
    """The batch-mean metric of one run (`checked_mean`)."""
    return checked_mean(metric(logits, tokens), tokens.shape[0])


def checked_mean(value: Tensor | float, batch: int) -> Float[Tensor, ""]:
    """A metric's output as one float64 scalar, the mean over sequences (a scalar as it is;
    `ablation.per_sequence` checks the shape); a NaN or infinite value is refused here, where
    it arises, rather than spread through every score as NaN."""
    values = per_sequence(value, batch, scalar_ok=True)
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        where = (
            "its value" if values.ndim == 0 else f"{int(bad.sum())} of {values.numel()} sequences"
        )
        raise ValueError(
            f"the metric is NaN or infinite ({where}) on this run: a metric must be finite on "
            "the prompts (check its logs and divisions, and that the model's logits are finite "
            "in its dtype)"
        )
    return values.mean()


def _groups(model: nn.Module, sites: Sequence[Site]) -> list[list[Site]]:
    """One forward for every single-part site, one for each composite site."""
    plain = [s for s in sites if len(site_parts(model, s)) == 1]
    composite = [[s] for s in sites if len(site_parts(model, s)) > 1]
    return ([plain] if plain else []) + composite


def site_gradients(
    model: nn.Module,
    sites: Sequence[Site],
    tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Activations and the batch-mean metric's gradient at every site: `(activations,
    gradients, metric value)`, tensors `[batch, site_pos, d]` float64."""
    tokens = validate_tokens(model, tokens)
    acts = {s.name: a.to(torch.float64) for s, a in zip(sites, capture_sites(model, tokens, sites))}
    grads: dict[str, Tensor] = {}
    value = float("nan")
    for group in _groups(model, sites):
        leaves: dict[str, list[Tensor]] = {s.name: [] for s in group}
        hooks: list = []
        for site in group:
            hooks += gradient_hooks(model, site, leaves[site.name])
        with frozen_parameters(model), torch.enable_grad():
            logits = run_with_hooks(model, tokens, hooks)
            metric_value = batch_metric(metric, logits, tokens)
            if not metric_value.requires_grad:
                raise ValueError(
                    "the metric's value has no gradient: compute it from the logits with torch "
                    "operations, one value per sequence (a Python float, `.item()`, "
                    "`.detach()` or NumPy cut it from the model)"
                )
            flat = [leaf for s in group for leaf in leaves[s.name]]
            got = torch.autograd.grad(metric_value, flat, allow_unused=True)
        value = float(metric_value.detach())
        at = 0
        for site in group:
            parts = leaves[site.name]
            gs = [
                torch.zeros_like(leaf) if g is None else g
                for leaf, g in zip(parts, got[at : at + len(parts)])
            ]
            at += len(parts)
            grads[site.name] = torch.cat(gs, -1).to(torch.float64)
    return acts, grads, value


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

    with torch.set_grad_enabled(compute_gradient):
        with temporary_hooks(model, [(n, keep(n)) for n in names_filter]):
            value = metric_fn(model(tokens))
        acts = {n: t.detach().clone() for n, t in live.items()}
        grads: dict[str, Tensor | None] = dict.fromkeys(live)
        if compute_gradient:
            got = torch.autograd.grad(value, list(live.values()), allow_unused=True)
            grads = {n: None if g is None else g.detach() for n, g in zip(live, got)}
    return SimpleNamespace(activations=acts, gradients=grads, metric=value.detach())


def _tl_gradient_cache() -> Callable[..., Any]:
    try:
        from transformer_lens.tools.analysis.attribution_patching import (
            cache_activation_and_gradient,
        )
    except ImportError:  # pragma: no cover - TransformerLens releases without the module
        return _hook_gradient_cache
    return cache_activation_and_gradient


def tl_hook(model: nn.Module, site: Site) -> str:
    """The hook TransformerLens's attribution patching measures for a site: the site's own
    hook (for a composite site, its component; the stream part's TransformerLens gradient is
    the total derivative, not the site's partial one)."""
    return site_parts(model, site)[0]


def tl_site_attribution(
    model: nn.Module,
    site: Site,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> float:
    """The attribution `(a − a')·g` (batch mean) at the site's hook (`tl_hook`) computed by
    TransformerLens's own gradient cache (`tools.analysis.attribution_patching.
    cache_activation_and_gradient`, the machinery of its `attribution_patch`), summed over the
    site's positions.

    On the Bridge `hook_resid_mid` is an alias of the MLP's input, whose gradient misses the
    residual path; there the gradient at `hook_resid_post` (that path) is added.
    """
    return tl_sites_attribution(model, [site], clean_tokens, corrupted_tokens, metric)[0]


def tl_sites_attribution(
    model: nn.Module,
    sites: Sequence[Site],
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
) -> list[float]:
    """`tl_site_attribution` of every site from one clean and one corrupted run of the cache
    (a forward, and a forward and a backward), not three passes per site."""
    clean_tokens, corrupted_tokens = validate_pair(model, clean_tokens, corrupted_tokens)
    cache = _tl_gradient_cache()
    hooks = [tl_hook(model, site) for site in sites]
    alias = {
        h: h.replace("hook_resid_mid", "hook_resid_post")
        for h in hooks
        if is_bridge(model) and h.endswith("hook_resid_mid")
    }
    names = list(dict.fromkeys([*hooks, *alias.values()]))
    if "hook_embed" in hook_names(model) and "hook_embed" not in names:
        # The cache drives its backward to the tensors its forward hooks saw. On the Bridge a
        # converted hook point (`attn.hook_z`) hands its hooks a view the model never uses, so
        # the backward would stop short of it and its gradient read None (taken as 0). The
        # embedding, which every path starts from, makes the backward pass through every hook.
        names.append("hook_embed")
    clean = cache(
        model,
        clean_tokens,
        lambda logits: batch_metric(metric, logits, clean_tokens),
        names_filter=list(dict.fromkeys(hooks)),
        compute_gradient=False,
    )
    with torch.enable_grad(), parameters_requiring_grad(model, True):
        corrupt = cache(
            model,
            corrupted_tokens,
            lambda logits: batch_metric(metric, logits, corrupted_tokens),
            names_filter=names,
        )
    values = []
    for site, hook in zip(sites, hooks):
        grad = corrupt.gradients[hook]
        if grad is None:  # the hook does not reach the metric
            values.append(0.0)
            continue
        grad = as_positions(grad.to(torch.float64))
        if hook in alias and corrupt.gradients[alias[hook]] is not None:
            grad = grad + as_positions(corrupt.gradients[alias[hook]].to(torch.float64))
        delta = as_positions(clean.activations[hook].to(torch.float64)) - as_positions(
            corrupt.activations[hook].to(torch.float64)
        )
        idx = site.index(delta.shape[1], delta.device)
        values.append(float((delta[:, idx] * grad[:, idx]).sum()))
    return values
