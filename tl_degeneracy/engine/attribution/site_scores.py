"""Per-feature attribution, patching and importance at one site (`SiteAttribution`), and the
rank correlation that compares them (`spearman`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from tl_degeneracy.engine.brief_repr import BriefRepr


def spearman(x: Tensor | np.ndarray | Sequence[float], y: Tensor | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant
    or has fewer than two values."""
    xv = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    yv = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
    if xv.shape != yv.shape:
        raise ValueError(f"x and y differ in shape: {xv.shape} vs {yv.shape}")
    if xv.size < 2 or np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return math.nan
    rx, ry = stats.rankdata(xv), stats.rankdata(yv)
    return float(np.corrcoef(rx, ry)[0, 1])


GAP_WARNING = 0.1
"""Relative gap `|(a − a')·g − Σ s_i| / |(a − a')·g|` above which `compare_attribution` warns."""


class AttributionGapWarning(UserWarning):
    """The features' attributions miss a large share of the site's own attribution."""


def gap_message(sa: SiteAttribution, gram_eigenvalues: Tensor) -> str:
    """Why the sum rule fails at this site, and what to do: too few features kept, or prompts
    whose difference leaves the span the fit data covered."""
    top = float(gram_eigenvalues.max()) if gram_eigenvalues.numel() else 0.0
    rank = int((gram_eigenvalues > 1e-12 * top).sum()) if top > 0 else 0
    if sa.k < rank:
        cause = (
            f"the basis keeps {sa.k} of the {rank} directions its fit data spans, and the "
            "dropped ones carry the rest: keep more features for the sum rule to hold"
        )
    else:
        cause = (
            f"its fit data spans only {rank} of the site's {sa.d} directions and these "
            "prompts' difference lies partly outside them: fit the basis on data like these "
            "prompts (or on more of it)"
        )
    return (
        f"{sa.site}: the {sa.k} features' attributions add up to {sa.feature_sum:.4g} but the "
        f"site's is {sa.site_attribution:.4g} ({sa.relative_gap:.0%} of it missing): {cause} "
        "(docs/attribution.md, 'Sum rule')"
    )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@dataclass(repr=False)
class SiteAttribution(BriefRepr):
    """Per-feature attribution, patching effect and importance at one site, and the site-level
    sums (all changes of the batch-mean metric)."""

    site: str
    kind: str
    attribution: Float[Tensor, " k"]
    """s_i = Σ_pos ((a − a') C)_i (g C⁺ᵀ)_i."""
    patching: Float[Tensor, " k"]
    """Metric change when feature i alone is patched to its clean value."""
    importance: Float[Tensor, " k"]
    """Λ for LIB/IB, the variance for PCA and neuron bases."""
    site_attribution: float
    """(a − a')·g at the site, from our gradient."""
    tl_site_attribution: float | None
    """The same from TransformerLens's gradient cache (None when not computed)."""
    site_patching: float
    """Metric change when the whole site is patched to clean."""
    d: int
    seconds: float = 0.0
    tl_comparable: float | None = None
    """Our site-level value over the part TransformerLens measures (`gradients.tl_hook`: the
    whole site, or a composite site's component); None when not computed."""

    @property
    def k(self) -> int:
        return int(self.attribution.numel())

    @property
    def feature_sum(self) -> float:
        """Σ_i s_i."""
        return float(self.attribution.sum())

    @property
    def gap(self) -> float:
        """(a − a')·g − Σ_i s_i: zero for an untruncated basis, the truncation's share else."""
        return self.site_attribution - self.feature_sum

    @property
    def relative_gap(self) -> float:
        scale = abs(self.site_attribution)
        if math.isnan(scale) or math.isnan(self.gap):
            return math.nan
        return abs(self.gap) / scale if scale > 0 else (0.0 if self.gap == 0 else math.inf)

    @property
    def tl_relative_difference(self) -> float | None:
        """|ours − TransformerLens's| / |TransformerLens's| over the same hook."""
        if self.tl_site_attribution is None:
            return None
        ours = self.site_attribution if self.tl_comparable is None else self.tl_comparable
        diff = abs(ours - self.tl_site_attribution)
        scale = abs(self.tl_site_attribution)
        return diff / scale if scale > 0 else diff

    def correlations(self, top: int | None = None) -> dict[str, float]:
        """Spearman ρ: signed attribution vs signed patching; and, since Λ is a magnitude,
        |attribution| and |patching| vs Λ. With `top`, over the `top` features of largest
        |patching| only (over all features, near-zero effects can dominate the ranks)."""
        a, p, lam = self.attribution, self.patching, self.importance
        if top is not None:
            keep = torch.argsort(p.abs(), descending=True)[:top]
            a, p, lam = a[keep], p[keep], lam[keep]
        return {
            "attribution~patching": spearman(a, p),
            "|attribution|~|patching|": spearman(a.abs(), p.abs()),
            "|attribution|~importance": spearman(a.abs(), lam),
            "|patching|~importance": spearman(p.abs(), lam),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per feature, in basis order (most important first)."""
        return [
            {
                "site": self.site,
                "kind": self.kind,
                "feature": i,
                "attribution": float(self.attribution[i]),
                "patching": float(self.patching[i]),
                "importance": float(self.importance[i]),
            }
            for i in range(self.k)
        ]

    def summary(self) -> dict[str, Any]:
        rho = self.correlations()
        return {
            "site": self.site,
            "kind": self.kind,
            "d": self.d,
            "k": self.k,
            "site attribution (ours)": self.site_attribution,
            # Like for like: at a composite site TransformerLens measures the component only.
            "ours over TransformerLens's hook": self.tl_comparable,
            "site attribution (TransformerLens)": self.tl_site_attribution,
            "relative difference to TransformerLens": self.tl_relative_difference,
            "sum of feature scores": self.feature_sum,
            "gap": self.gap,
            "relative gap": self.relative_gap,
            "site patching": self.site_patching,
            "rho attribution~patching": rho["attribution~patching"],
            "rho |attribution|~importance": rho["|attribution|~importance"],
            "rho |patching|~importance": rho["|patching|~importance"],
            "seconds": self.seconds,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "kind": self.kind,
            "d": self.d,
            "k": self.k,
            "attribution": self.attribution.tolist(),
            "patching": self.patching.tolist(),
            "importance": self.importance.tolist(),
            "site_attribution": self.site_attribution,
            "tl_site_attribution": self.tl_site_attribution,
            "site_patching": self.site_patching,
            "tl_comparable": self.tl_comparable,
            "feature_sum": self.feature_sum,
            "gap": self.gap,
            "relative_gap": _finite(self.relative_gap),
            "correlations": {k: _finite(v) for k, v in self.correlations().items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteAttribution:
        """Inverse of `to_json` (derived fields are recomputed)."""

        def vec(key: str) -> Tensor:
            return torch.tensor(d[key], dtype=torch.float64)

        return cls(
            d["site"],
            d["kind"],
            vec("attribution"),
            vec("patching"),
            vec("importance"),
            d["site_attribution"],
            d["tl_site_attribution"],
            d["site_patching"],
            d["d"],
            d.get("seconds", 0.0),
            d.get("tl_comparable"),
        )
