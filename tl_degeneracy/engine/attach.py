"""Attach a fitted basis to a model: features become hook points, forward stays exact.

Like an SAE spliced in at a hook point: at each site the activation is mapped to features
`f̂ = (f − μ) C`, passed through a HookPoint named `{hook}.hook_{kind}_features` (cacheable with
`run_with_cache`, patchable with `hooks`), and mapped back as `f + (f̂' − f̂) C⁺`, so the forward
is unchanged unless someone edits the features. Node ablation (docs/concepts.md, "Ablations")
keeps the top k features: `f ← μ + f̂_{:k} C⁺_{:k}`. Sites are read and written through
`engine.capture`, so composite MLP and attention sites work like residual ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import (
    capture_sites,
    not_rewritable_error,
    rewritable,
    transform_hooks,
)
from tl_degeneracy.engine.compat import (
    register_hook_point,
    temporary_hooks,
    unregister_hook_point,
)
from tl_degeneracy.engine.model_match import check_fits, warn_if_fitted_elsewhere, width_error
from tl_degeneracy.engine.sites import SiteLike, site_key


def feature_hook_name(basis: SiteBasis) -> str:
    """Name of the hook point carrying a site's features, e.g.
    `blocks.0.hook_resid_mid.hook_lib_features`."""
    return f"{basis.site.hook}.hook_{basis.kind}_features"


def _site_bases(result: BasisResult | Mapping[str, SiteBasis]) -> list[SiteBasis]:
    bases = result.bases if isinstance(result, BasisResult) else result
    return [b for b in bases.values() if not b.site.is_logits and b.kind != "raw"]


def _site_hooks(
    model: nn.Module, basis: SiteBasis, hook_point: HookPoint | None, keep: int | None
) -> list:
    def transform(f: Tensor) -> Tensor | None:
        if f.shape[-1] != basis.d:
            raise width_error(model, basis, int(f.shape[-1]))
        b = basis.to(f.device)
        feats = b.features(f)
        if keep is not None:
            return b.mean + feats[..., :keep] @ b.C_pinv[:keep]
        edited = hook_point(feats) if hook_point is not None else feats
        if edited is feats:
            return None
        return f.to(torch.float64) + (edited - feats) @ b.C_pinv

    return transform_hooks(model, basis.site, transform)


@contextmanager
def _attached(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    keep: Mapping[SiteLike, int] | None,
    check_weights: bool,
) -> Iterator[nn.Module]:
    bases = _site_bases(result)
    names = [b.site.name for b in bases]
    kept = {site_key(site, names, "basis to ablate"): k for site, k in (keep or {}).items()}
    for b in bases:
        if b.site.name in kept:
            b.check_kept(kept[b.site.name])
            if not rewritable(model, b.site):
                raise not_rewritable_error(b.site)
    check_fits(model, bases)
    if check_weights:
        # the caller of attach or ablate_nodes, through two context managers
        warn_if_fitted_elsewhere(model, result, stacklevel=6)
    replaced: list[tuple[str, HookPoint | None]] = []  # an attach inside another shadows it
    hooks: list = []
    try:
        for b in bases:
            hp = HookPoint()
            name = feature_hook_name(b)
            replaced.append((name, register_hook_point(model, name, hp)))
            hooks += _site_hooks(model, b, hp, kept.get(b.site.name))
        with ExitStack() as stack:
            stack.enter_context(temporary_hooks(model, hooks))
            yield model
    finally:
        for name, previous in reversed(replaced):
            unregister_hook_point(model, name, previous)


@contextmanager
def attach(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    keep: Mapping[SiteLike, int] | None = None,
    check_weights: bool = True,
) -> Iterator[nn.Module]:
    """Within the block, features at each site are hook points on `model` and, for sites in
    `keep` (keyed by name, `Site` or short form), only the top `keep[site]` features survive
    (node ablation).

    Raises `ArtifactError` when the basis cannot act on `model` (a site the model lacks, a
    width that is not the basis's). At a composite site of a parallel-attention block
    (GPT-NeoX, GPT-J) the features are read, not written: they can be cached, and editing
    them (or `keep` there) raises `SiteError`; ablate there with `node_ablation_curve`. With
    `check_weights`, warns once when `model` is not the model `result` was fitted on
    (`warn_if_fitted_elsewhere`); `check_weights=False` for a deliberate transfer, e.g. to a
    fine-tuned variant.

    Example:
        with attach(model, lib):
            _, cache = model.run_with_cache(tokens)
        cache["blocks.0.hook_resid_mid.hook_lib_features"]
    """
    with _attached(model, result, keep, check_weights):
        yield model


@contextmanager
def ablate_nodes(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    site: SiteLike,
    k: int,
    check_weights: bool = True,
) -> Iterator[nn.Module]:
    """Keep only the top `k` features (plus the mean) at `site` (a name, `Site` or short form)
    inside the block (checks as `attach`)."""
    with _attached(model, result, {site: k}, check_weights):
        yield model


@torch.no_grad()
def site_features(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "batch pos"],
) -> dict[str, Float[Tensor, "batch site_pos k"]]:
    """Features at every site of `result` for one batch, keyed by site name (float64)."""
    bases = _site_bases(result)
    acts = capture_sites(model, tokens, [b.site for b in bases])
    return {b.site.name: b.features(act) for b, act in zip(bases, acts)}
