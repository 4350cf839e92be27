"""Reading a composite site's features part by part: how much of each feature lives in the
component (an MLP's neurons, attention heads' outputs) and how much in the stream that bypasses
it (docs/concepts.md, "Sites and sections")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import hooked_state_dict, model_cfg, normalises_block_outputs
from tl_degeneracy.engine.sites import site_parts


def part_widths(model: nn.Module, basis: SiteBasis) -> dict[str, int]:
    """Width of each part of the basis's site, in order (one entry for a plain site)."""
    parts = site_parts(model, basis.site)
    if len(parts) == 1:
        return {parts[0]: basis.d}
    d_stream = int(model_cfg(model).d_model)
    return {parts[0]: basis.d - d_stream, parts[1]: d_stream}


def part_shares(model: nn.Module, basis: SiteBasis) -> Float[Tensor, "k parts"]:
    """For each feature, the share of its direction's squared norm (its row of `C⁺`, what
    the feature writes into the site) in each part; rows sum to 1."""
    rows = basis.C_pinv.to(torch.float64)
    out, start = [], 0
    for width in part_widths(model, basis).values():
        out.append(rows[:, start : start + width].square().sum(1))
        start += width
    norms = torch.stack(out, 1)
    return norms / norms.sum(1, keepdim=True).clamp(min=1e-300)


def stream_directions(
    model: nn.Module, basis: SiteBasis, features: Sequence[int] | None = None
) -> Float[Tensor, "f d_model"]:
    """What one unit of each feature writes directly into the residual stream (float64): a
    plain site's direction (its row of `C⁺`) itself; a composite's component part through the
    component's output weights (`W_out` of the MLP, `W_O` of the heads, heads flattened as in
    `hook_z`) plus its stream part. `features` picks rows (default: all)."""
    rows = basis.C_pinv.to(torch.float64)
    if features is not None:
        rows = rows[torch.as_tensor(list(features), dtype=torch.long, device=rows.device)]
    widths = part_widths(model, basis)
    if len(widths) == 1:
        return rows
    if normalises_block_outputs(model):
        raise ValueError(
            "this model normalises what attention and the MLP write before adding it to the "
            "stream (norms after them, as Gemma 2 and OLMo 2), so what a composite feature "
            "writes into the stream is not a fixed direction; part_shares still applies"
        )
    component, width = next(iter(widths.items()))  # e.g. blocks.3.mlp.hook_post, d_mlp
    layer = component.split(".")[1]
    key = f"blocks.{layer}.mlp.W_out" if ".mlp." in component else f"blocks.{layer}.attn.W_O"
    d_model = int(model_cfg(model).d_model)
    w_out = hooked_state_dict(model)[key].detach().to(rows.device, torch.float64)
    return rows[:, :width] @ w_out.reshape(-1, d_model) + rows[:, width:]
