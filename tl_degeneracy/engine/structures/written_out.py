"""Structures that run a LayerNorm-free transformer's remaining computation written out in
tensors (`plain.PlainTail`, `plain.PlainModel`) instead of through the model's hooks:

- `PlainTailStructure`: a site of the last block → the logits, which is what node and edge
  ablation at that site feed (every ablated copy costs the last block at the read positions);
- `PlainForward`: the whole model, differentiable in its own parameters, which is what the SGLD
  sampler steps through (2–3× faster than the model's forward on modular addition).
"""

from __future__ import annotations

from torch import Tensor, nn

from tl_degeneracy.engine.compat import hooked_state_dict
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.structures.affine import FormStructure
from tl_degeneracy.engine.structures.base import Structure
from tl_degeneracy.engine.structures.forms import Affine
from tl_degeneracy.engine.structures.plain import PlainModel, PlainTail


class PlainTailStructure(Structure):
    """The logits at the output positions from a site of the last block. From the last
    `hook_resid_post` the tail is the unembedding alone, an affine form whose closed forms
    (`affine.FormStructure`) it uses for `M'`, edges and ablated rows."""

    kind = "plain_tail"

    def __init__(
        self, model: nn.Module, section: Section, tail: PlainTail, form: Affine | None = None
    ):
        super().__init__(model, section)
        self.tail = tail
        self.affine = None if form is None else FormStructure(model, section, form)
        self.closed_form = form is not None

    def describe(self) -> str:
        return "plain_tail" if self.affine is None else self.affine.describe()

    def jacobian_accumulator(self, out_basis, config, source):
        if self.affine is not None:
            return self.affine.jacobian_accumulator(out_basis, config, source)
        return super().jacobian_accumulator(out_basis, config, source)

    def edge_accumulator(self, basis_in, basis_out, config, source):
        if self.affine is not None:
            return self.affine.edge_accumulator(basis_in, basis_out, config, source)
        return super().edge_accumulator(basis_in, basis_out, config, source)

    def output_rows(self, inputs, full, basis_in, basis_out, feats):
        if self.affine is not None:
            return self.affine.output_rows(inputs, full, basis_in, basis_out, feats)
        return super().output_rows(inputs, full, basis_in, basis_out, feats)

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        assert full is not None
        n_pos = full.shape[1]
        idx = self.section.inp.index(n_pos, full.device)
        act = full.to(x.dtype).index_copy(1, idx, x)
        queries = self.section.out.index(n_pos, full.device)
        return self.tail.logits(self.section.inp.hook, act, queries)


class PlainForward(Structure):
    """The whole model written out (`PlainModel`), in the model's own parameters."""

    kind = "plain_model"
    needs_activation = False

    def written_out(self) -> PlainModel:
        """The model's forward as a `PlainModel` over views of its current parameters
        (rebuilt per call: the SGLD sampler rebinds the parameters' data)."""
        plain = PlainModel.of(self.model, hooked_state_dict(self.model, keep_vars=True), None)
        assert plain is not None  # structure_of checked is_plain
        return plain

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        queries = self.section.out.index(inputs.shape[1], inputs.device)
        return self.written_out().logits(inputs, queries)
