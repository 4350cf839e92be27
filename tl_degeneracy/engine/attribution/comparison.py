"""Attribution patching in a basis, checked against activation patching and against
TransformerLens (docs/attribution.md).

At a site with clean activation `a`, corrupted activation `a'` and the metric's gradient `g`
on the corrupted run, feature `i` of a basis (`f̂ = (f − μ) C`, `f ≈ μ + f̂ C⁺`) scores

    s_i = Σ_positions ((a − a') C)_i · (g C⁺ᵀ)_i,

the first-order estimate of what patching that one feature from corrupted to clean does to the
metric. `Σ_i s_i = (a − a') C C⁺ gᵀ` is the site-level attribution `(a − a')·g` when `C C⁺ = I`
(an untruncated basis); otherwise the difference is the *truncation gap*. The ground truth is
activation patching: the corrupted run with feature `i` set to its clean value.

Batch convention: a metric gives one value per sequence and every number here is a change of
its **batch mean** (TransformerLens's `attribution_patch` averages per-pair scores the same
way), so a score is the mean over pairs of the per-pair score.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import Result, build_metadata, check_saved
from tl_degeneracy.engine.attribution.gradients import (
    AttributionMetric,
    batch_metric,
    site_gradients,
    tl_site_attribution,
)
from tl_degeneracy.engine.attribution.patching import (
    corrupted_baseline,
    feature_patching,
    site_patching,
)
from tl_degeneracy.engine.attribution.site_scores import (
    GAP_WARNING,
    AttributionGapWarning,
    SiteAttribution,
    gap_message,
)
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.compat import model_cfg
from tl_degeneracy.engine.model_match import check_fits, warn_if_fitted_elsewhere
from tl_degeneracy.engine.sites import Site, SiteLike, site_key, site_parts
from tl_degeneracy.engine.tokens import validate_pair


def _bases(result: BasisResult | Mapping[str, SiteBasis]) -> Mapping[str, SiteBasis]:
    return result.bases if isinstance(result, BasisResult) else result


def _first_part_width(model: nn.Module, site: Any, total: int) -> int:
    """Width of the part TransformerLens measures: all of a plain site, a composite's
    component (all but the stream's d_model)."""
    if len(site_parts(model, site)) == 1:
        return total
    return total - int(model_cfg(model).d_model)


_SCORES = ("attribution", "patching", "importance")
_COMPARISON_KEYS = {
    "comparison": {
        "clean_metric": float,
        "corrupted_metric": float,
        "sites": {
            "*": {
                "site": str,
                "kind": str,
                "d": int,
                "site_attribution": float,
                "tl_site_attribution": (float, None),
                "site_patching": float,
                "seconds?": float,
                "tl_comparable?": (float, None),
            }
        },
    }
}
"""The metadata an `AttributionComparison` is rebuilt from (`artifacts.check_saved`)."""


@dataclass
class AttributionComparison(Result):
    """Attribution patching in a basis against true patching and Λ, at one or more sites."""

    sites: dict[str, SiteAttribution]
    clean_metric: float
    corrupted_metric: float
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "attribution_comparison"

    def __getitem__(self, site: SiteLike) -> SiteAttribution:
        """The comparison at a site given as a `Site`, its name or a short form such as
        `("resid_mid", 1)`; `KeyError` naming the compared sites for another."""
        return self.sites[site_key(site, self.sites, "comparison")]

    def table(self, site: SiteLike | None = None, top: int | None = None) -> list[dict[str, Any]]:
        """Per-feature rows (site, kind, feature, attribution, patching, importance) of every
        site, or of `site` (looked up as `self[site]`); with `top`, only the `top` features of
        largest |patching| per site."""
        chosen = self.sites if site is None else {"": self[site]}
        out = []
        for sa in chosen.values():
            rows = sa.rows()
            if top is not None:
                rows = sorted(rows, key=lambda r: -abs(r["patching"]))[:top]
            out += rows
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per site: site-level sums, the gap, rank correlations, time."""
        return [sa.summary() for sa in self.sites.values()]

    def correlations(self, top: int | None = None) -> dict[str, dict[str, float]]:
        """`SiteAttribution.correlations` of every site."""
        return {name: sa.correlations(top) for name, sa in self.sites.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "metadata": self.metadata,
            "sites": {name: sa.to_json() for name, sa in self.sites.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AttributionComparison:
        """Inverse of `to_json`."""
        sites = {name: SiteAttribution.from_json(v) for name, v in d["sites"].items()}
        return cls(sites, d["clean_metric"], d["corrupted_metric"], d.get("metadata", {}))

    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, sa in self.sites.items():
            for f in ("attribution", "patching", "importance"):
                out[f"{name}/{f}"] = getattr(sa, f)
        return out

    def _metadata(self) -> dict[str, Any]:
        data = self.to_json()
        data.pop("metadata")  # it is the file's own metadata, written once
        for entry in data["sites"].values():
            for f in ("attribution", "patching", "importance"):
                entry.pop(f)
        return {**self.metadata, "comparison": data}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """What `from_json` reads, and per site its three score vectors of one length."""

        def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
            names = meta["comparison"]["sites"]
            return {f"{n}/{f}": (n,) for n in names for f in _SCORES}

        check_saved(folder, cls.ARTIFACT, meta, tensors, _COMPARISON_KEYS, shapes)

    @classmethod
    def _from_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any]
    ) -> AttributionComparison:
        data = dict(meta["comparison"])
        for name, entry in data["sites"].items():
            for f in ("attribution", "patching", "importance"):
                entry[f] = tensors[f"{name}/{f}"].tolist()
        # the file's metadata (files of earlier versions also hold a copy inside "comparison")
        data["metadata"] = {k: v for k, v in meta.items() if k != "comparison"}
        return cls.from_json(data)

    @classmethod
    def load_json(cls, path: str | Path) -> AttributionComparison:
        return cls.from_json(json.loads(Path(path).read_text()))

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        return path

    def __repr__(self) -> str:
        parts = [
            f"{n}: rho={sa.correlations()['attribution~patching']:.3f}"
            for n, sa in self.sites.items()
        ]
        return f"AttributionComparison({', '.join(parts)})"

    def _html_title(self) -> str:
        return "Attribution patching in a basis"

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import Fragment, PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_scatter
        from tl_degeneracy.viz.report_summary import metric_intro

        intro = (
            f"{metric_intro(self.metadata.get('metric'))}: clean {self.clean_metric:.6g}, "
            f"corrupted {self.corrupted_metric:.6g}, {self.metadata.get('n_pairs', '?')} pairs. "
            "Attribution s_i = ((a − a')C)_i (g C⁺ᵀ)_i; patching = metric change when feature i "
            "alone is set to its clean value (batch means)."
        )
        summary: list[Fragment | str] = [  # 14 columns: scroll sideways, not off the page
            '<div class="tld-scroll">',
            table(self.summary()),
            "</div>",
        ]
        sections = [PageSection("Summary", summary, intro)]
        for name, sa in self.sites.items():
            labels = list(range(sa.k))
            a, p, lam = (t.numpy() for t in (sa.attribution, sa.patching, sa.importance))
            a_abs, p_abs = np.abs(a), np.abs(p)
            log_a = bool((lam > 0).all() and (a_abs > 0).all())
            log_p = bool((lam > 0).all() and (p_abs > 0).all())
            plots = [
                plot_scatter(
                    a, p, labels, "attribution", "patching effect", diagonal=True, max_labels=12
                ),
                plot_scatter(
                    lam, a_abs, labels, "importance", "|attribution|", log=log_a, max_labels=12
                ),
                plot_scatter(
                    lam, p_abs, labels, "importance", "|patching effect|", log=log_p, max_labels=12
                ),
            ]
            figs = [figure_to_html(f, alt=f"{name} scatter") for f in plots]
            content: list[Fragment | str] = [
                '<div style="display:flex;flex-wrap:wrap;gap:1em">',
                *figs,
                "</div>",
                table(sa.rows()[:50]),
            ]
            sections.append(
                PageSection(
                    f"{sa.kind.upper()} at {name}",
                    content,
                    "Scatter plots: attribution vs patching (dashed: y = x), |attribution| and "
                    "|patching| vs importance; table: the first 50 features in basis order.",
                )
            )
        return sections


def format_correlation_table(
    comparisons: Mapping[str, AttributionComparison], top: int | None = None
) -> str:
    """A Markdown table of the rank correlations of several comparisons (keyed by basis kind);
    with `top`, over each site's `top` features of largest |patching| (see
    `SiteAttribution.correlations`)."""
    head = (
        "| basis | site | k | ρ(attribution, patching) | ρ(\\|attribution\\|, Λ) | "
        "ρ(\\|patching\\|, Λ) | site attribution | Σ s_i | relative gap | site patching |"
    )
    lines = [head, "|" + "---|" * 10]
    for kind, comparison in comparisons.items():
        for name, sa in comparison.sites.items():
            rho = sa.correlations(top)
            lines.append(
                f"| {kind.upper()} | `{name}` | {sa.k} | {rho['attribution~patching']:.3f} | "
                f"{rho['|attribution|~importance']:.3f} | {rho['|patching|~importance']:.3f} | "
                f"{sa.site_attribution:.4g} | {sa.feature_sum:.4g} | {sa.relative_gap:.2e} | "
                f"{sa.site_patching:.4g} |"
            )
    return "\n".join(lines)


def compare_attribution(
    model: nn.Module,
    basis_result: BasisResult | Mapping[str, SiteBasis],
    sites: Sequence[SiteLike] | None,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: AttributionMetric,
    max_rows: int = 4096,
    tl_check: bool = True,
    metric_name: str | None = None,
) -> AttributionComparison:
    """Per-feature attribution patching at each site (default: every fitted site of the
    result, neither the logits nor a raw final site), true patching of each feature,
    importances, and site-level sums (ours, TransformerLens's when `tl_check`, and the
    truncation gap).

    One forward + backward on the corrupted tokens serves all sites' gradients; patching runs
    `k` groups per site, `max_rows` sequences per forward.
    """
    clean_tokens, corrupted_tokens = validate_pair(model, clean_tokens, corrupted_tokens)
    bases = _bases(basis_result)
    if isinstance(sites, (str, Site)) or (
        isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[1], int)
    ):
        raise TypeError(
            f"sites must be a list of sites (or None for all), not one site: pass sites=[{sites!r}]"
        )
    if sites is not None and not list(sites):
        raise ValueError("sites is empty: pass a list of sites, or None for every fitted site")
    if sites is None:
        chosen = [b for b in bases.values() if not b.site.is_logits and b.kind != "raw"]
    else:
        chosen = [bases[site_key(s, bases)] for s in sites]
    if any(b.site.is_logits for b in chosen):
        raise ValueError("attribution at the logits is not a patching experiment; pick a hook site")
    check_fits(model, chosen)
    warn_if_fitted_elsewhere(model, basis_result)
    site_list = [b.site for b in chosen]
    with torch.no_grad():
        clean_value = float(batch_metric(metric, model(clean_tokens), clean_tokens))
    clean_acts = capture_sites(model, clean_tokens, site_list)
    corrupt_acts, grads, corrupted_value = site_gradients(
        model, site_list, corrupted_tokens, metric
    )
    if abs(clean_value - corrupted_value) <= 1e-12 * max(1.0, abs(clean_value)):
        warnings.warn(
            f"the metric is {clean_value:.6g} on both the clean and the corrupted tokens: there "
            "is no difference to attribute, so every patching effect is about 0 and the "
            "correlations are undefined (nan); check that the metric reads what the two prompts "
            "change, e.g. that its two answer tokens differ",
            UserWarning,
            stacklevel=2,
        )
    baseline = corrupted_baseline(model, corrupted_tokens, metric)  # one forward for all sites
    results: dict[str, SiteAttribution] = {}
    for basis, clean in zip(chosen, clean_acts):
        start = time.perf_counter()
        name = basis.site.name
        basis = basis.to(clean.device)
        corrupt = corrupt_acts[name]
        delta = clean.to(torch.float64) - corrupt
        g = grads[name]
        dfeat = delta @ basis.C
        gfeat = g @ basis.C_pinv.T
        attribution = torch.einsum("bpk,bpk->k", dfeat, gfeat).cpu()
        site_value = float((delta * g).sum())
        masks = torch.eye(basis.k, dtype=torch.float64, device=clean.device)
        patching = feature_patching(
            model, basis, corrupted_tokens, metric, corrupt, dfeat, masks, max_rows, baseline
        )
        site_patch = site_patching(
            model, basis.site, corrupted_tokens, metric, clean, corrupt, baseline
        )
        tl_value, tl_ours = None, None
        if tl_check:
            tl_value = tl_site_attribution(
                model, basis.site, clean_tokens, corrupted_tokens, metric
            )
            width = _first_part_width(model, basis.site, delta.shape[-1])
            tl_ours = float((delta[..., :width] * g[..., :width]).sum())
        results[name] = SiteAttribution(
            name,
            basis.kind,
            attribution,
            patching,
            basis.importance.to(torch.float64).cpu().clone(),
            site_value,
            tl_value,
            site_patch,
            basis.d,
            time.perf_counter() - start,
            tl_ours,
        )
        if results[name].relative_gap > GAP_WARNING:
            warnings.warn(
                gap_message(results[name], basis.gram_eigenvalues),
                AttributionGapWarning,
                stacklevel=2,
            )
    metadata = build_metadata(
        model,
        site_list,
        metric=metric_name or getattr(metric, "__name__", "metric"),
        n_pairs=int(clean_tokens.shape[0]),
        batch_reduction="mean over pairs",
        basis_kind=basis_result.kind if isinstance(basis_result, BasisResult) else "mixed",
    )
    return AttributionComparison(results, clean_value, corrupted_value, metadata)
