"""Attach a fitted basis to a model: features become hook points, forward stays exact.

Like an SAE spliced in at a hook point: at each site the activation is mapped to features
`f̂ = (f − μ) C`, passed through a HookPoint named `{hook}.hook_{kind}_features` (cacheable with
`run_with_cache`, patchable with `hooks`), and mapped back as `f + (f̂' − f̂) C⁺`, so the forward
is unchanged unless someone edits the features. Node ablation (docs/concepts.md, "Ablations")
keeps the top k features: `f ← μ + f̂_{:k} C⁺_{:k}`. Sites are read and written through
`engine.capture`, so composite MLP and attention sites work like residual ones.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_degeneracy.engine.artifacts import ArtifactError, compare_model
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import capture_sites, transform_hooks
from tl_degeneracy.engine.compat import (
    hook_names,
    is_transformer,
    model_cfg,
    register_hook_point,
    unregister_hook_point,
)
from tl_degeneracy.engine.sites import Site, site_parts


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
            raise _width_error(model, basis, int(f.shape[-1]))
        b = basis.to(f.device)
        feats = b.features(f)
        if keep is not None:
            return b.mean + feats[..., :keep] @ b.C_pinv[:keep]
        edited = hook_point(feats) if hook_point is not None else feats
        if edited is feats:
            return None
        return f.to(torch.float64) + (edited - feats) @ b.C_pinv

    return transform_hooks(model, basis.site, transform)


_FIX = "Use a basis fitted on this model (BasisResult.load(path, model=model) checks one)."


def _width_error(model: nn.Module, basis: SiteBasis, width: int) -> ArtifactError:
    parts = site_parts(model, basis.site)
    what = f"{parts[0]} with the stream at {parts[1]}" if len(parts) > 1 else parts[0]
    return ArtifactError(
        f"the basis does not fit this model: at site {basis.site.name} the basis is {basis.d} "
        f"wide, but this model's activation there ({what}) is {width} wide. {_FIX}"
    )


def check_fits(model: nn.Module, bases: list[SiteBasis]) -> None:
    """Raise `ArtifactError` naming the site when a basis cannot act on `model`: a hook the
    model lacks (a site of a deeper model), or a residual-stream site whose width is not the
    model's `d_model`. Other widths are checked at the site's first activation (a composite
    site's width is known only then)."""
    valid = set(hook_names(model))
    transformer = is_transformer(model)
    for b in bases:
        missing = [h for h in site_parts(model, b.site) if h not in valid]
        if missing:
            layers = model_cfg(model).n_layers if transformer else None
            depth = f" (it has {layers} layers)" if layers is not None else ""
            raise ArtifactError(
                f"the basis does not fit this model: its site {b.site.name} needs the hook "
                f"{missing[0]!r}, which this model does not have{depth}. {_FIX}"
            )
        if transformer and _RESIDUAL.match(b.site.hook):
            width = int(model_cfg(model).d_model)
            if width != b.d:
                raise _width_error(model, b, width)


_RESIDUAL = re.compile(r"^blocks\.\d+\.hook_resid_(pre|mid|post)$")

_WARNED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
"""Per model, the mismatches already reported by `warn_if_fitted_elsewhere`."""


def warn_if_fitted_elsewhere(
    model: nn.Module, result: BasisResult | Mapping[str, SiteBasis]
) -> None:
    """Warn once (per model and difference) when `result` records a model other than `model`:
    weights that differ from its fingerprint, or another configuration of the same widths.

    Not an error: a basis applied to a fine-tuned variant of the model it was fitted on is a
    legitimate experiment. Bases without a recorded model (a mapping of `SiteBasis`) are not
    checked. Costs a cached fingerprint comparison (milliseconds) per call; the first call
    after the weights change reads every weight once."""
    if not isinstance(result, BasisResult):
        return
    meta = result.metadata
    if not isinstance(meta.get("model"), dict) and not isinstance(
        meta.get("weight_fingerprint"), dict
    ):
        return
    problem, _ = compare_model(meta, model, "basis")
    if problem is None:
        return
    warned = _WARNED.setdefault(model, set())
    if problem in warned:
        return
    warned.add(problem)
    warnings.warn(
        f"{problem.replace('computed', 'fitted')} Applying a basis to a fine-tuned variant of "
        "the model it was fitted on is fine; pass check_weights=False to attach or "
        "ablate_nodes to silence this warning.",
        UserWarning,
        stacklevel=6,  # the caller of attach or ablate_nodes (through two context managers)
    )


@contextmanager
def _attached(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    keep: Mapping[str, int] | None,
    check_weights: bool,
) -> Iterator[nn.Module]:
    keep = dict(keep or {})
    bases = _site_bases(result)
    unknown = set(keep) - {b.site.name for b in bases}
    if unknown:
        raise KeyError(
            f"cannot ablate at {sorted(unknown)}: sites are {[b.site.name for b in bases]}"
        )
    for b in bases:
        if b.site.name in keep:
            b.check_kept(keep[b.site.name])
    check_fits(model, bases)
    if check_weights:
        warn_if_fitted_elsewhere(model, result)
    names = []
    hooks: list = []
    for b in bases:
        hp = HookPoint()
        name = feature_hook_name(b)
        register_hook_point(model, name, hp)
        names.append(name)
        hooks += _site_hooks(model, b, hp, keep.get(b.site.name))
    hooked: Any = model  # hooks() is a method of either API, not of nn.Module
    try:
        with ExitStack() as stack:
            stack.enter_context(hooked.hooks(fwd_hooks=hooks))
            yield model
    finally:
        for name in names:
            unregister_hook_point(model, name)


@contextmanager
def attach(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    keep: Mapping[str, int] | None = None,
    check_weights: bool = True,
) -> Iterator[nn.Module]:
    """Within the block, features at each site are hook points on `model` and, for sites in
    `keep`, only the top `keep[site]` features survive (node ablation).

    Raises `ArtifactError` when the basis cannot act on `model` (a site the model lacks, a
    width that is not the basis's). With `check_weights`, warns once when `model` is not the
    model `result` was fitted on (`warn_if_fitted_elsewhere`); `check_weights=False` for a
    deliberate transfer, e.g. to a fine-tuned variant.

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
    site: Site | str,
    k: int,
    check_weights: bool = True,
) -> Iterator[nn.Module]:
    """Keep only the top `k` features (plus the mean) at `site` inside the block (checks as
    `attach`)."""
    name = site.name if isinstance(site, Site) else site
    with _attached(model, result, {name: k}, check_weights):
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
