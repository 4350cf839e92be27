"""Summary numbers and the offline HTML report of a study (`experiments.study.Study`)."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import torch

from tl_degeneracy.viz import (
    HtmlPage,
    figure_to_html,
    plot_ablation_curves,
    plot_edges_required,
    plot_spectra,
    table,
    text,
)

TOLERANCES = (0.01, 0.05, 0.1)
"""Loss tolerances (nats) for the smallest number of kept features."""


def _short(section: str) -> str:
    """`blocks.3.hook_resid_pre->blocks.3.hook_resid_mid` -> `3 pre→mid`."""
    a, b = re.sub(r"\[[^\]]*\]", "", section).split("->")
    return f"{a.split('.')[1]} {a.rsplit('_', 1)[-1]}→{b.rsplit('_', 1)[-1]}"


def lm_summary(fit: Any) -> dict[str, Any]:
    """JSON-ready numbers: settings, timings, kept features, edge sparsity, ablation."""
    cfg = asdict(fit.config)
    sites: dict[str, dict[str, Any]] = {}
    for kind, result in fit.bases.items():
        for name, b in result.bases.items():
            entry = sites.setdefault(name, {})
            entry[kind] = {"kept": b.k, "top_importance": [float(x) for x in b.importance[:3]]}
            if kind == "lib" and name in fit.jacobian_errors:
                entry[kind]["split_half_error"] = fit.jacobian_errors[name]
    edges: dict[str, dict[str, Any]] = {}
    for kind, sections in fit.edges.items():
        for name, se in sections.items():
            edges.setdefault(name, {})[kind] = {
                "edges_for_99pct": se.edges_for_fraction(0.99),
                "edges_for_90pct": se.edges_for_fraction(0.90),
                "total": se.total_edges,
                "tokens": se.count,
            }
    ablation: dict[str, dict[str, Any]] = {}
    for site, by_kind in fit.curves.items():
        for kind, curve in by_kind.items():
            ablation.setdefault(site, {})[kind] = {
                "baseline_loss": curve.baseline,
                "loss": {str(k): v for k, v in sorted(curve.scores.items())},
                "min_k": {str(t): curve.min_k(t) for t in TOLERANCES},
            }
    return {
        "config": cfg,
        "n_tokens": fit.n_tokens,
        "timings_s": fit.timings,
        "sites": sites,
        "edges": edges,
        "ablation": ablation,
    }


def lm_report(fit: Any, summary: dict[str, Any]) -> HtmlPage:
    """A self-contained page: settings and timings, spectra, edge sparsity, ablation curves."""
    cfg = fit.config
    model = fit.metadata.get("model", {}).get("model_name", "a model")
    page = HtmlPage(
        f"LIB and PCA on {model}",
        f"{fit.n_tokens} training tokens, M' {cfg.jacobian.method} "
        f"(R = {cfg.jacobian.n_sources} sources), edges on {cfg.edge_tokens} tokens into the "
        f"top {cfg.edge_outputs} output features.",
    )
    page.add(
        "Settings and timings",
        table([{"setting": k, "value": str(v)} for k, v in summary["config"].items()]),
        table([{"phase": k, "seconds": round(v, 1)} for k, v in fit.timings.items()]),
    )
    rows = []
    for name, entry in summary["sites"].items():
        row: dict[str, Any] = {"site": name}
        for kind, v in entry.items():
            row[f"{kind} kept"] = v["kept"]
            row[f"{kind} top"] = v["top_importance"]
            if "split_half_error" in v:
                err = v["split_half_error"]  # None: one batch, no estimate
                row["M' split-half error"] = "n/a (one batch)" if err is None else round(err, 4)
        rows.append(row)
    page.add(
        "Bases",
        table(rows),
        description="Kept features and the largest importances "
        "(Λ for LIB, variance for PCA) per site.",
    )
    names = list(next(iter(fit.bases.values())).bases)
    show = [names[i] for i in sorted({1, len(names) // 2, len(names) - 2}) if 0 <= i < len(names)]
    figs = []
    for name in show:
        spectra = {k: r.bases[name].importance.numpy() for k, r in fit.bases.items()}
        figs.append(figure_to_html(plot_spectra(spectra, name, normalise=True), name))
    page.add("Spectra", *figs, description="Importance spectra, each normalised to sum 1.")
    if summary["edges"]:
        data = {
            _short(s): {k: v["edges_for_99pct"] for k, v in by_kind.items()}
            for s, by_kind in summary["edges"].items()
        }
        fig = plot_edges_required(
            dict(list(data.items())[::-1]),
            ylabel="edges for 99% of the weight",
            title="Edge sparsity per section (smaller is sparser)",
        )
        fig.set_size_inches(max(8.0, 0.35 * len(data)), 4.0)
        page.add(
            "Edges",
            figure_to_html(fig, "edges for 99% of edge weight"),
            table([{"section": k, **v} for k, v in data.items()]),
        )
    if fit.curves:
        curves = {
            site: {kind: dict(c.scores) for kind, c in by_kind.items()}
            for site, by_kind in fit.curves.items()
        }
        base = {site: next(iter(bk.values())).baseline for site, bk in fit.curves.items()}
        fig = plot_ablation_curves(curves, "held-out loss (nats)", base, log_x=False)
        rows = [
            {"site": s, "kind": k, **{f"min k (tol {t})": v["min_k"][str(t)] for t in TOLERANCES}}
            for s, bk in summary["ablation"].items()
            for k, v in bk.items()
        ]
        page.add(
            "Node ablation",
            figure_to_html(fig, "node ablation"),
            table(rows),
            text("Only the top k features (plus the mean) are kept at the site."),
        )
    return page


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """‖estimate − exact‖_F / ‖exact‖_F."""
    return float(torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact))
