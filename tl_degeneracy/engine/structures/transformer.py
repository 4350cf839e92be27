"""Closed forms of TransformerLens transformer sections, read from the config and the weights
(HookedTransformer names on either API), for `structure_of`:

- `resid_post` of the last block → logits without a final norm: affine (`W_U`);
- an MLP site `[hook_post, hook_resid_mid]` → `hook_resid_post`: affine (`[W_out; I]`), any
  normalisation before the MLP (none after it: `compat.normalises_block_outputs`);
- per-head outputs `[hook_z, hook_resid_pre]` → the next residual site: affine (`[W_O; I]`);
- `hook_resid_mid` → `hook_resid_post` (or the MLP site) of a ReLU MLP without normalisation:
  `AffineRelu`;
- `hook_resid_pre` → `hook_resid_mid` of a plain model: the attention closed form.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from tl_degeneracy.engine.compat import (
    has_hooked_weights,
    hooked_state_dict,
    model_cfg,
    normalises_block_outputs,
)
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import LOGITS
from tl_degeneracy.engine.structures.forms import Affine, AffineRelu, Form

_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _where(hook: str) -> tuple[int, str] | None:
    m = _HOOK.match(hook)
    return (int(m.group(1)), m.group(2)) if m else None


def _next_stream(hook: str, layer: int) -> set[str]:
    """Names of the residual stream right after block `layer`'s MLP."""
    return {f"blocks.{layer}.hook_resid_post", f"blocks.{layer + 1}.hook_resid_pre"}


def transformer_form(model: nn.Module, section: Section) -> Form | None:
    """The closed form of a position-wise transformer section, or None (always None for a
    Bridge whose blocks are not HookedTransformer blocks, `compat.has_hooked_weights`, and for
    blocks that normalise their outputs, `compat.normalises_block_outputs`)."""
    if not has_hooked_weights(model) or normalises_block_outputs(model):
        return None
    cfg = model_cfg(model)
    inp, out = section.inp.hook, section.out.hook
    plain = getattr(cfg, "normalization_type", None) is None
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    here = _where(inp)
    if out == LOGITS:
        last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        if inp == last and plain:
            state = hooked_state_dict(model)
            w_u = state["unembed.W_U"]
            b_u = state.get("unembed.b_U", w_u.new_zeros(w_u.shape[1]))
            return Affine(w_u.detach(), b_u.detach())
        return None
    if here is None:
        return None
    layer, name = here
    sd: dict[str, Tensor] | None = None

    def weights() -> dict[str, Tensor]:
        nonlocal sd
        if sd is None:
            sd = {k: v.detach() for k, v in hooked_state_dict(model).items()}
        return sd

    if name == "mlp.hook_post" and not parallel and out in _next_stream(out, layer):
        w = weights()
        p = f"blocks.{layer}.mlp."
        w_out = w[p + "W_out"]
        eye = torch.eye(w_out.shape[1], dtype=w_out.dtype, device=w_out.device)
        b_out = w.get(p + "b_out", w_out.new_zeros(w_out.shape[1]))
        return Affine(torch.cat([w_out, eye]), b_out)
    if name == "attn.hook_z" and not parallel:
        after = {f"blocks.{layer}.hook_resid_mid"}
        if getattr(cfg, "attn_only", False):
            after = _next_stream(out, layer)
        if out not in after:
            return None
        w = weights()
        w_o = w[f"blocks.{layer}.attn.W_O"]  # [head, d_head, d_model]
        flat = w_o.flatten(0, 1)
        eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        b_o = w.get(f"blocks.{layer}.attn.b_O", flat.new_zeros(flat.shape[1]))
        return Affine(torch.cat([flat, eye]), b_o)
    relu_mlp = (
        plain
        and str(getattr(cfg, "act_fn", "")) == "relu"
        and not getattr(cfg, "gated_mlp", False)
        and not getattr(cfg, "attn_only", False)
        and not parallel
    )
    if name == "hook_resid_mid" and relu_mlp:
        w = weights()
        p = f"blocks.{layer}.mlp."
        w_in, w_out = w[p + "W_in"], w[p + "W_out"]
        b_in = w.get(p + "b_in", w_in.new_zeros(w_in.shape[1]))
        b_out = w.get(p + "b_out", w_in.new_zeros(w_in.shape[0]))
        if out in _next_stream(out, layer):
            eye = torch.eye(w_in.shape[0], dtype=w_in.dtype, device=w_in.device)
            return AffineRelu(w_in, b_in, w_out, eye, b_out)
        if out == f"blocks.{layer}.mlp.hook_post":  # into the composite [hidden, stream]
            d_model, d_mlp = w_in.shape
            eye_mlp = torch.eye(d_mlp, dtype=w_in.dtype, device=w_in.device)
            eye_model = torch.eye(d_model, dtype=w_in.dtype, device=w_in.device)
            q = torch.cat([eye_mlp, w_in.new_zeros(d_mlp, d_model)], 1)
            direct = torch.cat([w_in.new_zeros(d_model, d_mlp), eye_model], 1)
            return AffineRelu(w_in, b_in, q, direct, w_in.new_zeros(d_mlp + d_model))
    return None


def plain_attention_layer(model: nn.Module, section: Section) -> int | None:
    """The layer whose attention block is the section (`hook_resid_pre` → `hook_resid_mid` of a
    plain model, see `plain.is_plain`), else None."""
    from tl_degeneracy.engine.structures.plain import is_plain

    here = _where(section.inp.hook)
    if here is None or here[1] != "hook_resid_pre":
        return None
    if section.out.hook != f"blocks.{here[0]}.hook_resid_mid" or not is_plain(model):
        return None
    return here[0]


def uses_declared_form(model: Any, section: Section) -> Form | None:
    """A form the model declares for the section (`forms.DeclaresSections`), or None."""
    declare = getattr(model, "section_form", None)
    if declare is None or not callable(declare):
        return None
    if section.inp.positions != section.out.positions:
        return None
    return declare(section.inp.hook, section.out.hook)
