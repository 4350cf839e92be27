"""What identifies a model in saved results: its configuration, its weight processing, and a
fingerprint of every weight (so that a result refuses a model it was not computed on, and a
change of any block's weights shows)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from tl_degeneracy.engine.compat import api_of, hooked_state_dict, is_transformer, model_cfg


def weight_processing(model: nn.Module) -> dict[str, Any]:
    """Weight-processing flags of a model, as far as they can be read from it.

    Loaders of this package set `model.tl_degeneracy_weight_processing` explicitly; otherwise
    the config's own record is used.
    """
    explicit = getattr(model, "tl_degeneracy_weight_processing", None)
    if explicit is not None:
        return dict(explicit)
    if not is_transformer(model):
        return {}
    cfg = model_cfg(model)
    return {
        "fold_ln": str(getattr(cfg, "normalization_type", None)).endswith("Pre"),
        "center_writing_weights": None,
        "center_unembed": None,
        "normalization_type": getattr(cfg, "normalization_type", None),
    }


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Config fields and a digest of every weight that identify a model; saved with every
    result, so that a result refuses a model it was not computed on."""
    if not is_transformer(model):
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        return {
            "model_name": type(model).__name__,
            "api": "module",
            "weight_shapes": shapes,
            "weight_digest": weight_digest(model),
        }
    cfg = model_cfg(model)
    fields = {
        k: getattr(cfg, k, None)
        for k in (
            "model_name",
            "n_layers",
            "d_model",
            "n_heads",
            "d_head",
            "d_mlp",
            "d_vocab",
            "n_ctx",
        )
    }
    fields["act_fn"] = getattr(cfg, "act_fn", None)
    fields["api"] = api_of(model)
    fields["weight_digest"] = weight_digest(model)
    return fields


def weight_digest(model: nn.Module) -> str:
    """A digest of every weight, stable across the two APIs and across dtypes and devices.

    Per tensor (HookedTransformer names and layouts on either API) four sums rounded to 5
    significant digits, so that the same weights held in float32 or float64, on any device,
    as a HookedTransformer or a Bridge, agree, and a change of any block's weights shows.
    """
    h = hashlib.sha256()
    state = hooked_state_dict(model) if is_transformer(model) else model.state_dict()
    for key in sorted(state):
        t = state[key].detach()
        if not t.is_floating_point():
            continue
        t = t.flatten().to(torch.float64)
        stats = torch.stack([t.sum(), t.abs().sum(), (t * t).sum(), t[: min(64, t.numel())].sum()])
        h.update(key.encode())
        h.update(" ".join(f"{x:.5g}" for x in stats.tolist()).encode())
    return h.hexdigest()[:16]


def weight_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """Per weight tensor (HookedTransformer names on either API): mean |w| and root mean
    square, 6 significant digits. Cheap (one pass over the weights) and stable across APIs,
    devices and dtypes up to their rounding."""
    state = hooked_state_dict(model) if is_transformer(model) else model.state_dict()
    out: dict[str, list[float]] = {}
    for key in sorted(state):
        t = state[key].detach()
        if not t.is_floating_point() or t.numel() == 0:
            continue
        t = t.to(torch.float64)
        stats = torch.stack([t.abs().mean(), t.square().mean().sqrt()]).tolist()
        out[key] = [float(f"{x:.6g}") for x in stats]
    return out


def set_weight_processing(model: nn.Module, flags: dict[str, Any]) -> None:
    """Record how a loader processed the weights, as `model.tl_degeneracy_weight_processing`
    (read back by `weight_processing`)."""
    hooked: Any = model  # nn.Module.__setattr__ is typed for tensors and modules only
    hooked.tl_degeneracy_weight_processing = flags
