"""Reading a composite site's features part by part: how much of each feature lives in the
component (an MLP's neurons, attention heads' outputs) and how much in the stream that bypasses
it (docs/concepts.md, "Sites and sections")."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import model_cfg
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
