"""Sections: the map from one site's activation to a later site's (docs/concepts.md, "Sites and
sections"), everything outside the input site's selected positions held at its value on the
data point. How a section is evaluated (through the model's hooks, one block alone, or a closed
form) is decided in one place, `engine.structures.structure_of`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.capture import capture_sites, run_with_site_values
from tl_degeneracy.engine.sites import Site


@dataclass(frozen=True)
class Section:
    """The map F from `inp`'s activation to `out`'s activation."""

    inp: Site
    out: Site

    @property
    def name(self) -> str:
        return f"{self.inp.name}->{self.out.name}"

    def matched_positions(self, n_pos: int) -> tuple[Tensor, Tensor]:
        """Slots (in the input's and the output's selections) of the positions in both: the
        positions at which a position-wise section maps input to output."""
        pin, pout = self.inp.index(n_pos).tolist(), self.out.index(n_pos).tolist()
        common = [p for p in pout if p in pin]
        return torch.tensor([pin.index(p) for p in common], dtype=torch.long), torch.tensor(
            [pout.index(p) for p in common], dtype=torch.long
        )

    def outputs_in_input(self, n_pos: int) -> Tensor:
        """For each output position, its slot in the input's selection (a position-wise
        section needs every output position among the input positions)."""
        slots_in, slots_out = self.matched_positions(n_pos)
        if len(slots_out) != self.out.n_positions(n_pos):
            raise ValueError(f"{self.name}: output positions must be among the input positions")
        return slots_in


def run_section(
    model: nn.Module,
    inputs: Tensor,
    section: Section,
    transform: Callable[[Float[Tensor, "batch p_in d_in"]], Float[Tensor, "batch p_in d_in"]],
) -> Float[Tensor, "batch p_out d_out"]:
    """The output site's activation when the input site's activation `f` is replaced by
    `transform(f)`, through the model's own hooks (the generic path; `transform` may create
    autograd leaves)."""
    (clean,) = capture_sites(model, inputs, [section.inp], check=False)
    with torch.enable_grad():
        return run_with_site_values(model, inputs, section.inp, transform(clean), section.out)
