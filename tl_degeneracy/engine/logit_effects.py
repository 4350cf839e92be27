"""The direct effect of a feature on the logits: what one unit of it writes into the residual
stream (`composite.stream_directions`), through the final normalisation's gain (its input-
dependent scale left out) and the unembedding. One definition for the report's and the prompt
graph's "promoted and suppressed tokens"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import hooked_state_dict, is_transformer
from tl_degeneracy.engine.composite import stream_directions


def final_gain(model: nn.Module) -> Tensor | None:
    """The final normalisation's elementwise weight as a HookedTransformer holds it (on either
    API; Gemma's `1 + w`), or None (no final norm, or its weight folded into `W_U`)."""
    if not is_transformer(model):
        return None
    return hooked_state_dict(model).get("ln_final.w")


def direct_logit_effects(
    model: nn.Module,
    basis: SiteBasis,
    features: Sequence[int] | None = None,
    unembed: Float[Tensor, "d_model vocab"] | None = None,
) -> Float[Tensor, "f vocab"]:
    """Per feature (default: all), its direct effect on each logit (float64, on the CPU). At
    the logits site a feature's direction is already over the vocabulary. `unembed` defaults to
    the model's `W_U` (and then the final gain applies)."""
    if basis.site.is_logits:
        rows = basis.C_pinv.to(torch.float64)
        picked = rows if features is None else rows[torch.as_tensor(list(features))]
        return picked.cpu()
    rows = stream_directions(model, basis, features).cpu()
    if unembed is None:
        unembed = getattr(model, "W_U", None)
        if not isinstance(unembed, Tensor):
            raise ValueError(
                f"{type(model).__name__} has no W_U: pass unembed= ([d_model, d_vocab]) for "
                "direct logit effects"
            )
        gain = final_gain(model)
        if gain is not None and gain.shape[-1] == rows.shape[-1]:
            rows = rows * gain.detach().cpu().to(torch.float64)
    assert unembed is not None
    return rows @ unembed.detach().cpu().to(torch.float64)
