"""The Hugging Face architectures `load_local` supports, one entry each: how a `transformers`
config becomes a `HookedTransformerConfig`, which TransformerLens weight converter applies, and
what the architecture cannot express.

TransformerLens 3.9 builds a `HookedTransformerConfig` for a *local* folder only through its
name-keyed table (a folder whose path contains "llama" or "gemma" is mistaken for a hub model,
and Gemma has no config-driven entry at all), so the configs are built here from the folder's
own `config.json`. Adding an architecture touches this table and nothing else.

On the TransformerBridge `load_local` also loads any other causal language model the installed
TransformerLens has a Bridge adapter for (`bridge_architecture`): such a model runs through its
hooks only (`compat.has_hooked_weights`), which is all that fits, edges, ablation and
attribution need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HF_ACTIVATIONS = {
    "gelu_new": "gelu_new",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
"""Hugging Face activation names and the TransformerLens function computing the same thing."""


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture, or a feature of it, `load_local` cannot load."""


@dataclass(frozen=True)
class Architecture:
    """One supported Hugging Face architecture."""

    name: str
    """Short name used in docs and by `tiny_checkpoint` ('gpt2', 'neox', 'llama', ...)."""
    hf_class: str
    """The `transformers` model class named in `config.json`'s `architectures`."""
    shape: str
    """What the blocks look like, in a line."""
    hooked_config: Callable[[Any], dict[str, Any]] | None
    """HF config -> `HookedTransformerConfig` fields (raises for what TL cannot express);
    None for an architecture only the Bridge loads."""
    converter: str | None
    """Name of the TransformerLens weight converter in
    `transformer_lens.pretrained.weight_conversions` (None: Bridge only)."""
    uses_rms: bool = True
    """RMSNorm (no mean subtraction, so `center_writing_weights` does nothing) or LayerNorm."""
    fix_weights: Callable[[dict[str, Any], Any, Any], None] | None = None
    """Corrects the converter's output in place, `(weights, hf_model, cfg)`."""

    @property
    def hooked(self) -> bool:
        """Whether `load_local` can build a `HookedTransformer` of it (else: Bridge only)."""
        return self.hooked_config is not None

    def convert(self, hf_model: Any, cfg: Any) -> dict[str, Any]:
        """HookedTransformer-named weights of `hf_model`, via TransformerLens's converter."""
        from transformer_lens.pretrained import weight_conversions

        assert self.converter is not None, f"{self.hf_class} has no HookedTransformer converter"
        weights: dict[str, Any] = getattr(weight_conversions, self.converter)(hf_model, cfg)
        if self.fix_weights is not None:
            self.fix_weights(weights, hf_model, cfg)
        return weights


def _activation(name: str | None, arch: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{arch}: activation {name!r} has no TransformerLens equivalent; supported: "
            f"{sorted(HF_ACTIVATIONS)}. Load it with api='bridge', which runs the "
            "Hugging Face modules themselves."
        )
    return HF_ACTIVATIONS[name]


def rope_theta(c: Any, default: float = 10000.0) -> float:
    """The rotary base of a config (a top-level field before transformers 5, else in
    `rope_parameters`)."""
    params = getattr(c, "rope_parameters", None) or {}
    for value in (
        getattr(c, "rope_theta", None),
        params.get("rope_theta"),
        getattr(c, "rotary_emb_base", None),
    ):
        if value is not None:
            return float(value)
    return default


def _check_plain_rope(c: Any, arch: str) -> None:
    """Refuse rotary scaling: HookedTransformer takes Hugging Face's tables for the default
    rotary embedding only (scaled variants are untested here)."""
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise UnsupportedArchitectureError(
            f"{arch}: rotary scaling {kind!r} is not supported with api='hooked'; use "
            "api='bridge', which runs Hugging Face's own rotary embedding."
        )


def _head_dim(c: Any) -> int:
    head_dim = getattr(c, "head_dim", None)
    return int(head_dim) if head_dim else c.hidden_size // c.num_attention_heads


def _gpt2(c: Any) -> dict[str, Any]:
    if getattr(c, "add_cross_attention", False):
        raise UnsupportedArchitectureError("GPT2LMHeadModel with cross-attention is not a decoder")
    return dict(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=_activation(c.activation_function, "GPT2LMHeadModel"),
        use_attn_scale=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
        positional_embedding_type="standard",
    )


def _neox(c: Any) -> dict[str, Any]:
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    if not getattr(c, "attention_bias", True):
        raise UnsupportedArchitectureError(
            "GPTNeoXForCausalLM without attention biases: TransformerLens's converter needs "
            "them; use api='bridge'."
        )
    _check_plain_rope(c, "GPTNeoXForCausalLM")
    d_head = c.hidden_size // c.num_attention_heads
    return dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.layer_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=_activation(c.hidden_act, "GPTNeoXForCausalLM"),
        parallel_attn_mlp=bool(getattr(c, "use_parallel_residual", True)),
        positional_embedding_type="rotary",
        rotary_dim=round(get_rotary_pct_from_config(c) * d_head),
        rotary_base=rope_theta(c),
        rotary_adjacent_pairs=False,
        normalization_type="LN",
        default_prepend_bos=False,
    )


def _llama_like(c: Any, arch: str, n_kv_always: bool = False) -> dict[str, Any]:
    _check_plain_rope(c, arch)
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise UnsupportedArchitectureError(
                f"{arch} with {flag}=True: TransformerLens's converter drops these biases; "
                "use api='bridge'."
            )
    d_head = _head_dim(c)
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        n_key_value_heads=n_kv if (n_kv_always or n_kv != c.num_attention_heads) else None,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=_activation(getattr(c, "hidden_act", None), arch),
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope_theta(c),
        rotary_adjacent_pairs=False,
    )


def _llama(c: Any) -> dict[str, Any]:
    return _llama_like(c, "LlamaForCausalLM")


def _mistral(c: Any) -> dict[str, Any]:
    window = getattr(c, "sliding_window", None)
    if window is not None and window < c.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"MistralForCausalLM with a sliding window ({window} < "
            f"{c.max_position_embeddings} positions) is not supported with api='hooked'; "
            "use api='bridge'."
        )
    return _llama_like(c, "MistralForCausalLM", n_kv_always=True)


def _qwen2(c: Any) -> dict[str, Any]:
    if getattr(c, "use_sliding_window", False):
        raise UnsupportedArchitectureError(
            "Qwen2ForCausalLM with use_sliding_window=True is not supported with api='hooked'; "
            "use api='bridge'."
        )
    return {**_llama_like(c, "Qwen2ForCausalLM", n_kv_always=True), "default_prepend_bos": False}


def _gemma(c: Any) -> dict[str, Any]:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    return {
        **_llama_like(c, "GemmaForCausalLM", n_kv_always=True),
        "act_fn": _activation(act, "GemmaForCausalLM"),
        "use_attn_scale": True,
    }


def _exact_gemma_norms(weights: dict[str, Any], hf_model: Any, cfg: Any) -> None:
    """TransformerLens's Gemma converter forms the norm scales `1 + w` in float32; form them in
    the model's dtype instead, as Hugging Face does for a float64 norm (no change in float32)."""
    layers = hf_model.model.layers
    for layer in range(cfg.n_layers):
        for key, module in (
            ("ln1", layers[layer].input_layernorm),
            ("ln2", layers[layer].post_attention_layernorm),
        ):
            weights[f"blocks.{layer}.{key}.w"] = 1 + module.weight.detach().to(cfg.dtype)
    weights["ln_final.w"] = 1 + hf_model.model.norm.weight.detach().to(cfg.dtype)


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a
    for a in (
        Architecture(
            "gpt2",
            "GPT2LMHeadModel",
            "LayerNorm, GELU MLP, learned positions",
            _gpt2,
            "convert_gpt2_weights",
            uses_rms=False,
        ),
        Architecture(
            "neox",
            "GPTNeoXForCausalLM",
            "LayerNorm, parallel attention and MLP (Pythia), rotary",
            _neox,
            "convert_neox_weights",
            uses_rms=False,
        ),
        Architecture(
            "llama",
            "LlamaForCausalLM",
            "RMSNorm, gated SiLU MLP, grouped-query attention, rotary",
            _llama,
            "convert_llama_weights",
        ),
        Architecture(
            "gemma",
            "GemmaForCausalLM",
            "RMSNorm (1 + w), gated GELU MLP, grouped-query attention, rotary, scaled embedding",
            _gemma,
            "convert_gemma_weights",
            fix_weights=_exact_gemma_norms,
        ),
        Architecture(
            "mistral",
            "MistralForCausalLM",
            "Llama shape (without a sliding window shorter than the context)",
            _mistral,
            "convert_mistral_weights",
        ),
        Architecture(
            "qwen2",
            "Qwen2ForCausalLM",
            "Llama shape with query/key/value biases",
            _qwen2,
            "convert_qwen2_weights",
        ),
    )
}
"""Supported architectures, keyed by the `transformers` class name in `config.json`."""


def architecture_of(config: dict[str, Any], api: str = "hooked") -> Architecture:
    """The supported architecture a `config.json` names, or a clear error listing them. With
    `api="bridge"` any causal LM with a Bridge adapter is supported (`bridge_architecture`)."""
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if arch.hf_class in names or (not names and arch.name == _MODEL_TYPES.get(str(model_type))):
            return arch
    generic = next((a for n in names if (a := bridge_architecture(n, config)) is not None), None)
    if generic is not None and api == "bridge":
        return generic
    named = ", ".join(map(str, names or [f"model_type={model_type!r}"]))
    supported = ", ".join(f"{a.hf_class} ({a.name})" for a in ARCHITECTURES.values())
    if generic is not None:
        raise UnsupportedArchitectureError(
            f"{named} has no HookedTransformer conversion here (those are: {supported}); "
            "TransformerLens's Bridge supports it: load it with api='bridge' (or api='auto')."
        )
    raise UnsupportedArchitectureError(
        f"architecture {named} is not supported: with api='hooked' it loads "
        f"{supported}; with api='bridge' also any causal language model the installed "
        f"TransformerLens Bridge has an adapter for ({len(bridge_causal_lms())} here, e.g. "
        f"{', '.join(sorted(bridge_causal_lms())[:6])}, ...)."
    )


def bridge_causal_lms() -> frozenset[str]:
    """The causal language-model classes the installed TransformerLens Bridge has an adapter
    for and the installed `transformers` defines (a folder is read without remote code)."""
    import transformers

    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
        )
    except ImportError:  # pragma: no cover - every supported TransformerLens has it
        return frozenset()
    return frozenset(
        n
        for n in SUPPORTED_ARCHITECTURES
        if n.endswith(_CAUSAL_LM_SUFFIXES) and hasattr(transformers, n)
    )


_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def bridge_architecture(hf_class: str, config: dict[str, Any]) -> Architecture | None:
    """An architecture outside `ARCHITECTURES` that only the Bridge loads, run by
    TransformerLens's own adapter through its hooks; None when the Bridge has no adapter."""
    if hf_class not in bridge_causal_lms():
        return None
    return Architecture(
        name=str(config.get("model_type") or hf_class),
        hf_class=hf_class,
        shape="run by TransformerLens's Bridge adapter, through its hooks",
        hooked_config=None,
        converter=None,
        uses_rms="rms_norm_eps" in config,
    )


_MODEL_TYPES = {
    "gpt2": "gpt2",
    "gpt_neox": "neox",
    "llama": "llama",
    "gemma": "gemma",
    "mistral": "mistral",
    "qwen2": "qwen2",
}
