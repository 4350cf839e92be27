"""The model identity saved with results: read once per state of the weights, and any change
to any weight (in place, through `.data`, by loading a state dict; a rescaling, a sign flip, a
permutation) shows, while the same weights in another dtype agree within its rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from support import APIS

from tl_degeneracy.engine import identity
from tl_degeneracy.engine.basis_result import ArtifactError, BasisResult
from tl_degeneracy.engine.compat import hooked_state_dict
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.identity import model_identity, weight_digest, weight_fingerprint
from tl_degeneracy.engine.sites import Site


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


def _edit(model, name: str, how) -> None:
    """Apply `how` in place to the HookedTransformer-named weight `name` of either API (the
    Bridge's are views of its own parameters)."""
    with torch.no_grad():
        weight = hooked_state_dict(model, keep_vars=True)[name]
        weight.copy_(how(weight.detach().clone()))


def _flip_neurons(w):
    w[:, :3] *= -1  # the input weights of three MLP neurons change sign
    return w


EDITS = {
    "sign flip of 3 neurons": ("blocks.0.mlp.W_in", _flip_neurons),
    "query weights permuted": ("blocks.0.attn.W_Q", lambda w: w.flip(-1)),
    "output rows permuted": ("blocks.0.mlp.W_out", lambda w: w.roll(1, 0)),
    "heads swapped": ("blocks.0.attn.W_V", lambda w: w.flip(0)),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_sign_flips_and_permutations_change_the_fingerprint(api, tiny, tokens_for, edit):
    """Mean |w| and rms are blind to them, although the model computes another function;
    the signed and position-weighted means see them, far beyond the float64 tolerance."""
    model = tiny(api, "ln", n_layers=1)
    tokens = tokens_for(model, 4)
    with torch.no_grad():
        before_out = model(tokens)
    before = weight_fingerprint(model)
    name, how = EDITS[edit]
    _edit(model, name, how)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), before_out)  # another function
    after = weight_fingerprint(model)
    assert after[name][:2] == pytest.approx(before[name][:2], rel=1e-9)  # scale unchanged
    tolerance = identity.rounding_tolerance(torch.float64, torch.float64)
    difference = identity.fingerprint_difference(before[name], after[name], 100 * tolerance)
    assert difference is not None and difference[0] in identity.FINGERPRINT_FIELDS[2:]
    assert [k for k in after if after[k] != before[k]] == [name]


def test_a_basis_applies_to_the_same_weights_under_another_name(api, tiny, tokens_for):
    """A model is named after its folder by `load_local`: the same checkpoint moved or
    renamed is the same model (its weights decide); other weights under the same name are
    still refused."""
    from tl_degeneracy.engine.artifacts import compare_model

    model = tiny(api, "ln", n_layers=1)
    sites = (Site("blocks.0.hook_resid_mid", "last"), Site("logits", "last"))
    lib = fit_basis(model, tokens_for(model, 8), LIBConfig(sites, progress=False))
    renamed = copy.deepcopy(model)
    renamed.cfg.model_name = "renamed_copy"
    assert compare_model(lib.metadata, renamed) == (None, None)
    _edit(renamed, "blocks.0.mlp.W_in", lambda w: -w)
    problem, _ = compare_model(lib.metadata, renamed)
    assert problem is not None and "other weights" in problem


def test_the_same_weights_in_another_dtype_agree_within_its_rounding(api, tiny):
    """Rounding every weight to float32 or bfloat16 moves each field by less than the
    tolerance of the coarser dtype; a sign flip of one neuron in float32 stays visible."""
    model = tiny(api, "ln", n_layers=2)
    exact = weight_fingerprint(model)
    for dtype in (torch.float32, torch.bfloat16):
        rounded = weight_fingerprint(copy.deepcopy(model).to(dtype))
        rtol = identity.rounding_tolerance(torch.float64, dtype)
        assert all(
            identity.fingerprint_difference(exact[k], rounded[k], rtol) is None for k in exact
        ), dtype
    flipped = copy.deepcopy(model).to(torch.float32)
    _edit(flipped, "blocks.1.mlp.W_in", lambda w: torch.cat([-w[:, :1], w[:, 1:]], 1))
    name = "blocks.1.mlp.W_in"
    rtol = identity.rounding_tolerance(torch.float64, torch.float32)
    assert identity.fingerprint_difference(exact[name], weight_fingerprint(flipped)[name], rtol)


def test_tolerances_follow_the_coarser_dtype():
    tol = identity.rounding_tolerance
    assert tol(torch.float64, torch.float64) == 1e-9
    assert tol("torch.float64", torch.float32) == pytest.approx(16 * 2**-23)
    assert tol(torch.float32, torch.bfloat16) == 1e-2
    assert tol("torch.banana", torch.float64) == 1e-2 and tol(None) == 1e-2


def test_grouped_query_weights_compare_under_the_names_both_apis_share():
    """A HookedTransformer keeps grouped-query key and value weights as `attn._W_K`; the
    Bridge's HookedTransformer-form weights call them `attn.W_K`; rotary tables are derived."""
    fp = {
        "blocks.0.attn._W_K": [1.0] * 5,
        "blocks.0.attn._b_V": [0.0] * 5,
        "blocks.0.attn.W_Q": [2.0] * 5,
        "blocks.0.attn.rotary_sin": [0.5] * 5,
    }
    assert identity.comparable_fingerprint(fp) == {
        "blocks.0.attn.W_K": [1.0] * 5,
        "blocks.0.attn.b_V": [0.0] * 5,
        "blocks.0.attn.W_Q": [2.0] * 5,
    }


UNPROCESSED = {  # what a model without a record of processing reports (unchanged)
    "fold_ln": False,
    "center_writing_weights": None,
    "center_unembed": None,
    "normalization_type": "LN",
}


def test_a_bridge_records_the_processing_it_applied_itself(tiny):
    """`enable_compatibility_mode()` folds and centres a Bridge's weights and leaves
    `cfg.normalization_type` as it was; the record reads the Bridge's own flags (TransformerLens
    3.9 and 4.x alike), so that a basis of it is not taken for one of the unprocessed model."""
    raw = tiny("bridge", "ln")
    assert identity.weight_processing(raw) == UNPROCESSED
    default = copy.deepcopy(raw)
    default.enable_compatibility_mode(disable_warnings=True)
    assert identity.weight_processing(default) == {
        **UNPROCESSED,
        "fold_ln": True,
        "fold_value_biases": None,
        "normalization_type": "LNPre",
        "processed_by": "TransformerBridge.process_weights (centring flags not recorded)",
    }
    centred = copy.deepcopy(raw)
    centred.enable_compatibility_mode(disable_warnings=True, fold_ln=False)
    record = identity.weight_processing(centred)
    assert record["fold_ln"] is False and record["normalization_type"] == "LN"
    assert record != UNPROCESSED  # centred, though not folded
    hooks_only = copy.deepcopy(raw)
    hooks_only.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    assert identity.weight_processing(hooks_only) == UNPROCESSED


def test_a_loader_record_gives_way_to_processing_applied_after_it(tiny):
    """A loader's record of no processing (`load_local`'s default) no longer holds once the
    user processes the Bridge; a record of processing is kept as the loader wrote it."""
    model = tiny("bridge", "ln")
    flags = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
    identity.set_weight_processing(model, {**flags, "source": "folder"})
    assert identity.weight_processing(model) == {**flags, "source": "folder"}
    model.enable_compatibility_mode(disable_warnings=True)
    record = identity.weight_processing(model)
    assert record["fold_ln"] is True and record["source"] == "folder"
    assert record["center_writing_weights"] is None  # the Bridge does not say
    assert record["fold_value_biases"] is None
    loaded = tiny("bridge", "ln")
    identity.set_weight_processing(loaded, {**flags, "fold_ln": True})
    loaded.enable_compatibility_mode(disable_warnings=True)
    assert identity.weight_processing(loaded) == {**flags, "fold_ln": True}


@pytest.mark.skipif("hooked" not in APIS, reason="HookedTransformer needs TransformerLens < 4")
def test_a_hooked_transformer_record_still_comes_from_its_config(tiny):
    model = tiny("hooked", "ln")
    assert identity.weight_processing(model) == UNPROCESSED
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert identity.weight_processing(model) == {
        **UNPROCESSED,
        "fold_ln": True,
        "normalization_type": "LNPre",
    }


def test_a_basis_of_a_processed_bridge_names_the_processing_on_the_raw_model(
    tiny, tokens_for, tmp_path
):
    """docs/howto.md, "Save and load": loaded onto the model without the processing, the
    error names the weight processing, not only a changed weight."""
    raw = tiny("bridge", "ln")
    processed = copy.deepcopy(raw)
    processed.enable_compatibility_mode(disable_warnings=True)
    config = LIBConfig(
        (Site("blocks.0.hook_resid_mid", "last"), Site("logits", "last")), progress=False
    )
    basis = fit_basis(processed, tokens_for(processed, 30), config)
    assert basis.metadata["weight_processing"]["fold_ln"] is True
    folder = basis.save(tmp_path / "lib")
    with pytest.raises(ArtifactError, match=r"weight processing differs too .*'fold_ln': True"):
        BasisResult.load(folder, raw)
    BasisResult.load(folder, processed)
