"""A `HookedTransformer` RMSNorm that rounds like Hugging Face's `LlamaRMSNorm`.

TransformerLens normalises with `x / sqrt(mean(x²) + ε)`, Hugging Face with
`x * rsqrt(mean(x²) + ε)`. The two are the same function but round differently in float32
(28% of entries differ by one ulp), and SmolLM2's residual stream, with entries up to 2.5e4,
carries that through 30 blocks to logits 1-3e-4 apart. Attention and MLP already agree bit for
bit given the same input, so normalising the Hugging Face way makes the whole forward match.

The hook points keep their meaning: `hook_scale` still sees `sqrt(mean(x²) + ε)`, and a hook
that returns another tensor is honoured, values and gradient: freezing the scale with
`act.detach()` (same values, no gradient) linearises the norm. Only the scale the hook point
passed through untouched (the very tensor) is replaced by the exactly rounded reciprocal.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformer_lens.components import RMSNorm


@functools.cache
def _rsqrt_rmsnorm_class() -> type[RMSNorm]:
    from transformer_lens.components import RMSNorm

    class RsqrtRMSNorm(RMSNorm):
        """TransformerLens's `RMSNorm` with Hugging Face's rounding (see the module)."""

        def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
            if self.cfg.dtype not in (torch.float32, torch.float64):
                x = x.to(torch.float32)
            variance = x.pow(2).mean(-1, keepdim=True) + self.eps
            exact = variance.sqrt()
            scale = self.hook_scale(exact)
            # Identity, not equality: a detached scale has the same values but no gradient.
            inverse = torch.rsqrt(variance) if scale is exact else scale.reciprocal()
            x = self.hook_normalized(x * inverse).to(self.cfg.dtype)
            if x.device != self.w.device:
                self.to(x.device)
            return x * self.w

    return RsqrtRMSNorm


def round_rmsnorm_like_hugging_face(model: nn.Module) -> int:
    """Switch every `RMSNorm` of a `HookedTransformer` to Hugging Face's rounding, in place.

    Returns how many modules were switched. `RMSNormPre` (after `fold_ln`) is left alone: folding
    moves the weights, so the rounding cannot match Hugging Face's anyway.
    """
    from transformer_lens.components import RMSNorm

    target = _rsqrt_rmsnorm_class()
    switched = 0
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = target
            switched += 1
    return switched
