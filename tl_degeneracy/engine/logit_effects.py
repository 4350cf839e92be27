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


def logit_readout(
    model: nn.Module, unembed: Float[Tensor, "d_model vocab"] | None = None
) -> Float[Tensor, "d_model vocab"]:
    """What one unit along each direction of the final residual stream does to the logits
    directly (float64, on the CPU): the final normalisation's gain times `W_U`. `unembed`
    replaces the model's unembedding (then without the gain). Compute it once for many sites."""
    if unembed is not None:
        return unembed.detach().cpu().to(torch.float64)
    w_u = getattr(model, "W_U", None)
    if not isinstance(w_u, Tensor):
        raise ValueError(
            f"{type(model).__name__} has no W_U: pass unembed= ([d_model, d_vocab]) for "
            "direct logit effects"
        )
    readout = w_u.detach().cpu().to(torch.float64)
    gain = final_gain(model)
    if gain is not None and gain.shape[-1] == readout.shape[0]:
        readout = gain.detach().cpu().to(torch.float64)[:, None] * readout
    return readout


def direct_logit_effects(
    model: nn.Module,
    basis: SiteBasis,
    features: Sequence[int] | None = None,
    readout: Float[Tensor, "d_model vocab"] | None = None,
) -> Float[Tensor, "f vocab"]:
    """Per feature (default: all), its direct effect on each logit (float64, on the CPU): what
    it writes into the stream (`stream_directions`) times `readout` (default:
    `logit_readout(model)`). At the logits site a direction is already over the vocabulary."""
    if basis.site.is_logits:
        rows = basis.C_pinv.to(torch.float64)
        picked = rows if features is None else rows[torch.as_tensor(list(features))]
        return picked.cpu()
    readout = readout if readout is not None else logit_readout(model)
    return stream_directions(model, basis, features).cpu() @ readout
