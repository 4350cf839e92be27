"""Tiny random-weight models of every supported architecture, for tests and examples.

`tiny_checkpoint` writes a Hugging Face folder (config, safetensors, a 50-token character
tokenizer) with `transformers`; `tiny_model` loads it through `load_local`, exactly as a user's
own checkpoint would be. Two blocks, d_model 16, 4 heads, 32 hidden neurons: a few thousand
parameters per block, so a float64 forward takes milliseconds. Weights are drawn at a scale
where attention, norms and activations are far from linear (std 1/sqrt(fan-in), norm scales
1 ± 0.1, biases 0.1).

Shapes: `gpt2` (LayerNorm, GELU, learned positions, tied unembedding), `neox` (Pythia:
parallel attention and MLP, partial rotary, no `hook_resid_mid`), `llama` and `gemma` (RMSNorm,
gated MLP, grouped-query attention), `mistral`, `qwen2` (query/key/value biases),
`attn_only` (no MLPs; built with `compat.build_model`, as no Hugging Face architecture is
attention-only) and `processed` (the GPT-2 checkpoint loaded with TransformerLens's default
weight processing: folded LayerNorm, `LNPre`, centred writing weights and unembedding).

Bridge only (`TINY_BRIDGE_ONLY`, architectures outside the HookedTransformer table that the
Bridge runs through its hooks): `qwen3` (query/key RMSNorm), `gemma2` (norms after attention
and MLP, score and logit soft-capping, a 4-token sliding window every other layer), `olmo2`
(norms after attention and MLP only), `phi3` (fused query/key/value and gate/up projections)
and `gptj` (parallel attention and MLP, partial rotary, LayerNorm).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tl_degeneracy.engine.compat import API, available_apis, build_model, hooked_state_dict
from tl_degeneracy.models.architectures import ARCHITECTURES

TINY_ARCHITECTURES = (
    "gpt2",
    "neox",
    "llama",
    "gemma",
    "mistral",
    "qwen2",
    "attn_only",
    "processed",
)
"""Every tiny shape `tiny_model` builds on both APIs."""
TINY_BRIDGE_ONLY = {
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gptj": "GPTJForCausalLM",
}
"""Tiny shapes only the TransformerBridge loads, and their `transformers` classes."""
D_VOCAB = 50
N_CTX = 16
_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:()\n"
_SPECIALS = ("<unk>", "<s>", "</s>")
D_MODEL, N_HEADS, N_KV_HEADS, D_MLP, N_LAYERS = 16, 4, 2, 32, 2


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer with exactly `D_VOCAB` tokens (lower-cased text,
    `<unk>` for anything else, `<s>`/`</s>` as BOS/EOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*_SPECIALS, *_CHARS])}
    assert len(vocab) == D_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_hf_config(arch: str) -> Any:
    """The `transformers` config of a tiny checkpoint of `arch`."""
    import transformers

    d, h, kv, mlp, n = D_MODEL, N_HEADS, N_KV_HEADS, D_MLP, N_LAYERS
    ids: dict[str, Any] = dict(
        vocab_size=D_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None
    )
    if arch in ("gpt2", "processed"):
        return transformers.GPT2Config(
            n_positions=N_CTX, n_embd=d, n_layer=n, n_head=h, n_inner=mlp, **ids
        )
    common: dict[str, Any] = dict(
        max_position_embeddings=N_CTX,
        hidden_size=d,
        num_hidden_layers=n,
        num_attention_heads=h,
        intermediate_size=mlp,
        **ids,
    )
    if arch == "neox":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return transformers.GPTNeoXConfig(**common, rope_parameters=rope)
    gqa: dict[str, Any] = dict(num_key_value_heads=kv, head_dim=d // h)
    if arch == "llama":
        return transformers.LlamaConfig(**common, **gqa)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, **gqa)
    if arch == "mistral":
        return transformers.MistralConfig(**common, **gqa, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=kv)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, **gqa)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, **gqa, sliding_window=4)
    if arch == "olmo2":
        return transformers.Olmo2Config(**common, num_key_value_heads=kv)
    if arch == "phi3":
        return transformers.Phi3Config(**common, num_key_value_heads=kv)
    if arch == "gptj":
        return transformers.GPTJConfig(
            n_positions=N_CTX, n_embd=d, n_layer=n, n_head=h, n_inner=mlp, rotary_dim=2, **ids
        )
    raise ValueError(_unknown(arch))


def _unknown(arch: str) -> str:
    if arch == "attn_only":
        return (
            "attn_only has no Hugging Face architecture (no checkpoint to write); build it with "
            "tiny_model('attn_only', api)"
        )
    return (
        f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES} or (Bridge "
        f"only) {tuple(TINY_BRIDGE_ONLY)}"
    )


def tiny_checkpoint(arch: str, folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `arch` (see the module) into `folder`, as
    `save_pretrained` does: `config.json`, `model.safetensors` and the tokenizer files."""
    import transformers

    from tl_degeneracy.models.local import quiet_transformers

    config = tiny_hf_config(arch)
    base = "gpt2" if arch == "processed" else arch
    hf_class = TINY_BRIDGE_ONLY.get(base) or next(
        a.hf_class for a in ARCHITECTURES.values() if a.name == base
    )
    with torch.random.fork_rng():  # transformers initialises from the global RNG
        model = getattr(transformers, hf_class)(config)
    randomize(model, seed)
    folder = Path(folder)
    with quiet_transformers():
        model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter of a `transformers` model at a useful scale (see the module),
    from a private generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        kind = type(owner).__name__
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if "Norm" in kind:
            offset = 0.0 if kind.startswith("Gemma") or name.endswith("bias") else 1.0
            value = offset + 0.1 * noise
        elif p.ndim == 1:
            value = 0.1 * noise
        elif isinstance(owner, nn.Embedding):
            value = noise * (0.5 if "wpe" in name else 1.0)
        else:  # nn.Linear holds [out, in], GPT-2's Conv1D [in, out]
            fan_in = p.shape[0] if kind == "Conv1D" else p.shape[1]
            value = noise / fan_in**0.5
        p.copy_(value.to(p.dtype))
    return model


def tiny_model(
    arch: str,
    api: API | Literal["auto"] = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    folder: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """A tiny random model of `arch` on `api`, loaded through `load_local` (or
    `compat.build_model` for `attn_only`). The checkpoint goes to `folder`, or to a temporary
    folder removed after loading."""
    from tl_degeneracy.models.local import load_local

    if api == "auto":
        api = "bridge" if arch in TINY_BRIDGE_ONLY else available_apis()[0]
    if arch == "attn_only":
        return _attn_only(api, dtype, seed)
    processing = arch == "processed"
    flags: dict[str, Any] = dict(
        fold_ln=processing,
        center_writing_weights=processing,
        center_unembed=processing,
        fold_value_biases=processing,
    )
    if folder is not None:
        tiny_checkpoint(arch, folder, seed)
        return load_local(folder, api=api, dtype=dtype, model_name=f"tiny-{arch}", **flags)
    with tempfile.TemporaryDirectory(prefix=f"tiny-{arch}-") as tmp:
        tiny_checkpoint(arch, tmp, seed)
        return load_local(tmp, api=api, dtype=dtype, model_name=f"tiny-{arch}", **flags)


def _attn_only(api: API, dtype: torch.dtype, seed: int) -> nn.Module:
    """Two attention-only LayerNorm blocks with learned positions (no MLPs). The weights are
    drawn by HookedTransformer name, so both APIs get the same model for the same seed."""
    d, h, n = D_MODEL, N_HEADS, N_LAYERS
    config = dict(
        d_model=d,
        d_head=d // h,
        n_heads=h,
        n_layers=n,
        n_ctx=N_CTX,
        d_vocab=D_VOCAB,
        attn_only=True,
        normalization_type="LN",
    )
    template = hooked_state_dict(build_model(config, None, api=api, dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(template):
        shape, leaf = template[name].shape, name.rsplit(".", 1)[-1]
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if ".ln" in f".{name}":
            weights[name] = (1.0 if leaf == "w" else 0.0) + 0.1 * noise
        elif leaf.startswith("b"):
            weights[name] = 0.1 * noise
        elif leaf in ("W_E", "W_pos"):
            weights[name] = noise * (0.5 if leaf == "W_pos" else 1.0)
        else:  # W_Q, W_K, W_V [head, d_model, d_head]; W_O [head, d_head, d_model]; W_U
            fan_in = shape[0] * shape[1] if leaf == "W_O" else shape[-2]
            weights[name] = noise / fan_in**0.5
    return build_model(config, weights, api=api, dtype=dtype, model_name="tiny-attn_only")
