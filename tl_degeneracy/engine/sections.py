"""Sections: the map from one site's activation to a later site's, evaluated on the model's
own hooks (method.md §1). Inject at the input site, read at the output site, stop early.

Everything outside the input site's selected positions keeps its value on the data point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import StopForward, replace_hooks, run_with_hooks
from tl_degeneracy.engine.sites import Site


@dataclass(frozen=True)
class Section:
    """The map F from `inp`'s activation to `out`'s activation."""

    inp: Site
    out: Site

    @property
    def name(self) -> str:
        return f"{self.inp.name}->{self.out.name}"


def run_section(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    section: Section,
    transform: Callable[[Float[Tensor, "batch p_in d_in"]], Float[Tensor, "batch p_in d_in"]],
) -> Float[Tensor, "batch p_out d_out"]:
    """Run the model with the input site's activation replaced by `transform(activation)`
    and return the output site's activation. `transform` may create autograd leaves."""

    def write(act: Tensor) -> Tensor:
        idx = section.inp.index(act.shape[1]).to(act.device)
        new = transform(act[:, idx])
        return act.index_copy(1, idx, new.to(act.dtype))

    hooks = replace_hooks(model, section.inp.hook, write)
    store: dict[str, Tensor] = {}
    if not section.out.is_logits:

        def read(act: Tensor, hook=None) -> None:
            store["out"] = section.out.select(act)
            raise StopForward

        hooks.append((section.out.hook, read))
    out = run_with_hooks(model, tokens, hooks, stop_early=True)
    if section.out.is_logits:
        assert out is not None
        return section.out.select(out)
    return store["out"]


def section_with_input(
    model: nn.Module, tokens: Int[Tensor, "batch pos"], section: Section
) -> tuple[Float[Tensor, "batch p_in d_in"], Float[Tensor, "batch p_out d_out"]]:
    """One forward that returns the input activation as an autograd leaf `x` and the output
    `y = F(x)` connected to it, ready for vector-Jacobian products."""
    leaf: dict[str, Tensor] = {}

    def make_leaf(a: Tensor) -> Tensor:
        x = a.detach().clone().requires_grad_(True)
        leaf["x"] = x
        return x

    with torch.enable_grad():
        y = run_section(model, tokens, section, make_leaf)
    return leaf["x"], y
