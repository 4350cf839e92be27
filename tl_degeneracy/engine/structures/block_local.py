"""Block-local sections: a section inside one block of a `HookedTransformer`, run by that block
alone on the input site's stored activation instead of the whole model from the tokens.

The section's input site is injected through the block's own hook points and its output read
there, so the block computes exactly what the model computes (tested equal to the generic
path): from `hook_resid_pre` (or `attn.hook_z`) the whole block runs; from `hook_resid_mid` (or
an MLP site) only its MLP half. Positions outside the input site's selection keep their stored
values, so a site that leaves out position 0 (BOS) runs here at the same speed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.capture import _read_hooks, injection_hooks
from tl_degeneracy.engine.compat import StopForward, is_bridge, model_cfg, temporary_hooks
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures.base import Structure

_SITE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|attn\.hook_z|hook_resid_mid|mlp\.hook_pre|mlp\.hook_post|"
    r"hook_resid_post)$"
)
_ORDER = ["hook_resid_pre", "attn.hook_z", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post"]


def block_local_layer(model: nn.Module, section: Section) -> int | None:
    """The block that contains the whole section, when it can run alone, else None: a
    `HookedTransformer` (the Bridge's blocks take Hugging Face arguments) with pre-norm blocks
    and no per-head or shortformer inputs, left padding or post-norm."""
    if is_bridge(model):
        return None
    cfg = model_cfg(model)
    tokenizer = getattr(model, "tokenizer", None)
    if (
        getattr(cfg, "use_hook_mlp_in", False)
        or getattr(cfg, "use_attn_in", False)
        or getattr(cfg, "use_split_qkv_input", False)
        or getattr(cfg, "positional_embedding_type", "standard") == "shortformer"
        or str(getattr(cfg, "original_architecture", "")).startswith("Olmo")
        or getattr(cfg, "use_normalization_before_and_after", False)
        or (tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left")
    ):
        return None
    m_in, m_out = _SITE.match(section.inp.hook), _SITE.match(section.out.hook)
    if m_in is None or m_out is None or m_in.group(2) == "hook_resid_post":
        return None
    layer, stage_in = int(m_in.group(1)), _ORDER.index(m_in.group(2))
    out_layer, out_name = int(m_out.group(1)), m_out.group(2)
    if out_layer == layer + 1 and out_name == "hook_resid_pre":
        return layer  # the next block's resid_pre is this block's resid_post
    if out_layer != layer:
        return None
    stage_out = len(_ORDER) if out_name == "hook_resid_post" else _ORDER.index(out_name)
    return layer if stage_out > stage_in else None


class BlockLocal(Structure):
    """A section inside one block, run by the block on the stored input activation."""

    kind = "block_local"

    def __init__(self, model: nn.Module, section: Section, layer: int):
        super().__init__(model, section)
        self.layer = layer
        hooked: Any = model
        self.block = hooked.blocks[layer]
        cfg = model_cfg(model)
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.d_model = int(cfg.d_model)
        name = section.inp.hook.split(".", 2)[2]
        self.mlp_half = not self.parallel and _ORDER.index(name) >= _ORDER.index("hook_resid_mid")
        out = section.out
        if out.hook == f"blocks.{layer + 1}.hook_resid_pre":  # the same stream, read in here
            out = Site(f"blocks.{layer}.hook_resid_post", out.positions)
        self.read_site = out

    def describe(self) -> str:
        return f"block_local:{self.layer}"

    def forward(self, inputs: Tensor, full: Tensor | None, x: Tensor) -> Tensor:
        assert full is not None
        stream = full[..., -self.d_model :]  # the residual stream entering the computation
        hooks = injection_hooks(self.model, self.section.inp, x)
        store: dict[str, Tensor] = {}
        hooks += _read_hooks(self.model, self.read_site, store)
        with temporary_hooks(self.model, hooks):
            try:
                if self.mlp_half:
                    blk = self.block
                    mid = blk.hook_resid_mid(stream)
                    blk.hook_resid_post(mid + blk.apply_mlp(blk.ln2(mid)))
                else:
                    self.block(stream)
            except StopForward:
                pass
        return store["out"]

    def leaf_forward(self, inputs: Tensor, full: Tensor | None) -> tuple[list[Tensor], Tensor]:
        assert full is not None
        x = self.section.inp.select(full).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return [x], self.forward(inputs, full, x)
