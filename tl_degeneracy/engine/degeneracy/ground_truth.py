"""Known learning coefficients, to test LLC estimators against (docs/degeneracy.md).

- Regular models: λ = d/2.
- Reduced-rank regression `y = B A x` (A: H×M, B: N×H, true rank r): Aoyagi & Watanabe,
  *Stochastic complexities of reduced rank regression in Bayesian estimation*, Neural Networks
  18 (2005).
- Deep linear networks `y = W_L ⋯ W_1 x` with layer widths H_1 (input), …, H_{L+1} (output) and
  true rank r: Aoyagi, *Consideration on the learning efficiency of multiple-layered neural
  networks with linear units*, Neural Networks 172 (2024).

All three are for a Gaussian-noise regression (squared error) with inputs of positive definite
covariance, at the most singular true parameter (each factor of rank r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy.engine.degeneracy.problems import FunctionProblem


@dataclass(frozen=True)
class LearningCoefficient:
    """λ (real log canonical threshold) and its multiplicity m: the free energy grows as
    λ log n − (m − 1) log log n, and the SGLD estimate at inverse temperature nβ is biased by
    about −(m − 1)/log(nβ)."""

    llc: float
    multiplicity: int = 1


def regular(d: int) -> LearningCoefficient:
    """A regular model with d parameters: λ = d/2."""
    return LearningCoefficient(d / 2, 1)


def reduced_rank_regression(m: int, h: int, n: int, r: int) -> LearningCoefficient:
    """λ of `x ∈ R^M ↦ B A x ∈ R^N` with a hidden width H and true rank r (Aoyagi–Watanabe).

    The four cases of the theorem, in order:
    1. N + r ≤ M + H, M + r ≤ N + H, H + r ≤ M + N:
       λ = (2(H+r)(M+N) − (M−N)² − (H+r)²)/8, plus 1/8 and m = 2 when M+H+N+r is odd;
    2. M + H < N + r: λ = (HM − Hr + Nr)/2;
    3. N + H < M + r: λ = (HN − Hr + Mr)/2;
    4. M + N < H + r: λ = MN/2.
    """
    if not 0 <= r <= min(m, h, n):
        raise ValueError(f"true rank r={r} must be between 0 and min(M, H, N)={min(m, h, n)}")
    if n + r <= m + h and m + r <= n + h and h + r <= m + n:
        odd = (m + h + n + r) % 2 == 1
        value = 2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2 + (1 if odd else 0)
        return LearningCoefficient(value / 8, 2 if odd else 1)
    if m + h < n + r:
        return LearningCoefficient((h * m - h * r + n * r) / 2)
    if n + h < m + r:
        return LearningCoefficient((h * n - h * r + m * r) / 2)
    return LearningCoefficient(m * n / 2)


def deep_linear_network(widths: Sequence[int], r: int) -> LearningCoefficient:
    """λ of a deep linear network with layer widths H_1 (input), …, H_{L+1} (output) and a
    true product of rank r (Aoyagi 2024).

    With M_j = H_j − r, take Σ = the ℓ + 1 smallest M_j (ℓ ≥ 1) such that
    max_{Σ} M < min_{not Σ} M, Σ_{Σ} M ≥ ℓ max_{Σ} M and Σ_{Σ} M < ℓ min_{not Σ} M.
    With S = Σ_{Σ} M_j, K = ⌈S/ℓ⌉ and a = S − (K − 1)ℓ:

        λ = (−r² + r(H_1 + H_{L+1}))/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4 · (S/ℓ)²
            + ½ Σ_{i<j ∈ Σ} M_i M_j.

    For two layers this is `reduced_rank_regression`. The multiplicity is 2 when a ≠ ℓ
    (the odd case of reduced-rank regression), else 1.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError("a deep linear network needs at least an input and an output width")
    if not 0 <= r <= min(widths):
        raise ValueError(f"true rank r={r} must be between 0 and min(widths)={min(widths)}")
    if len(widths) == 2:
        return regular(widths[0] * widths[1])
    ms = sorted(h - r for h in widths)
    for ell in range(1, len(ms)):
        chosen, rest = ms[: ell + 1], ms[ell + 1 :]
        s = sum(chosen)
        top = max(chosen)
        low = min(rest) if rest else math.inf
        if top < low and s >= ell * top and s < ell * low:
            k = -(-s // ell)
            a = s - (k - 1) * ell
            pairs = sum(chosen[i] * chosen[j] for i in range(len(chosen)) for j in range(i))
            value = (
                Fraction(-(r**2) + r * (widths[0] + widths[-1]), 2)
                + Fraction(a * (ell - a), 4 * ell)
                - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
                + Fraction(pairs, 2)
            )
            return LearningCoefficient(float(value), 1 if a == ell else 2)
    raise ValueError(f"no admissible index set for widths {widths} and rank {r}")  # unreachable


# ---------------------------------------------------------------------------------------------
# Test problems: behavioural losses with known λ, all chains in one batched call
# ---------------------------------------------------------------------------------------------


def linear_regression_problem(
    d: int, n: int, seed: int = 0, device: torch.device | str = "cpu"
) -> FunctionProblem:
    """L(w) = (1/2n) Σ_x ((w − w*)·x)², x ~ N(0, I_d): regular, λ = d/2."""
    return deep_linear_problem([d, 1], r=1, n=n, seed=seed, device=device)


def deep_linear_problem(
    widths: Sequence[int],
    r: int,
    n: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> FunctionProblem:
    """Behavioural loss L(w) = (1/2n) Σ_x ‖(P(w) − P(w*)) x‖² of a deep linear network
    `P(w) = W_L ⋯ W_1` at its most singular true parameter of rank r (each factor an r×r
    orthogonal block),
    with n Gaussian inputs. Two widths give a regular model; three give reduced-rank
    regression (M, H, N). Drawn on the CPU (the same problem on every device), then moved
    to `device` with its data."""
    gen = torch.Generator().manual_seed(seed)
    widths = list(widths)
    shapes = list(zip(widths[1:], widths[:-1]))
    factors = []
    for h_out, h_in in shapes:
        w = torch.zeros(h_out, h_in, dtype=dtype)
        if len(shapes) == 1:
            w = torch.randn(h_out, h_in, generator=gen, dtype=dtype)
        else:
            q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=dtype))
            w[:r, :r] = q  # singular values 1: curvature ≈ nβ in the regular directions
        factors.append(w)
    w_star = torch.cat([f.reshape(-1) for f in factors])
    x = torch.randn(n, widths[0], generator=gen, dtype=dtype)
    sizes = [a * b for a, b in shapes]
    target = _product(w_star[None], shapes, sizes)[0]

    cov = x.T @ x / n
    w_star, x, target, cov = (t.to(device) for t in (w_star, x, target, cov))

    def loss(w: Float[Tensor, "chain p"], idx: Tensor) -> Float[Tensor, " chain"]:
        delta = _product(w, shapes, sizes) - target
        if idx.shape[-1] == n:  # the whole data set: ½ tr(Δ Σ Δᵀ) with Σ = XᵀX/n
            return 0.5 * ((delta @ cov) * delta).sum((-2, -1))
        out = torch.einsum("cbm,cnm->cbn", x[idx], delta)
        return 0.5 * out.square().sum(-1).mean(-1)

    return FunctionProblem(loss, w_star, n, loss_at_star=0.0, batched=True, index_device=device)


def _product(w: Tensor, shapes: list[tuple[int, int]], sizes: list[int]) -> Tensor:
    parts = w.split(sizes, dim=-1)
    out = parts[0].reshape(-1, *shapes[0])
    for part, shape in zip(parts[1:], shapes[1:]):
        out = part.reshape(-1, *shape) @ out
    return out


def quartic_problem(n: int, n_pairs: int = 1) -> FunctionProblem:
    """L(w) = Σ_k w_{2k}² w_{2k+1}² at w* = 0 (no data: n only sets nβ): λ = n_pairs/2,
    multiplicity n_pairs + 1 (each pair has λ = 1/2, m = 2)."""

    def loss(w: Float[Tensor, "chain p"], idx: Tensor) -> Float[Tensor, " chain"]:
        pairs = w.reshape(w.shape[0], -1, 2)
        return (pairs[..., 0] * pairs[..., 1]).square().sum(-1)

    return FunctionProblem(loss, torch.zeros(2 * n_pairs, dtype=torch.float64), n, 0.0, True)
