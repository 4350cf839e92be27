"""The generic structure: any section of any model, run through the model's own hooks from its
inputs (the prefix before the input site included). Always correct, never fast; every other
structure is tested against it, and `structures.autograd_only()` makes every section use it."""

from __future__ import annotations

from torch import Tensor

from tl_degeneracy.engine.capture import (
    _read_hooks,
    as_positions,
    leaf_hooks,
    run_with_site_values,
)
from tl_degeneracy.engine.compat import run_with_hooks
from tl_degeneracy.engine.structures.base import Structure


class Generic(Structure):
    """Inject at the input site, read at the output site, stop early."""

    kind = "generic"
    needs_activation = False

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        return run_with_site_values(self.model, inputs, self.section.inp, x, self.section.out)

    def leaf_forward(self, inputs: Tensor, full: Tensor | None) -> tuple[list[Tensor], Tensor]:
        leaves: list[Tensor] = []
        hooks = leaf_hooks(self.model, self.section.inp, leaves)
        out = self.section.out
        if out.is_logits:
            y = out.select(as_positions(run_with_hooks(self.model, inputs, hooks)))
            return leaves, y
        store: dict[str, Tensor] = {}
        run_with_hooks(self.model, inputs, hooks + _read_hooks(self.model, out, store), True)
        return leaves, store["out"]
