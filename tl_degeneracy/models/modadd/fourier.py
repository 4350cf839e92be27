"""Fourier labels for features of modular-addition models.

A feature of a site is a function on the grid of inputs `(x, y) ∈ Z_p × Z_p` (all p² inputs in
the order `[(a, b) for a in range(p) for b in range(p)]`). Its 2-D discrete Fourier transform
splits its power (sum of squares over the grid) into frequency pairs. Those are folded into
named, phase-invariant terms, so that a label does not depend on where the residues start:

- `const`: the mean.
- `cos(wx) + cos(wy)`: waves in `x` alone or `y` alone at frequency `w`, any phase.
- For a pair of non-zero frequencies `(w1, w2)` the four-dimensional block of waves has two
  phase-invariant descriptions, and each feature is labelled in one of them:
  - *sum/difference*: `cos(w1x + w2y)` and `cos(w1x - w2y)` (travelling waves, any phase);
  - *product*: the two rank-one parts of the block, `cos(w1x) * cos(w2y)` (the larger) and
    `sin(w1x) * sin(w2y)` (the smaller), each with its own phases. Their powers are
    `(√P₊ ± √P₋)² / 2` where `P₊`, `P₋` are the block's sum and difference powers.

  With `representation="auto"` (the reference's behaviour) a feature gets the sum/difference
  description when its total `cos(w1x + w2y)` power exceeds its total leading-product power,
  else the product description. Frequencies are folded to `1 … ⌊p/2⌋`.

A multi-position site (e.g. `hook_resid_pre` of a `[a, b, =]` model) is reduced by summing the
feature over positions before the transform (`position_reduction="sum"`), which reproduces the
reference labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

Representation = Literal["auto", "sum", "product"]

KIND_CONST, KIND_AXIS, KIND_SUM, KIND_DIFF, KIND_COS_COS, KIND_SIN_SIN = range(6)
KIND_NAMES = ("const", "axis", "sum", "diff", "cos_cos", "sin_sin")


def _term_name(kind: int, w1: int, w2: int) -> str:
    if kind == KIND_CONST:
        return "const"
    if kind == KIND_AXIS:
        return f"cos({w1}x) + cos({w1}y)"
    if kind == KIND_SUM:
        return f"cos({w1}x + {w2}y)"
    if kind == KIND_DIFF:
        return f"cos({w1}x - {w2}y)"
    if kind == KIND_COS_COS:
        return f"cos({w1}x) * cos({w2}y)"
    return f"sin({w1}x) * sin({w2}y)"


@dataclass(frozen=True)
class FourierTerms:
    """The named terms for a modulus `p`: term `t` has `kind[t]` and frequencies `w1[t], w2[t]`.

    Layout: `const`, then `h = ⌊p/2⌋` axis terms, then four blocks of `h²` terms (sum,
    difference, cos·cos, sin·sin), each indexed by `(w1 − 1) * h + (w2 − 1)`.
    """

    p: int
    kind: Int[Tensor, " n_terms"]
    w1: Int[Tensor, " n_terms"]
    w2: Int[Tensor, " n_terms"]
    names: tuple[str, ...] = field(repr=False)

    @classmethod
    def for_modulus(cls, p: int) -> FourierTerms:
        h = p // 2
        kinds, w1s, w2s = [KIND_CONST], [0], [0]
        kinds += [KIND_AXIS] * h
        w1s += list(range(1, h + 1))
        w2s += [0] * h
        grid_1 = [a for a in range(1, h + 1) for _ in range(1, h + 1)]
        grid_2 = [b for _ in range(1, h + 1) for b in range(1, h + 1)]
        for kind in (KIND_SUM, KIND_DIFF, KIND_COS_COS, KIND_SIN_SIN):
            kinds += [kind] * (h * h)
            w1s += grid_1
            w2s += grid_2
        names = tuple(_term_name(k, a, b) for k, a, b in zip(kinds, w1s, w2s))
        return cls(p, torch.tensor(kinds), torch.tensor(w1s), torch.tensor(w2s), names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class FourierLabels:
    """Share of each feature's power in each named Fourier term.

    `shares[i, t]` is the fraction of feature `i`'s power (sum of squares over all p² inputs,
    mean included) in term `t`; each row sums to 1 (rows of all-zero features are 0).
    `representation[i]` says which two-frequency description feature `i` uses; `power[i]` is
    its mean square over the grid.
    """

    p: int
    shares: Float[Tensor, "n_features n_terms"]
    term_names: tuple[str, ...] = field(repr=False)
    term_kind: Int[Tensor, " n_terms"] = field(repr=False)
    term_w1: Int[Tensor, " n_terms"] = field(repr=False)
    term_w2: Int[Tensor, " n_terms"] = field(repr=False)
    representation: tuple[str, ...] = field(repr=False)
    power: Float[Tensor, " n_features"] = field(repr=False)

    @property
    def n_features(self) -> int:
        return self.shares.shape[0]

    def term_index(self, name: str) -> int:
        """Column of the term called `name` (e.g. `"cos(15x + 15y)"`)."""
        if not hasattr(self, "_index"):
            self._index = {n: i for i, n in enumerate(self.term_names)}
        return self._index[name]

    def share(self, feature: int, name: str) -> float:
        """Share of one feature's power in the named term."""
        return self.shares[feature, self.term_index(name)].item()

    @property
    def frequency_shares(self) -> Float[Tensor, "n_features n_freq"]:
        """Share of power per frequency `0 … ⌊p/2⌋` (0 = const); a term with two different
        frequencies gives half its share to each."""
        h = self.p // 2
        out = torch.zeros(self.n_features, h + 1, dtype=self.shares.dtype)
        two = self.term_w2 > 0
        weight = torch.where(two & (self.term_w1 != self.term_w2), 0.5, 1.0).to(out.dtype)
        out.index_add_(1, self.term_w1, self.shares * weight)
        mixed = two & (self.term_w1 != self.term_w2)
        out.index_add_(1, self.term_w2[mixed], self.shares[:, mixed] * 0.5)
        return out

    @property
    def dominant_frequency(self) -> Int[Tensor, " n_features"]:
        """The non-zero frequency carrying most of each feature's power (0 if none has any)."""
        fs = self.frequency_shares[:, 1:]
        best = fs.argmax(dim=1) + 1
        return torch.where(fs.amax(dim=1) > 0, best, torch.zeros_like(best))

    @property
    def dominant_term(self) -> list[str]:
        """Name of each feature's largest term."""
        return [self.term_names[i] for i in self.shares.argmax(dim=1).tolist()]

    def top_terms(self, feature: int, k: int = 7) -> list[tuple[str, float]]:
        """The `k` largest terms of one feature as `(name, share)`, largest first."""
        values, index = self.shares[feature].topk(min(k, self.shares.shape[1]))
        return [(self.term_names[i], v) for i, v in zip(index.tolist(), values.tolist())]

    def label(self, feature: int, threshold: float = 0.005, max_terms: int = 7) -> str:
        """One feature's label: its terms with share ≥ `threshold`, largest first, at most
        `max_terms`, as `"51% cos(15x) + cos(15y)|34% cos(18x) + cos(18y)"`."""
        terms = [(n, s) for n, s in self.top_terms(feature, max_terms) if s >= threshold]
        if not terms:
            terms = self.top_terms(feature, 1)
        return "|".join(f"{round(100 * s)}% {n}" for n, s in terms)

    def labels(self, threshold: float = 0.005, max_terms: int = 7) -> list[str]:
        """Labels of all features (see `label`)."""
        return [self.label(i, threshold, max_terms) for i in range(self.n_features)]


def fourier_labels(
    values: Float[Tensor, "p_sq n_features"] | Float[Tensor, "p_sq n_pos n_features"],
    p: int,
    representation: Representation = "auto",
    position_reduction: Literal["sum"] = "sum",
) -> FourierLabels:
    """Fourier labels of features given their values on all p² inputs (a-major order), for an
    odd modulus `p`.

    `values` is `[p*p, n_features]`, or `[p*p, n_pos, n_features]` for a multi-position site
    (summed over positions first). Computed in float64 with one vectorised 2-D FFT.
    """
    if values.ndim == 3:
        if position_reduction != "sum":
            raise ValueError(f"unknown position_reduction {position_reduction!r}")
        values = values.sum(dim=1)
    if p % 2 == 0 or p < 3:
        raise ValueError(f"p must be odd and at least 3 (no self-conjugate frequency), got {p}")
    if values.ndim != 2 or values.shape[0] != p * p:
        raise ValueError(f"expected values of shape [p*p={p * p}, n_features], got {values.shape}")
    if representation not in ("auto", "sum", "product"):
        raise ValueError(f"representation must be auto, sum or product, got {representation!r}")
    n = values.shape[1]
    grid = values.detach().to(torch.float64).reshape(p, p, n)
    spectrum = torch.fft.fft2(grid, dim=(0, 1)).abs().square()  # [p, p, n]
    total = spectrum.sum(dim=(0, 1))
    frac = spectrum / torch.where(total > 0, total, torch.ones_like(total))

    h = p // 2
    pos = torch.arange(1, h + 1)
    neg = p - pos  # the conjugate (negative) frequencies
    axis = torch.cat([frac[:1, 0], frac[pos, 0] + frac[neg, 0] + frac[0, pos] + frac[0, neg]])
    rows_pos, rows_neg = frac[pos], frac[neg]
    # block (w1, w2): sum waves at (±w1, ±w2), difference waves at (±w1, ∓w2)
    plus = (rows_pos[:, pos] + rows_neg[:, neg]).reshape(h * h, n)
    minus = (rows_pos[:, neg] + rows_neg[:, pos]).reshape(h * h, n)
    root_plus, root_minus = plus.sqrt(), minus.sqrt()
    cos_cos = (root_plus + root_minus).square() / 2
    sin_sin = (root_plus - root_minus).square() / 2

    if representation == "auto":
        use_sum = plus.sum(dim=0) > cos_cos.sum(dim=0)
    else:
        use_sum = torch.full((n,), representation == "sum")
    zero = torch.zeros_like(plus)
    blocks = [
        torch.where(use_sum, plus, zero),
        torch.where(use_sum, minus, zero),
        torch.where(use_sum, zero, cos_cos),
        torch.where(use_sum, zero, sin_sin),
    ]
    shares = torch.cat([axis, *blocks], dim=0).T.contiguous()
    terms = FourierTerms.for_modulus(p)
    assert shares.shape[1] == len(terms)
    return FourierLabels(
        p=p,
        shares=shares,
        term_names=terms.names,
        term_kind=terms.kind,
        term_w1=terms.w1,
        term_w2=terms.w2,
        representation=tuple("sum" if s else "product" for s in use_sum.tolist()),
        power=total / p**4,  # Parseval: the mean square over the grid
    )


def parse_label(label: str) -> list[tuple[str, float]]:
    """Split a label string `"51% name|34% name"` into `[(name, 0.51), (name, 0.34)]`."""
    out = []
    for part in label.split("|"):
        pct, _, name = part.strip().partition("% ")
        out.append((name, float(pct) / 100))
    return out


__all__ = [
    "FourierLabels",
    "FourierTerms",
    "KIND_NAMES",
    "fourier_labels",
    "parse_label",
]
