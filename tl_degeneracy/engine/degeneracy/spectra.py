"""Ranks with a finite-data cutoff ε: null directions of a Gram and the weights they free.

`rank_ε` keeps eigenvalues `> ε · λ_max` (cutoff "relative", the default) or `> ε`
(cutoff "absolute"). Every count is also given as a curve over a log grid of ε.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy.engine.linalg import symmetric_eigh

Cutoff = Literal["relative", "absolute"]

DEFAULT_EPS_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-16, 0))


# ---------------------------------------------------------------------------------------------
# Pure functions: ranks and counts
# ---------------------------------------------------------------------------------------------


def spectrum(matrix: Float[Tensor, "d d"]) -> Float[Tensor, " d"]:
    """Eigenvalues of a symmetric matrix in float64, descending."""
    m = matrix.to(torch.float64)
    return torch.linalg.eigvalsh((m + m.T) / 2).flip(0)


def threshold(eigenvalues: Float[Tensor, " d"], eps: float, cutoff: Cutoff = "relative") -> float:
    """The eigenvalue at or below which a direction counts as null."""
    if cutoff == "relative":
        top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
        return eps * max(top, 0.0)
    if cutoff == "absolute":
        return eps
    raise ValueError(f"cutoff must be 'relative' or 'absolute', got {cutoff!r}")


def nullity(eigenvalues: Float[Tensor, " d"], eps: float, cutoff: Cutoff = "relative") -> int:
    """`d − rank_ε`: the number of eigenvalues ≤ the threshold."""
    return int((eigenvalues <= threshold(eigenvalues, eps, cutoff)).sum())


def nullity_curve(
    eigenvalues: Float[Tensor, " d"],
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    cutoff: Cutoff = "relative",
) -> Int[Tensor, " eps"]:
    """`nullity` at every ε of the grid."""
    return torch.tensor([nullity(eigenvalues, e, cutoff) for e in eps_grid], dtype=torch.int64)


def null_directions(
    matrix: Float[Tensor, "d d"], eps: float, cutoff: Cutoff = "relative"
) -> Float[Tensor, "d k"]:
    """Orthonormal eigenvectors of a symmetric matrix with eigenvalue ≤ the threshold."""
    m = matrix.to(torch.float64)
    evals, evecs = symmetric_eigh(m)
    return evecs[:, evals <= threshold(evals, eps, cutoff)]


def joint_free_weights(k: int, k_prime: int, d_in: int, d_out: int) -> int:
    """Weights of a `d_in → d_out` map freed by k null input directions and k' unread output
    directions: `k d_out + k' d_in − k k'` (the k k' weights in both sets counted once)."""
    return k * d_out + k_prime * d_in - k * k_prime


def tied_free_weights(
    embed: tuple[int, int], unembed: tuple[int, int], d_vocab: int, d_model: int
) -> int:
    """Weights of one `d_vocab × d_model` matrix used as both the embedding and the
    unembedding that are free for both uses: a lower bound, so that `N − free` stays an upper
    bound.

    `embed = (u, k'_E)`: tokens never seen (free rows) and unread directions of the embedding's
    output; `unembed = (k_U, k'_U)`: null directions of the unembedding's input and unread
    logit directions. The rows of unseen tokens are free for the unembedding where
    `Q_out δ Q_in = 0`, which leaves at least `u d − min(u, d_vocab − k'_U)(d − k_U)` of them
    (exactly `u k_U` when every logit is read); any two subspaces meet in at least the sum of
    their dimensions less the whole.
    """
    u, kp_e = embed
    k_u, kp_u = unembed
    rows = u * d_model - min(u, d_vocab - kp_u) * (d_model - k_u)
    cols = kp_e * d_vocab - (d_vocab - kp_u) * min(kp_e, d_model - k_u)
    both = (
        joint_free_weights(u, kp_e, d_vocab, d_model)
        + joint_free_weights(k_u, kp_u, d_model, d_vocab)
        - d_vocab * d_model
    )
    return max(rows, cols, both, 0)
