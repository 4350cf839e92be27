"""`load_local`: Hugging Face checkpoint folders written by `transformers` in the test, loaded
offline on every API, against `transformers`' own forward; clear errors for what it cannot load.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest
import torch
from support import APIS, Float64Throughout

from tl_degeneracy.engine.compat import NoHookedTransformerError, build_model
from tl_degeneracy.engine.identity import weight_processing
from tl_degeneracy.models.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    bridge_causal_lms,
)
from tl_degeneracy.models.local import from_hf, load_hf, load_local, load_tokenizer, read_config
from tl_degeneracy.models.tiny import (
    D_VOCAB,
    TINY_ARCHITECTURES,
    TINY_BRIDGE_ONLY,
    randomize,
    tiny_checkpoint,
    tiny_hf_config,
    tiny_model,
    tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
HF_ARCHS = ("gpt2", "neox", "llama", "gemma", "mistral", "qwen2")
RMS_ARCHS = ("llama", "gemma", "mistral", "qwen2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint folder per architecture, written once for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: tiny_checkpoint(arch, root / arch, seed=0) for arch in HF_ARCHS}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, D_VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("api", APIS)
def test_float64_logits_equal_transformers(checkpoints, tokens, arch, api):
    """HookedTransformer computes in float64 throughout, so it equals `transformers` run in
    float64 throughout (measured: at most 5e-16). The Bridge runs Hugging Face's RMSNorm modules
    and a float32 softmax, as `transformers` does; it equals that forward (measured: 0), which is
    1.4e-7 from the float64 one on these models."""
    model = load_local(checkpoints[arch], api=api, dtype=torch.float64)
    hf, _ = load_hf(checkpoints[arch], dtype=torch.float64)
    with torch.no_grad():
        logits = model(tokens)
        if api == "bridge" and arch in RMS_ARCHS:
            reference = hf(tokens).logits
        else:
            with Float64Throughout():
                reference = hf(tokens).logits
    assert logits.dtype == torch.float64
    assert relative_error(logits, reference) < 1e-10


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("api", APIS)
def test_float32_logits_match_transformers(checkpoints, tokens, arch, api):
    """float32: to rounding on RMSNorm models (Hugging Face's rotary tables and RMSNorm
    rounding: bit for bit here, but the two run different matmul layouts, which other CPUs may
    round differently), within 3e-7 of the largest logit on the LayerNorm ones (measured)."""
    model = load_local(checkpoints[arch], api=api)
    hf, _ = load_hf(checkpoints[arch])
    with torch.no_grad():
        logits, reference = model(tokens), hf(tokens).logits
    if arch in RMS_ARCHS:
        ulp = torch.finfo(torch.float32).eps * float(reference.abs().max())
        torch.testing.assert_close(logits, reference, rtol=0, atol=8 * ulp)
    assert relative_error(logits, reference) < 1e-6


@pytest.mark.parametrize("api", APIS)
def test_config_tokenizer_and_record(checkpoints, api):
    model = load_local(checkpoints["llama"], api=api, model_name="mine", n_ctx=8)
    cfg = model.cfg
    assert (cfg.model_name, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (
        "mine",
        2,
        16,
        4,
        D_VOCAB,
    )
    assert cfg.n_ctx == 8 and cfg.n_key_value_heads == 2
    tokens = model.to_tokens("hello!")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == "hello!"
    record = weight_processing(model)
    assert record["architecture"] == "LlamaForCausalLM" and record["fold_ln"] is False
    assert record["source"] == str(checkpoints["llama"].resolve())


@pytest.mark.parametrize("api", APIS)
def test_processed_model_is_lnpre_and_keeps_log_probs(checkpoints, tokens, api):
    """TransformerLens's default processing (folded LayerNorm, centred weights, centred
    unembedding, value biases folded). TransformerLens 3.9 processes float64 weights in float32,
    so log-probs move by ~2e-6 (not 1e-15)."""
    plain = load_local(checkpoints["gpt2"], api=api, dtype=torch.float64)
    processed = tiny_model("processed", api)
    flags = weight_processing(processed)
    assert flags["normalization_type"] == "LNPre" and flags["center_unembed"] is True
    if api == "hooked":
        assert processed.cfg.normalization_type == "LNPre"
    with torch.no_grad():
        a, b = processed(tokens).log_softmax(-1), plain(tokens).log_softmax(-1)
    assert float((a - b).abs().max()) < 1e-5


@pytest.mark.skipif(len(APIS) < 2, reason="HookedTransformer needs TransformerLens < 4")
@pytest.mark.parametrize("arch", ["processed", "attn_only"])
def test_both_apis_give_the_same_model(tokens, arch):
    hooked, bridge = (tiny_model(arch, api) for api in APIS)
    with torch.no_grad():
        assert relative_error(bridge(tokens), hooked(tokens)) < 1e-12


def test_sharded_checkpoint_loads_the_same_weights(checkpoints, tmp_path, tokens):
    import transformers

    config = tiny_hf_config("llama")
    hf = randomize(transformers.LlamaForCausalLM(config), seed=0)
    hf.save_pretrained(tmp_path, max_shard_size="8KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, single = (load_local(f, dtype=torch.float64) for f in (tmp_path, checkpoints["llama"]))
    with torch.no_grad():
        assert torch.equal(sharded(tokens), single(tokens))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("api", APIS)
def test_loads_without_network(no_network, tmp_path, api):
    model = tiny_model("gemma", api, folder=tmp_path / "checkpoint")
    assert model.to_str_tokens("hi") == ["<s>", "h", "i"]


def copy_without(src, dst, *patterns):
    shutil.copytree(src, dst)
    for pattern in patterns:
        for path in dst.glob(pattern):
            path.unlink()
    return dst


def test_missing_files_are_named(checkpoints, tmp_path):
    src = checkpoints["gpt2"]
    cases = [
        (tmp_path / "nowhere", "not a folder"),
        (copy_without(src, tmp_path / "a", "config.json"), "no config.json"),
        (copy_without(src, tmp_path / "b", "*.safetensors"), "no \\*.safetensors"),
        (copy_without(src, tmp_path / "c", "tokenizer*"), "no tokenizer files"),
    ]
    pickled = copy_without(src, tmp_path / "d", "*.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    cases.append((pickled, "pickle files, which are never loaded"))
    sharded = copy_without(src, tmp_path / "e")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    cases.append((sharded, "model-00001-of-00002.safetensors.*missing"))
    for folder, message in cases:
        with pytest.raises(FileNotFoundError, match=message):
            load_local(folder)


def test_a_dtype_can_be_named_and_a_wrong_one_is_refused_before_loading(checkpoints, tmp_path):
    """ "float32" is the command line's spelling: it loads as torch.float32; a name that is no
    float dtype is refused with the names allowed before anything is read (a folder that does
    not exist shows that)."""
    model = load_local(checkpoints["gpt2"], dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    for wrong in ("float8", torch.int64):
        with pytest.raises(ValueError, match=r"not a floating dtype.*float32, float64, bfloat16"):
            load_local(tmp_path / "nowhere", dtype=wrong)


def test_a_config_json_that_is_not_json_is_named(checkpoints, tmp_path):
    folder = copy_without(checkpoints["gpt2"], tmp_path / "broken")
    (folder / "config.json").write_text("{not json")
    for load in (read_config, load_local):
        with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON \(Expecting"):
            load(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        read_config(folder)


def test_hooked_without_a_hooked_transformer_is_a_value_error_naming_the_bridge(
    checkpoints, monkeypatch
):
    """TransformerLens 4 (simulated on 3.x): a ValueError (the command line's one-line
    errors) and still a RuntimeError, with the fix for Python and the command line."""
    monkeypatch.setattr("tl_degeneracy.engine.compat.has_hooked_transformer", lambda: False)
    for error in (ValueError, RuntimeError, NoHookedTransformerError):
        with pytest.raises(error, match=r"needs TransformerLens < 4.*api='bridge' \(--api bridge"):
            load_local(checkpoints["llama"], api="hooked")
    with pytest.raises(NoHookedTransformerError, match="api='bridge'"):
        build_model({}, api="hooked")  # a modular-addition checkpoint's way in


@pytest.mark.skipif("bridge" not in APIS, reason="TransformerBridge needs TransformerLens >= 3")
def test_a_folder_named_like_a_transformer_lens_alias_loads_without_its_warning(
    checkpoints, tmp_path, monkeypatch, caplog, tokens
):
    """A folder "neox" given relative to its parent: TransformerLens 4 would read the name as
    its alias of EleutherAI/gpt-neox-20b and warn that it loads that model instead."""
    shutil.copytree(checkpoints["neox"], tmp_path / "neox")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = load_local("neox", api="bridge")
    assert not [r for r in caplog.records if "alias" in r.getMessage()]
    assert model.cfg.model_name == "neox"
    assert weight_processing(model)["source"] == str(tmp_path / "neox")
    reference = load_local(checkpoints["neox"], api="bridge")
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


def test_a_folder_under_home_can_be_given_with_a_tilde(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(checkpoints["gpt2"], tmp_path / "models" / "tiny")
    model = load_local("~/models/tiny", model_name="tiny")
    assert model.to_str_tokens("ok") == ["<s>", "o", "k"]


@pytest.mark.parametrize("api", APIS)
def test_a_tokenizer_can_be_passed_instead(checkpoints, tmp_path, api):
    folder = copy_without(checkpoints["gpt2"], tmp_path / "bare", "tokenizer*")
    model = load_local(folder, api=api, tokenizer=tiny_tokenizer())
    assert model.to_str_tokens("ok") == ["<s>", "o", "k"]


@pytest.mark.parametrize("api", APIS)
def test_a_tokenizer_can_come_from_another_folder(checkpoints, tmp_path, api):
    """A fine-tune saved without tokenizer files takes its base model's (a folder path); a
    folder without them is named, with how to write them."""
    folder = copy_without(checkpoints["gpt2"], tmp_path / "bare", "tokenizer*")
    base = copy_without(checkpoints["gpt2"], tmp_path / "base", "*.safetensors")
    model = load_local(folder, api=api, tokenizer=str(base))
    assert model.to_str_tokens("ok") == ["<s>", "o", "k"]
    assert load_tokenizer(base)("ok")["input_ids"] == tiny_tokenizer()("ok")["input_ids"]
    with pytest.raises(FileNotFoundError, match="bare is not a folder with tokenizer files"):
        load_local(folder, api=api, tokenizer=folder)


def test_unsupported_architecture_is_named_with_the_supported_ones(checkpoints, tmp_path):
    folder = copy_without(checkpoints["gpt2"], tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="BertModel") as error:
        load_local(folder)
    for arch in ARCHITECTURES.values():
        assert arch.hf_class in str(error.value)


@pytest.mark.skipif("hooked" not in APIS, reason="HookedTransformer needs TransformerLens < 4")
def test_features_hooked_transformer_lacks_are_refused(checkpoints, tmp_path):
    folder = copy_without(checkpoints["llama"], tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": scaling}))
    with pytest.raises(UnsupportedArchitectureError, match="api='bridge'"):
        load_local(folder, api="hooked")
    with pytest.raises(ValueError, match="learned position table"):
        load_local(checkpoints["gpt2"], n_ctx=8)


def test_tiny_models_are_tiny():
    for arch in TINY_ARCHITECTURES:
        model = tiny_model(arch, APIS[0])
        per_block = sum(p.numel() for p in model.blocks[0].parameters())
        assert 300 <= per_block <= 5000, (arch, per_block)
    with pytest.raises(ValueError, match="tiny_model\\('attn_only'"):
        tiny_checkpoint("attn_only", "unused")


@pytest.fixture(scope="module")
def bridge_only(tmp_path_factory):
    """One tiny checkpoint folder per Bridge-only architecture."""
    root = tmp_path_factory.mktemp("bridge_only")
    return {arch: tiny_checkpoint(arch, root / arch, seed=0) for arch in TINY_BRIDGE_ONLY}


@pytest.mark.parametrize("arch", TINY_BRIDGE_ONLY)
def test_bridge_only_architectures_load_on_the_bridge(bridge_only, tokens, arch):
    """Any causal LM the Bridge has an adapter for loads, with `api="auto"` too, and computes
    what `transformers` computes: float64 logits equal (measured: 0 for Qwen3, Gemma 2, OLMo 2;
    6e-16 for GPT-J; 2e-7 for Phi-3, whose fused projections the Bridge splits into its own
    attention)."""
    model = load_local(bridge_only[arch], dtype=torch.float64)
    hf, _ = load_hf(bridge_only[arch], dtype=torch.float64)
    assert type(model).__name__ == "TransformerBridge"
    with torch.no_grad():
        error = relative_error(model(tokens), hf(tokens).logits)
    assert error < (1e-6 if arch == "phi3" else 1e-13), error
    record = weight_processing(model)
    assert record["architecture"] == TINY_BRIDGE_ONLY[arch]
    assert record["normalization_type"] == ("LN" if arch == "gptj" else "RMS")
    assert TINY_BRIDGE_ONLY[arch] in bridge_causal_lms()


@pytest.mark.skipif("hooked" not in APIS, reason="HookedTransformer needs TransformerLens < 4")
def test_bridge_only_architecture_asked_for_as_hooked_points_to_the_bridge(bridge_only):
    with pytest.raises(UnsupportedArchitectureError, match="api='bridge'") as error:
        load_local(bridge_only["qwen3"], api="hooked")
    assert "Qwen3ForCausalLM" in str(error.value)


@pytest.mark.parametrize("arch", TINY_BRIDGE_ONLY)
def test_bridge_only_weight_processing_keeps_log_probs(bridge_only, tokens, arch):
    """TransformerLens's default processing on a Bridge-only model, in float64: log-probs move
    by float32 rounding (measured: at most 2.9e-6, Gemma 2). TransformerLens left some of
    GPT-J's processed weights in float32, which made its forward fail; they are cast back.
    Where its adapter cannot fold the norms (OLMo 2, Phi-3) the record says so, with a
    warning, instead of claiming folded norms."""
    import warnings

    flags = dict(fold_ln=True, center_writing_weights=arch == "gptj", center_unembed=True)
    plain = load_local(bridge_only[arch], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processed = load_local(bridge_only[arch], dtype=torch.float64, **flags)
    unfolded = any("does not fold the norms" in str(w.message) for w in caught)
    assert unfolded == (arch in ("olmo2", "phi3"))
    assert {p.dtype for p in processed.parameters()} == {torch.float64}
    record = weight_processing(processed)
    assert record["fold_ln"] is not unfolded
    assert record["normalization_type"].endswith("Pre") is not unfolded
    with torch.no_grad():
        a, b = processed(tokens).log_softmax(-1), plain(tokens).log_softmax(-1)
    assert float((a - b).abs().max()) < 1e-5


@pytest.mark.parametrize("api", APIS)
def test_a_model_that_does_not_reproduce_transformers_is_refused(checkpoints, monkeypatch, api):
    """`load_local` compares the loaded model's log-probabilities with `transformers`' on a
    probe batch taken before conversion. A conversion that computes another function (here a
    final-norm gain doubled after conversion; TransformerLens's Bridge adapter for StableLM
    was off by 0.45 in log-probability) is refused with the gap; `verify=False` loads it."""
    import tl_degeneracy.models.local as local

    build = local._hooked_from_hf if api == "hooked" else local._bridge_from_hf

    def corrupted(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("ln_final.w", "model.norm.")):  # hooked / Bridge name
                    p.mul_(2)
        return model

    monkeypatch.setattr(
        local, "_hooked_from_hf" if api == "hooked" else "_bridge_from_hf", corrupted
    )
    with pytest.raises(UnsupportedArchitectureError, match="does not compute what transformers"):
        load_local(checkpoints["llama"], api=api, dtype=torch.float64)
    assert load_local(checkpoints["llama"], api=api, dtype=torch.float64, verify=False)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gemma2"])
@pytest.mark.parametrize("api", APIS)
def test_a_model_in_memory_loads_as_its_folder_does(checkpoints, bridge_only, tokens, arch, api):
    """`from_hf` on the `transformers` model `load_hf` read gives `load_local`'s model: the same
    logits, context, name and record (the tokenizer read from the model's own folder). A
    Bridge-only architecture (Gemma 2) is loaded with `api="auto"`, which picks the Bridge."""
    if arch in TINY_BRIDGE_ONLY:
        folder, api = bridge_only[arch], "auto"
    else:
        folder = checkpoints[arch]
    hf, _ = load_hf(folder, dtype=torch.float64)
    model = from_hf(hf, api=api)
    reference = load_local(folder, api=api, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-13, atol=0)
    assert (model.cfg.n_ctx, model.cfg.model_name) == (reference.cfg.n_ctx, arch)
    assert weight_processing(model) == weight_processing(reference)
    assert model.to_str_tokens("ok!") == reference.to_str_tokens("ok!")


@pytest.mark.parametrize("api", APIS)
def test_a_model_built_in_memory_loads_with_its_tokenizer(tmp_path, tokens, api):
    """A model that never had a folder (built from its config, as after fine-tuning in a
    notebook) gives the model `load_local` reads from the folder it would save to; a
    HookedTransformer's rotary context is capped as `load_local` caps it (or set by `n_ctx`),
    and the user's model is left as it was (the Bridge wraps a copy: it would rebuild the
    model's layers), so it still saves; with `in_place` the Bridge wraps the very model, and
    an edit of its weights shows through."""
    import transformers

    config = tiny_hf_config("llama")
    config.max_position_embeddings = 100_000
    hf = randomize(transformers.LlamaForCausalLM(config).double(), seed=4)
    hf.set_attn_implementation("eager")  # the Bridge's: float32 softmax, as sdpa is not
    hf.train()
    with torch.no_grad():
        reference = hf.eval()(tokens).logits
    hf.train()
    model = from_hf(hf, tiny_tokenizer(), api=api)
    assert hf.training and type(hf.model.layers[0]).__name__ == "LlamaDecoderLayer"
    with torch.no_grad():
        assert torch.equal(hf.eval()(tokens).logits, reference)
    hf.save_pretrained(tmp_path / "saved")
    tiny_tokenizer().save_pretrained(tmp_path / "saved")
    saved = load_local(tmp_path / "saved", api=api, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(model(tokens), saved(tokens)) < 1e-13
    record = weight_processing(model)
    assert record["architecture"] == "LlamaForCausalLM"
    assert record["source"] == "a LlamaForCausalLM in memory"
    assert model.cfg.model_name == "LlamaForCausalLM"
    assert hf.config.max_position_embeddings == 100_000
    if api == "hooked":
        assert model.cfg.n_ctx == saved.cfg.n_ctx == 2048
        assert from_hf(hf, tiny_tokenizer(), api=api, n_ctx=32).cfg.n_ctx == 32
        return
    # the Bridge keeps the folder's own context (load_local used to cap it at 2048 on TL 4)
    assert model.cfg.n_ctx == saved.cfg.n_ctx == 100_000
    shared = from_hf(hf, tiny_tokenizer(), api=api, in_place=True)
    with torch.no_grad():
        assert relative_error(shared(tokens), reference) < 1e-13
        hf.lm_head.weight.mul_(2)
        assert relative_error(shared(tokens), 2 * reference) < 1e-13
        assert relative_error(model(tokens), reference) < 1e-13


def test_what_from_hf_cannot_load_is_named(checkpoints, tmp_path):
    import transformers

    with pytest.raises(TypeError, match="load_local"):
        from_hf(checkpoints["llama"])  # a folder, not a model
    hf = transformers.LlamaForCausalLM(tiny_hf_config("llama"))
    with pytest.raises(ValueError, match="tokenizer="):
        from_hf(hf)  # built in memory: no folder to read a tokenizer from
    with pytest.raises(UnsupportedArchitectureError, match="LlamaModel"):
        from_hf(hf.model, tiny_tokenizer())  # the base model, without its language-model head

    class WithAdapters(torch.nn.Module):
        config = hf.config

        def merge_and_unload(self):
            return hf

    with pytest.raises(TypeError, match="merge_and_unload"):
        from_hf(WithAdapters(), tiny_tokenizer())


def test_damaged_weights_are_named(checkpoints, tmp_path):
    """A truncated model.safetensors, and a pickle in its place (never unpickled): a ValueError
    naming the file, not transformers' SafetensorError."""
    folder = copy_without(checkpoints["llama"], tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated/model.safetensors is not a safetensors file"):
        load_local(folder)
    folder = copy_without(checkpoints["llama"], tmp_path / "pickled")
    torch.save({"weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"pickled/model.safetensors is not a safetensors file"):
        load_local(folder)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sixteen", r"does not describe a LlamaForCausalLM \(.*'hidden_size'"),
        (32, r"does not fit the weights beside it: .* has shape \[50, 16\] .* gives it \[50, 32\]"),
    ],
)
def test_a_config_json_that_does_not_fit_is_named(checkpoints, tmp_path, value, message):
    folder = copy_without(checkpoints["llama"], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": value}))
    with pytest.raises(ValueError, match=f"edited/config.json {message}"):
        load_hf(folder)


def test_a_broken_tokenizer_file_is_named(checkpoints, tmp_path):
    folder = copy_without(checkpoints["llama"], tmp_path / "tok")
    (folder / "tokenizer.json").write_text("{broken")
    for load in (load_tokenizer, load_hf):
        with pytest.raises(ValueError, match=r"tok/tokenizer.json is not valid JSON \(Expecting"):
            load(folder)
