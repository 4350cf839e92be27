"""Cotangents on a section's output: one backward pass with cotangent `v` gives `Jᵀv`, so the
choice of cotangents is the choice of estimator (docs/concepts.md, "Estimating M'").

- exact: one-hot over output (position, feature), batched `chunk` at a time;
- stochastic (Hutchinson): Rademacher signs with weight 1/R, so `Σ w g gᵀ` is unbiased for
  `Σ JᵀJ`, drawn over (position, feature), positions only or features only.

Random signs come from a generator seeded per batch (`streaming.batch_generator`, on the
model's device), so estimates do not depend on where a run was interrupted or how it was
sharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy.engine.streaming import chunks

SourcesOver = Literal["both", "positions", "units"]


def output_readout(
    out_basis: Tensor | None,
    d_out: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> Float[Tensor, "k_out d_out"]:
    """Rows are the raw-space cotangents of the output features: `C_outᵀ`, or I for raw
    coordinates."""
    if out_basis is None:
        return torch.eye(d_out, dtype=dtype, device=device)
    return out_basis.T.to(device=device, dtype=dtype)


def exact_cotangents(
    readout: Tensor, batch: int, n_pos: int, chunk: int
) -> Iterator[tuple[Float[Tensor, "c batch pos d"], float]]:
    """One-hot cotangents over (output position, output feature), `chunk` at a time."""
    k, d = readout.shape
    units = [(t, i) for t in range(n_pos) for i in range(k)]
    for sl in chunks(len(units), chunk):
        part = units[sl]
        v = readout.new_zeros(len(part), n_pos, d)
        ts = torch.tensor([t for t, _ in part], device=readout.device)
        rows = torch.arange(len(part), device=readout.device)
        v[rows, ts] = readout[torch.tensor([i for _, i in part], device=readout.device)]
        yield v[:, None].expand(len(part), batch, n_pos, d), 1.0


def _signs(gen: torch.Generator, device: torch.device, dtype: torch.dtype, *shape: int) -> Tensor:
    """Rademacher signs drawn on the generator's device."""
    signs = torch.randint(0, 2, shape, generator=gen, device=gen.device) * 2 - 1
    return signs.to(device=device, dtype=dtype)


def stochastic_cotangents(
    readout: Tensor,
    batch: int,
    n_pos: int,
    n_sources: int,
    over: SourcesOver,
    gen: torch.Generator,
    chunk: int,
) -> Iterator[tuple[Float[Tensor, "c batch pos d"], float]]:
    """Rademacher cotangents with weight 1/R, so that Σ w g gᵀ is unbiased for Σ JᵀJ."""
    k, d = readout.shape
    weight = 1.0 / n_sources
    dev, dt = readout.device, readout.dtype
    if over == "both":
        v = _signs(gen, dev, dt, n_sources, batch, n_pos, k) @ readout
    elif over == "positions":
        r = _signs(gen, dev, dt, n_sources, k, batch, n_pos)
        v = (r[..., None] * readout[None, :, None, None, :]).reshape(-1, batch, n_pos, d)
    elif over == "units":
        r = _signs(gen, dev, dt, n_sources, n_pos, batch, k) @ readout
        v = readout.new_zeros(n_sources, n_pos, batch, n_pos, d)
        for t in range(n_pos):
            v[:, t, :, t] = r[:, t]
        v = v.reshape(-1, batch, n_pos, d)
    else:
        raise ValueError(f"sources_over must be 'both', 'positions' or 'units', got {over!r}")
    for sl in chunks(v.shape[0], chunk):
        yield v[sl], weight


def edge_cotangents(
    readout: Tensor,
    batch: int,
    n_pos: int,
    method: str,
    n_sources: int,
    gen: torch.Generator,
    chunk: int,
) -> Iterator[tuple[Tensor, Float[Tensor, "c batch pos d"], float]]:
    """Cotangents for edges, each reading one output feature `i`: `(i per row, v, weight)`.

    Exact: one-hot over (output position, feature). Stochastic: Rademacher signs over output
    positions per feature, so `E[(Σ_t r_t A_t)²] = Σ_t A_t²` (one position makes it exact)."""
    k_out, d_out = readout.shape
    dev = readout.device
    # unit u reads output feature u % k_out at output position (exact) or source (stochastic)
    # u // k_out; indices made on the device (one made on the host would sync a GPU per chunk)
    if method == "exact":
        n_units, weight = n_pos * k_out, 1.0
    elif method == "stochastic":
        signs = _signs(gen, dev, readout.dtype, n_sources, k_out, batch, n_pos)
        n_units, weight = n_sources * k_out, 1.0 / n_sources
    else:
        raise ValueError(f"edge method must be 'exact' or 'stochastic', got {method!r}")
    for sl in chunks(n_units, chunk):
        units = torch.arange(sl.start, sl.stop, device=dev)
        out_idx, outer = units % k_out, units // k_out
        if method == "exact":
            v = readout.new_zeros(len(units), batch, n_pos, d_out)
            rows = torch.arange(len(units), device=dev)
            v[rows, :, outer] = readout[out_idx][:, None, :]
        else:
            v = signs[outer, out_idx][..., None] * readout[out_idx][:, None, None, :]
        yield out_idx, v, weight
