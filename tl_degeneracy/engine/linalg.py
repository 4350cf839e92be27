"""Small linear-algebra helpers shared by the bases, statistics and degeneracy counts."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

SMALL_EIGH = 1024
"""Up to this size `eigh` runs on one thread: LAPACK's threaded eigensolver is up to 100×
slower on small matrices when the cores are shared (measured here on a 128² float64 matrix:
11 ms on one thread, 1 s on two under load)."""


def symmetric_eigh(
    m: Float[Tensor, "d d"],
) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part of `m`."""
    threads = torch.get_num_threads()
    small = m.shape[0] <= SMALL_EIGH and threads > 1
    if small:
        torch.set_num_threads(1)
    try:
        return torch.linalg.eigh((m + m.T) / 2)
    finally:
        if small:
            torch.set_num_threads(threads)
