"""Which parameters an SGLD estimate moves: filters on the model's state-dict names, or
boolean masks over their entries.

A section's λ̂ moves only that section's parameters and holds the rest at the trained values;
the sources count parameters per section with the same names. Names are those of
`model.state_dict()` (HookedTransformer names, or the Bridge's `blocks.0.attn.q.weight`
style), so a filter such as `"^blocks.0.mlp."` (a regex) selects one MLP on either API. A
module that owns only some entries of a weight (some neurons, some heads, a block of the
residual stream) is a mapping from names to masks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor, nn

ParamMasks = Mapping[str, Bool[Tensor, "..."]]
"""Parameter name → boolean mask of the parameter's shape: the entries that move."""

ParamFilter = None | str | Sequence[str] | Callable[[str], bool] | ParamMasks
"""Which parameters to sample: None (all), a regex searched in each name, a list of exact
names, a predicate on the name, or masks over the entries of some parameters."""


def matches(params: ParamFilter, name: str) -> bool:
    """True when (some entries of) the parameter `name` are chosen by the filter `params`."""
    if params is None:
        return True
    if isinstance(params, Mapping):
        return name in params and bool(params[name].any())
    if isinstance(params, str):
        return re.search(params, name) is not None
    if callable(params):
        return bool(params(name))
    return name in params


def select_parameters(model: nn.Module, params: ParamFilter = None) -> list[str]:
    """Names of the model's parameters chosen by `params` (see `ParamFilter`), in model order."""
    named = state_dict_parameters(model)
    names = list(named)
    if isinstance(params, Mapping):
        for n, mask in params.items():
            if n in named and tuple(mask.shape) != tuple(named[n].shape):
                raise ValueError(
                    f"the mask of {n} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(named[n].shape)}: give a boolean mask of the parameter's shape"
                )
    if params is not None and not isinstance(params, str) and not callable(params):
        unknown = [n for n in params if n not in names]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]}; the model has {names}")
    chosen = [n for n in names if matches(params, n)]
    if not chosen:
        raise ValueError(f"the filter {params!r} selects no parameter; the model has {names}")
    return chosen


def state_dict_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters keyed by their state-dict name, each tensor once: the one place
    that says which weights the package counts and moves (the sources' N, SGLD, masks).

    A state-dict entry is kept when it *is* one of `model.parameters()` (by identity), and
    only under its first name: a tied weight (a Bridge's `unembed.weight`, the same tensor as
    `embed.weight`) appears once, as `embed.weight`. A Bridge around GPT-2 also lists the
    fused `attn.qkv` weight among its parameters, beside the `attn.q/k/v` views of it that its
    forward reads and its state dict names; the fused tensor is not in the state dict, so it is
    neither counted nor moved. (Matching by `data_ptr` would confuse it with the `q` view,
    which starts at the same address.)
    """
    params = {id(p) for p in model.parameters()}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter) and id(t) in params and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def parameter_masks(model: nn.Module, params: ParamFilter = None) -> dict[str, Tensor]:
    """The entries `params` chooses, as one boolean mask per chosen parameter."""
    named = state_dict_parameters(model)
    if isinstance(params, Mapping):
        select_parameters(model, params)  # checks names and shapes
        return {n: params[n].to(torch.bool) for n in named if matches(params, n)}
    return {
        n: torch.ones_like(named[n], dtype=torch.bool) for n in select_parameters(model, params)
    }


def union(filters: Sequence[ParamFilter]) -> ParamFilter:
    """The parameters (entries) chosen by any of `filters`; masks are joined entry by entry."""
    masks = [f for f in filters if isinstance(f, Mapping)]
    if not masks:
        return lambda name: any(matches(f, name) for f in filters)
    if len(masks) < len(filters):
        raise ValueError(
            "cannot join name filters with entry masks without the model: convert them with "
            "parameter_masks(model, filter)"
        )
    out: dict[str, Tensor] = {}
    for m in masks:
        for n, mask in m.items():
            out[n] = out[n] | mask.to(torch.bool) if n in out else mask.to(torch.bool)
    return out
