"""The model identity saved with results: read once per state of the weights, and any change
to any weight (in place, through `.data`, by loading a state dict) shows."""

from __future__ import annotations

import copy

import pytest
import torch

from tl_degeneracy.engine import identity
from tl_degeneracy.engine.identity import model_identity, weight_digest, weight_fingerprint


@pytest.fixture
def reads(monkeypatch):
    """Counts how often the weights are actually read."""
    count = [0]
    real = identity._read_weight_sums

    def counting(model):
        count[0] += 1
        return real(model)

    monkeypatch.setattr(identity, "_read_weight_sums", counting)
    return count


def test_weights_are_read_once_per_state(api, tiny, reads):
    model = tiny(api, "ln")
    first = model_identity(model), weight_fingerprint(model)
    again = model_identity(model), weight_fingerprint(model), weight_digest(model)
    assert reads[0] == 1
    assert again[:2] == first
    assert again[2] == first[0]["weight_digest"]


@pytest.mark.parametrize("how", ["in_place", "data", "load_state_dict", "new_parameter"])
def test_a_change_to_one_block_weight_changes_the_identity(api, tiny, reads, how):
    model = tiny(api, "ln", n_layers=2)
    before_digest, before_fp = weight_digest(model), weight_fingerprint(model)
    _, param = next(  # a weight of the second block (named "layers.1" on the Bridge)
        (n, p) for n, p in model.named_parameters() if "blocks.1." in n or "layers.1." in n
    )
    with torch.no_grad():
        if how == "in_place":
            param.mul_(1.01)
        elif how == "data":  # invisible to the version counter
            param.data.mul_(1.01)
        elif how == "load_state_dict":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            key = next(k for k in state if ".1." in k and state[k].is_floating_point())
            state[key] = state[key] * 1.01
            model.load_state_dict(state)
        else:
            param.data = param.data * 1.01
    assert weight_digest(model) != before_digest
    changed = [k for k, v in weight_fingerprint(model).items() if v != before_fp[k]]
    assert changed and all(k.startswith("blocks.1.") for k in changed), changed
    assert reads[0] == 2


def test_cached_identity_equals_a_fresh_read(api, tiny):
    model = tiny(api, "ln", n_layers=2)
    weight_digest(model)
    with torch.no_grad():
        next(iter(model.parameters())).add_(0.5)
    twin = copy.deepcopy(model)  # never read before: computed from scratch
    assert weight_digest(model) == weight_digest(twin)
    assert weight_fingerprint(model) == weight_fingerprint(twin)
