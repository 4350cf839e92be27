"""Token batches checked against the model before they reach it.

TransformerLens fails deep inside the embedding on bad tokens (`IndexError: index out of range
in self` for an id ≥ d_vocab, a dtype error for floats) and does not check the context length.
`validate_tokens` says instead what is wrong, where, and how to fix it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import is_transformer, model_cfg, model_device, model_dtype


class TokenError(ValueError):
    """Tokens a model cannot run on: wrong type, dtype or shape, ids outside the vocabulary,
    or sequences longer than the context."""


class PaddingWarning(UserWarning):
    """A token batch that looks padded: its pad positions would be fitted as if they were text."""


def validate_tokens(model: nn.Module, tokens: Any) -> Int[Tensor, "batch pos"]:
    """`tokens` as an int64 `[batch, pos]` tensor on the model's device, after checking that
    every id is in `[0, d_vocab)` and that no sequence is longer than `n_ctx`.

    Accepts a tensor, a NumPy array or nested lists of ints. Raises `TokenError` naming the
    problem (the offending row, position and id; the dtype; the shape; the length) and the fix.
    Warns (`PaddingWarning`) when rows end, or start, in runs of the tokenizer's pad id of
    different lengths, as a padded batch of prompts does. A model that is not a transformer
    (an MLP on images, say) takes its inputs as they are, moved to its device; floating-point
    inputs are converted to the model's floating dtype (float32 data for a float64 model), as
    a basis is.
    """
    tokens = _as_tensor(tokens)
    if not is_transformer(model):
        if tokens.is_floating_point() and any(p.is_floating_point() for p in model.parameters()):
            return tokens.to(device=model_device(model), dtype=model_dtype(model))
        return tokens.to(model_device(model))
    cfg = model_cfg(model)
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TokenError(_dtype_message(tokens))
    if tokens.ndim != 2:
        raise TokenError(_rank_message(tokens))
    n_rows, n_pos = tokens.shape
    if n_rows == 0 or n_pos == 0:
        raise TokenError(f"tokens have shape {tuple(tokens.shape)}: no rows or no positions")
    d_vocab = int(cfg.d_vocab)
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        token_id = int(tokens[row, pos])
        raise TokenError(
            f"token id {token_id} at row {row}, position {pos} is outside the vocabulary "
            f"[0, {d_vocab}) of this model ({int(bad.sum())} such ids in "
            f"{int(bad.any(1).sum())} rows; largest {int(tokens.max())}, smallest "
            f"{int(tokens.min())}). Tokenize with this model's own tokenizer "
            "(model.to_tokens(text))."
        )
    n_ctx = int(cfg.n_ctx)
    if n_pos > n_ctx:
        raise TokenError(
            f"sequences have {n_pos} positions but the model's context is n_ctx = {n_ctx}; cut "
            f"them (tokens[:, :{n_ctx}]) or split them into rows of at most {n_ctx} tokens"
        )
    _warn_if_padded(model, tokens)
    return tokens.to(device=_device(model), dtype=torch.int64)


def validate_pair(
    model: nn.Module, clean: Any, corrupted: Any
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """A clean and a corrupted batch for patching: `validate_tokens` of each (on the model's
    device: a TransformerBridge, unlike a HookedTransformer, does not move its inputs), after
    checking they have one shape."""
    clean, corrupted = validate_tokens(model, clean), validate_tokens(model, corrupted)
    if clean.shape != corrupted.shape:
        raise ValueError(
            "clean and corrupted tokens must be [batch, pos] of the same shape, got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )
    return clean, corrupted


def _warn_if_padded(model: nn.Module, tokens: Tensor) -> None:
    """`PaddingWarning` when the rows' trailing (or leading) runs of the pad id differ in length
    and one is at least 2 long: a ragged batch padded to its longest row. Single pads are let
    through: a packed text row may end in an end-of-text token that is also the pad token."""
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    if pad is None or tokens.shape[0] < 2:
        return
    is_pad = (tokens == int(pad)).int()
    for side, flags in (("end", is_pad.flip(1)), ("start", is_pad)):
        runs = flags.cumprod(1).sum(1)
        longest = int(runs.max())
        if longest >= 2 and int(runs.min()) < longest:
            padded = int((runs > int(runs.min())).sum())
            warnings.warn(
                f"{padded} of {tokens.shape[0]} rows {side} in a longer run of the pad token "
                f"(id {int(pad)}, up to {longest} positions) than the others: this looks like "
                "a padded batch, and every pad position would be fitted as if it were text. "
                "Batch prompts by length instead: tl_degeneracy.models.prompt_batches(prompts, "
                "model.tokenizer). If the pad id is meant as text here, ignore this warning.",
                PaddingWarning,
                stacklevel=3,
            )
            return


def _as_tensor(tokens: Any) -> Tensor:
    if isinstance(tokens, Tensor):
        return tokens
    if isinstance(tokens, str) or (
        isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)
    ):
        raise TokenError("tokens are text: tokenize first, e.g. model.to_tokens(text)")
    try:
        return torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TokenError(
            f"tokens of type {type(tokens).__name__} cannot be made a tensor ({error}); pass an "
            "integer tensor of shape [batch, pos]"
        ) from error


def _dtype_message(tokens: Tensor) -> str:
    if tokens.dtype == torch.bool:
        return "tokens are bool, not token ids; pass an integer tensor of shape [batch, pos]"
    whole = (
        tokens.is_floating_point()
        and bool(torch.isfinite(tokens).all())
        and bool((tokens == tokens.round()).all())
    )
    if whole:
        return (
            f"tokens have dtype {tokens.dtype}; token ids must be integers. These values are "
            "whole numbers: convert them with tokens.long()"
        )
    return (
        f"tokens have dtype {tokens.dtype} and values that are not whole numbers, so they are not "
        "token ids (activations or embeddings?); pass an integer tensor of shape [batch, pos]"
    )


def _rank_message(tokens: Tensor) -> str:
    shape = tuple(tokens.shape)
    if tokens.ndim == 1:
        return (
            f"tokens have shape {shape}; they must be [batch, pos]. For one sequence add the "
            "batch axis: tokens[None]"
        )
    if tokens.ndim == 0:
        return "tokens are a single number; they must be a [batch, pos] tensor"
    return (
        f"tokens have shape {shape} ({tokens.ndim} axes); they must be [batch, pos]. Merge the "
        f"leading axes first: tokens.reshape(-1, {shape[-1]})"
    )


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device(str(getattr(model_cfg(model), "device", "cpu") or "cpu"))
