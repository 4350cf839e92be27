"""Section structures: how a section is computed, decided in exactly one place.

`structure_of(model, section)` classifies a section of a model and returns one object that owns
everything that structure needs (its weights, read once; its forward; the `M'` update; the edge
update; the ablated rows of edge ablation). Every consumer (Jacobian Grams, edges, node and edge
ablation, the SGLD forward, the fit pipeline) asks it and nothing else:

- `FormStructure` (`affine`): a position-wise closed form (`forms`): a ReLU MLP or an affine
  map, from a transformer block (`transformer`) or declared by the model (`DeclaresSections`);
- `Attention` (`attention`): `hook_resid_pre → hook_resid_mid` of a LayerNorm-free transformer;
- `PlainTailStructure` (`written_out`): a site of the last block → the logits, no normalisation;
- `PlainForward` (`written_out`): the whole model, `Section(INPUTS, logits)`, no normalisation;
- `BlockLocal` (`block_local`): a section inside one block of a `HookedTransformer`;
- `Generic` (`generic`): anything else, through the model's own hooks from its inputs.

Each fast structure is an optimisation tested against `Generic`, never a second meaning; inside
`with autograd_only():` every section is `Generic` (and the whole model its own forward).
The structures that compute from the weights (all but `BlockLocal` and `Generic`) would not see
a hook on the model, so while any module carries a forward hook (the caller's steering or
caching hook, an enclosing `attach`) they step aside for those that run the model's own
modules (`compat.forward_hooks_on`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tl_degeneracy.engine.compat import forward_hooks_on, is_transformer
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures.affine import FormStructure
from tl_degeneracy.engine.structures.attention import Attention
from tl_degeneracy.engine.structures.base import Structure
from tl_degeneracy.engine.structures.block_local import BlockLocal, block_local_layer
from tl_degeneracy.engine.structures.forms import Affine
from tl_degeneracy.engine.structures.generic import Generic
from tl_degeneracy.engine.structures.plain import PlainBlock, PlainTail, is_plain
from tl_degeneracy.engine.structures.transformer import (
    plain_attention_layer,
    transformer_form,
    uses_declared_form,
)
from tl_degeneracy.engine.structures.written_out import PlainForward, PlainTailStructure

INPUTS = Site("inputs")
"""The model's inputs, as the start of a section: `Section(INPUTS, Site("logits"))` is the
whole model."""

_autograd_only = [0]


@contextmanager
def autograd_only() -> Iterator[None]:
    """Within the block, every section uses the generic autograd path: the one switch that
    turns every fast structure off, to check them or to time them."""
    _autograd_only[0] += 1
    try:
        yield
    finally:
        _autograd_only[0] -= 1


def fast_structures_enabled() -> bool:
    return _autograd_only[0] == 0


def structure_of(model: nn.Module, section: Section) -> Structure:
    """The structure that computes `section` of `model` (see the module's table)."""
    fast = fast_structures_enabled()
    from_weights = fast and not forward_hooks_on(model)  # see the module's docstring
    if section.inp == INPUTS:
        if from_weights and is_transformer(model) and is_plain(model):
            return PlainForward(model, section)
        return Generic(model, section)
    if not fast:
        return Generic(model, section)
    if not is_transformer(model):
        form = uses_declared_form(model, section) if from_weights else None
        return Generic(model, section) if form is None else FormStructure(model, section, form)
    if not from_weights:
        layer = block_local_layer(model, section)
        return Generic(model, section) if layer is None else BlockLocal(model, section, layer)
    form = transformer_form(model, section)
    if section.out.is_logits:
        tail = PlainTail.of(model)
        if tail is not None and tail.stage(section.inp.hook) is not None:
            affine = form if isinstance(form, Affine) else None
            return PlainTailStructure(model, section, tail, affine)
    if form is not None:
        return FormStructure(model, section, form)
    layer = plain_attention_layer(model, section)
    if layer is not None:
        block = PlainBlock.of(model, layer)
        assert block is not None  # plain_attention_layer checked is_plain
        return Attention(model, section, block)
    layer = block_local_layer(model, section)
    if layer is not None:
        return BlockLocal(model, section, layer)
    return Generic(model, section)


__all__ = [
    "INPUTS",
    "Attention",
    "BlockLocal",
    "FormStructure",
    "Generic",
    "PlainForward",
    "PlainTailStructure",
    "Structure",
    "autograd_only",
    "fast_structures_enabled",
    "structure_of",
]
