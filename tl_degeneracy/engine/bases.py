"""Bases at a site (docs/concepts.md, "Bases"): PCA, neuron, LIB/IB, as pure float64 linear algebra.

Row-wise convention: features `f̂ = (f − μ) C`, reconstruction `f ≈ μ + f̂ C⁺`, `C⁺ C = I`,
columns sorted by importance. LIB: `C = U D^{-1/2} V Λ^{1/2}` where `G = U D Uᵀ` is the site's
centred Gram and `M = D^{1/2} Uᵀ M' U D^{1/2} = V Λ Vᵀ` the whitened Jacobian Gram.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.compat import usable_device
from tl_degeneracy.engine.linalg import symmetric_eigh
from tl_degeneracy.engine.sites import Site

BasisKind = Literal["lib", "ib", "pca", "neuron", "raw"]


@dataclass(frozen=True)
class Truncation:
    """Drop directions with eigenvalue ≤ `absolute` or ≤ `relative` · largest.

    The reference implementation uses absolute 1e-15, relative 0 (the default here, so the
    modular-addition results reproduce it); relative cut-offs are more robust to rounding in
    float32 models (see docs/concepts.md).
    """

    absolute: float = 1e-15
    relative: float = 0.0

    def __post_init__(self) -> None:
        for name, ok, allowed in (
            ("absolute", lambda x: 0 <= x < math.inf, "a finite number ≥ 0, e.g. 1e-15"),
            ("relative", lambda x: 0 <= x < 1, "a number in [0, 1), e.g. 1e-10"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
                raise ValueError(
                    f"Truncation {name} must be {allowed} (eigenvalues at or below it are "
                    f"dropped), got {value!r}"
                )

    def keep(self, eigenvalues: Tensor) -> Tensor:
        """Boolean mask of kept eigenvalues (assumed sorted descending)."""
        if eigenvalues.numel() == 0:
            return eigenvalues.bool()
        top = float(eigenvalues[0])
        return (eigenvalues > self.absolute) & (eigenvalues > self.relative * top)

    def emptied(self, basis: SiteBasis) -> bool:
        """Whether these cut-offs alone left `basis` without a feature: they drop every
        eigenvalue (of the Gram, or of the matrix the basis diagonalises) that the default
        `Truncation()` keeps. False when the spectrum itself is all ~0 (the data's doing)."""
        default = Truncation()
        return any(
            bool(default.keep(spectrum).any()) and not bool(self.keep(spectrum).any())
            for spectrum in (basis.gram_eigenvalues, basis.full_spectrum)
        )

    def to_json(self) -> dict:
        return {"absolute": self.absolute, "relative": self.relative}


@dataclass(repr=False)
class SiteBasis(BriefRepr):
    """A fitted basis at one site: `features = (f − mean) C`, `f ≈ mean + features C_pinv`."""

    site: Site
    kind: BasisKind
    C: Float[Tensor, "d k"]
    C_pinv: Float[Tensor, "k d"]
    importance: Float[Tensor, " k"]
    """Λ for LIB/IB, the variance for PCA and neuron bases (kept directions only)."""
    mean: Float[Tensor, " d"]
    gram_eigenvalues: Float[Tensor, " d"]
    """Full spectrum D of the site's centred Gram, descending."""
    full_spectrum: Float[Tensor, " m"] = field(default_factory=lambda: torch.zeros(0))
    """Untruncated spectrum of the matrix the basis diagonalises (Λ before truncation)."""

    @property
    def d(self) -> int:
        return int(self.C.shape[0])

    @property
    def k(self) -> int:
        return int(self.C.shape[1])

    def features(self, act: Float[Tensor, "... d"]) -> Float[Tensor, "... k"]:
        """Coordinates of activations in this basis (float64, on the activations' device)."""
        b = self.to(act.device)
        return (act.to(torch.float64) - b.mean) @ b.C

    def reconstruct(self, feats: Float[Tensor, "... k"]) -> Float[Tensor, "... d"]:
        """Activations from coordinates (float64, on the coordinates' device)."""
        b = self.to(feats.device)
        return b.mean + feats.to(torch.float64) @ b.C_pinv

    def to(self, device: torch.device | str) -> SiteBasis:
        """This basis with its tensors on `device` (itself when they are there already)."""
        if self.C.device == device:  # every hook call: the activations' own device, unchecked
            return self
        device = usable_device(device)
        if self.C.device == device:
            return self
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if f.name != "site" and f.name != "kind"
            },
        )

    def check_kept(self, k: int) -> int:
        """`k` as a count of top features to keep: a whole number ≥ 0; one above `self.k` keeps
        them all (one list of counts serves sites of different widths)."""
        try:
            count = operator.index(k)  # int, NumPy or 0-d torch integers; not floats or bools
        except TypeError:
            count = -1
        if isinstance(k, bool) or count < 0:
            raise ValueError(
                f"{k!r} features to keep at {self.site.name}: give a whole number from 0 "
                f"(only the mean) to {self.k} (every feature); a negative count is not "
                "'all but the last', it is refused"
            )
        return min(count, self.k)

    def importance_order(self) -> Tensor:
        """Feature indices from the most to the least important (NaN last). Ties keep column
        order, so for a basis with sorted columns (LIB, IB, PCA, neuron) this is `0, 1, …, k−1`;
        a raw basis's columns are the site's coordinates in model order, with their variances
        as importance, and this ranks them."""
        imp = self.importance.detach().cpu()
        key = imp.masked_fill(imp.isnan(), -math.inf)
        return torch.argsort(key, descending=True, stable=True)

    def truncated(self, k: int) -> SiteBasis:
        """The basis restricted to its first `k` features (columns).

        For LIB, IB, PCA and neuron bases, whose columns are sorted by importance, these are
        its `k` most important features. A raw basis keeps its first `k` coordinates (its
        columns stay the site's coordinates in model order, so that row `i` of edges into the
        truncated basis is coordinate `i` for every reader of the edges); views rank a raw
        site's features with `importance_order`.
        """
        k = self.check_kept(k)
        return replace(
            self, C=self.C[:, :k], C_pinv=self.C_pinv[:k], importance=self.importance[:k]
        )


def _eigh_desc(m: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = symmetric_eigh(m)
    return evals.flip(0), evecs.flip(1)


def _signed(
    c: Float[Tensor, "d k"], c_pinv: Float[Tensor, "k d"]
) -> tuple[Float[Tensor, "d k"], Float[Tensor, "k d"]]:
    """One sign per feature: the entry of largest magnitude of each column of `C` positive
    (the row of `C⁺` alike). An eigensolver's signs are arbitrary and flip with rounding
    (another thread count, BLAS or rank order), and stochastic `M'` draws its sources on
    the output features, so without this a rounding-level difference changed every section
    upstream by far more than rounding."""
    if c.shape[1] == 0:
        return c, c_pinv
    top = c.abs().argmax(0)
    sign = torch.where(c[top, torch.arange(c.shape[1])] < 0, -1.0, 1.0).to(c.dtype)
    return c * sign, c_pinv * sign[:, None]


def pca_basis(
    site: Site,
    mean: Float[Tensor, " d"],
    gram: Float[Tensor, "d d"],
    truncation: Truncation = Truncation(),
) -> SiteBasis:
    """`C = U` on the kept eigen-directions of the centred Gram, importance = variance."""
    d_all, u_all = _eigh_desc(gram.to(torch.float64))
    keep = truncation.keep(d_all)
    u, u_t = _signed(u_all[:, keep], u_all[:, keep].T.clone())
    return SiteBasis(site, "pca", u, u_t, d_all[keep], mean.to(torch.float64), d_all, d_all)


def neuron_basis(site: Site, mean: Float[Tensor, " d"], gram: Float[Tensor, "d d"]) -> SiteBasis:
    """The standard basis, columns ordered by each coordinate's variance."""
    var = torch.diagonal(gram).to(torch.float64)
    order = torch.argsort(var, descending=True)
    eye = torch.eye(var.shape[0], dtype=torch.float64)[:, order]
    d_all, _ = _eigh_desc(gram.to(torch.float64))
    return SiteBasis(site, "neuron", eye, eye.T.clone(), var[order], mean.to(torch.float64), d_all)


def interaction_basis(
    site: Site,
    mean: Float[Tensor, " d"],
    gram: Float[Tensor, "d d"],
    jacobian_gram: Float[Tensor, "d d"],
    truncation: Truncation = Truncation(),
    kind: BasisKind = "lib",
) -> SiteBasis:
    """LIB (or IB, when `jacobian_gram` is taken to the final site) from G and M'.

    Centre, project on PCA, whiten, rotate into the eigenbasis of the whitened Jacobian Gram,
    scale each direction by the root of its importance.
    """
    d_all, u_all = _eigh_desc(gram.to(torch.float64))
    keep = truncation.keep(d_all)
    u, d = u_all[:, keep], d_all[keep]
    r_pinv = d.sqrt()[:, None] * u.T  # R⁺ = D^{1/2} Uᵀ
    m = r_pinv @ jacobian_gram.to(torch.float64) @ r_pinv.T
    lam_all, v_all = _eigh_desc(m)
    keep_l = truncation.keep(lam_all)
    lam, v = lam_all[keep_l], v_all[:, keep_l]
    r = u / d.sqrt()  # R = U D^{-1/2}
    c, c_pinv = _signed(r @ v * lam.sqrt(), (v / lam.sqrt()).T @ r_pinv)
    return SiteBasis(site, kind, c, c_pinv, lam, mean.to(torch.float64), d_all, lam_all)
