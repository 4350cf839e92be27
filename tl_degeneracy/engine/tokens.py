"""Checking a model's inputs before they reach it (provisional: see the loaders' branch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.compat import is_transformer, model_cfg, model_device


class TokenError(ValueError):
    """Token ids a model cannot take: the message names the problem and the fix."""


def validate_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """`tokens` as int64 on the model's device, checked against the model."""
    if not is_transformer(model):
        return tokens.to(model_device(model))
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TokenError(
            f"tokens must be integer ids, got dtype {tokens.dtype}; convert with "
            "tokens.long() (or tokenize text with model.to_tokens)"
        )
    if tokens.ndim != 2:
        raise TokenError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    cfg = model_cfg(model)
    vocab, n_ctx = int(cfg.d_vocab), int(cfg.n_ctx)
    bad = (tokens < 0) | (tokens >= vocab)
    if bool(bad.any()):
        row, pos = (int(v) for v in bad.nonzero()[0])
        raise TokenError(
            f"token id {int(tokens[row, pos])} at row {row}, position {pos} is outside the "
            f"vocabulary of {vocab} ids (0 … {vocab - 1}); tokenize with this model's tokenizer"
        )
    if tokens.shape[1] > n_ctx:
        raise TokenError(
            f"sequences of {tokens.shape[1]} tokens exceed the model's context of {n_ctx}; "
            f"cut them to at most {n_ctx} (e.g. tokens[:, :{n_ctx}])"
        )
    return tokens.to(device=model_device(model), dtype=torch.long)
