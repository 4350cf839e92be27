"""Weights stored transposed: same values and outputs, and TransformerLens's per-forward
transposes become views."""

from __future__ import annotations

import einops
import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, hooked_state_dict
from tl_degeneracy.models.weight_layout import store_weights_transposed


@pytest.mark.skipif("hooked" not in available_apis(), reason="HookedTransformer only")
@pytest.mark.parametrize("gated", [True, False])
def test_same_outputs_and_no_copies(tiny, tokens_for, gated):
    overrides = dict(normalization_type="RMS", n_layers=2, n_heads=4, n_key_value_heads=2)
    if gated:
        overrides.update(gated_mlp=True, act_fn="silu")
    model = tiny("hooked", **overrides)
    toks = tokens_for(model, 6)
    before = {k: v.clone() for k, v in hooked_state_dict(model).items()}
    logits = model(toks)
    store_weights_transposed(model)
    # the same function to float64 rounding (a change of memory layout may change the BLAS
    # kernel's summation order, and so the last bits, on some processors)
    torch.testing.assert_close(model(toks), logits, rtol=1e-12, atol=1e-12)
    after = hooked_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    block = model.blocks[0]
    views = [block.mlp.W_in.T, block.mlp.W_out.T, model.unembed.W_U.T]
    if gated:
        views.append(block.mlp.W_gate.T)
    views += [
        einops.rearrange(block.attn.W_Q, "h m d -> (h d) m"),
        einops.rearrange(block.attn._W_K, "h m d -> (h d) m"),
        einops.rearrange(block.attn.W_O, "h d m -> m (h d)"),
    ]
    for v in views:  # what TransformerLens hands to F.linear: already contiguous, no copy
        assert v.is_contiguous() and v.contiguous().data_ptr() == v.data_ptr()
    # gradients still reach every parameter with the right shape
    model(toks).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_a_bridge_is_left_alone(tiny):
    if "bridge" not in available_apis():
        pytest.skip("no TransformerBridge")
    model = tiny("bridge")
    strides = [p.stride() for p in model.parameters()]
    assert store_weights_transposed(model) is model
    assert strides == [p.stride() for p in model.parameters()]
