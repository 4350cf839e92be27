"""Whether a basis can act on a model, and whether it was fitted on it: the checks every entry
point that applies a basis (attach, node ablation, prompt graphs, attribution comparisons)
makes before it runs the model. A basis that cannot act (a missing hook, another width) is an
error; one fitted on other weights of the same shape is a warning, since applying a basis to a
fine-tuned variant is a legitimate experiment."""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Mapping

from torch import nn

from tl_degeneracy.engine.artifacts import ArtifactError, compare_model
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import hook_names, is_transformer, model_cfg
from tl_degeneracy.engine.sites import site_parts

_RESIDUAL = re.compile(r"^blocks\.\d+\.hook_resid_(pre|mid|post)$")
_FIX = "Use a basis fitted on this model (BasisResult.load(path, model=model) checks one)."


def width_error(model: nn.Module, basis: SiteBasis, width: int) -> ArtifactError:
    """The error for an activation of `width` units at a site whose basis is `basis.d` wide."""
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
        if b.site.is_logits:  # the model's output, no hook point
            continue
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
                raise width_error(model, b, width)


_WARNED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
"""Per model, the mismatches already reported by `warn_if_fitted_elsewhere`."""


def warn_if_fitted_elsewhere(
    model: nn.Module, result: BasisResult | Mapping[str, SiteBasis], stacklevel: int = 3
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
        "the model it was fitted on is fine: silence this warning with check_weights=False "
        "(attach, ablate_nodes) or warnings.filterwarnings('ignore', 'this basis was fitted').",
        UserWarning,
        stacklevel=stacklevel,  # the line of the user's call that applied the basis
    )
