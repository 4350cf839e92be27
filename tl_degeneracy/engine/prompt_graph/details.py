"""What the viewer shows about a feature when it is clicked: its activations over a corpus (for
the top-activating contexts) and its direct effect on the logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import StopForward, frozen_parameters, run_with_hooks
from tl_degeneracy.engine.logit_effects import direct_logit_effects, logit_readout
from tl_degeneracy.engine.prompt_graph.site_io import _read_site
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.tokens import validate_tokens


def _by_hook(basis: BasisResult | Mapping[str, SiteBasis]) -> dict[str, SiteBasis]:
    bases = basis.bases if isinstance(basis, BasisResult) else basis
    return {b.site.hook: b for b in bases.values() if not b.site.is_logits}


def corpus_features(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    tokens: Int[Tensor, "n pos"],
    wanted: Mapping[str, Sequence[int]],
    batch_size: int = 8,
) -> dict[str, Float[Tensor, "n pos f"]]:
    """Values of the `wanted` features (`{site hook: [feature, ...]}`) at every position of
    every corpus row, float32, one forward per batch that stops after the last site."""
    by_hook = _by_hook(basis)
    missing = set(wanted) - set(by_hook)
    if missing:
        raise KeyError(f"no basis at {sorted(missing)}; sites: {list(by_hook)}")
    hooks = [h for h in by_hook if h in wanted and len(wanted[h]) > 0]
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    if not hooks:
        return {}
    last = hooks[-1]
    for lo in range(0, tokens.shape[0], batch_size):
        batch = validate_tokens(model, tokens[lo : lo + batch_size])
        fns = []
        for h in hooks:
            b = by_hook[h]
            cols = torch.tensor(list(wanted[h]), dtype=torch.long)

            def keep(act: Tensor, h: str = h, b: SiteBasis = b, cols: Tensor = cols) -> None:
                here = b.to(act.device)
                out[h].append(((act.to(torch.float64) - here.mean) @ here.C[:, cols]).float().cpu())
                if h == last:
                    raise StopForward

            fns += _read_site(model, Site(h), keep)
        with torch.no_grad(), frozen_parameters(model):
            run_with_hooks(model, batch, fns, stop_early=True)
    return {h: torch.cat(v) for h, v in out.items()}


def feature_logit_effects(
    model: nn.Module,
    basis: BasisResult | Mapping[str, SiteBasis],
    wanted: Mapping[str, Sequence[int]],
) -> dict[str, Float[Tensor, "f vocab"]]:
    """The direct effect of one unit of each wanted feature on the logits
    (`engine.logit_effects.direct_logit_effects`), keyed by site hook."""
    by_hook = _by_hook(basis)
    readout = logit_readout(model)
    return {
        h: direct_logit_effects(model, by_hook[h], feats, readout) for h, feats in wanted.items()
    }
