"""Static plots for reports (matplotlib, Agg; no display needed).

Each function returns a `Figure` built without pyplot (no global state, nothing left open) and
saves a PNG when given `path`. The figures are `NotebookFigure`s, which Jupyter shows as images
without pyplot or `%matplotlib inline`. `figure_to_html` embeds a figure in an offline page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tl_degeneracy.viz.html import Fragment

__all__ = [
    "NotebookFigure",
    "figure_to_html",
    "figure_to_png",
    "plot_ablation_curves",
    "plot_edges_required",
    "plot_llc_traces",
    "plot_scatter",
    "plot_spectra",
    "save_figure",
]

_METHOD_COLOURS = {"LIB": "#d95f02", "PCA": "#1b9e77", "IB": "#7570b3", "SAE": "#e7298a"}
_CYCLE = ["#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4", "#b2df8a"]


def _colour(method: str, i: int) -> str:
    return _METHOD_COLOURS.get(method, _CYCLE[i % len(_CYCLE)])


class NotebookFigure(Figure):
    """A matplotlib `Figure` that IPython displays as a PNG image (`_repr_png_`).

    A Figure built without pyplot has no image representation of its own: IPython's figure
    formatter is registered only when pyplot is imported in the inline backend, so a notebook
    cell would show `<Figure size 600x400 with 1 Axes>`. This one renders itself, whatever
    the backend and whether or not the user imported pyplot, and changes nothing else: no
    backend is switched, no formatter registered, and outside IPython nothing calls it.
    Where IPython already has a formatter for Figures (`%matplotlib inline`), that one wins.
    """

    def _repr_png_(self) -> bytes | None:
        return figure_to_png(self) if self.axes else None


def _new_figure(figsize: tuple[float, float]) -> NotebookFigure:
    fig = NotebookFigure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _maybe_save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_spectra(
    spectra: Mapping[str, npt.ArrayLike],
    title: str = "",
    ylabel: str = "Λ / variance",
    normalise: bool = False,
    path: str | Path | None = None,
) -> Figure:
    """Eigenvalue spectra (LIB's Λ, PCA's variance, ...) sorted descending, log y.

    Non-positive values cannot show on a log axis and are left out; `normalise` divides each
    spectrum by its sum so bases of different scale compare.
    """
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(spectra.items()):
        v = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
        if normalise and v[v > 0].sum() > 0:
            v = v / v[v > 0].sum()
        idx = np.arange(1, len(v) + 1)
        ok = np.isfinite(v) & (v > 0)
        ax.plot(
            idx[ok],
            v[ok],
            marker="." if len(v) < 80 else None,
            lw=1.5,
            color=_colour(name, i),
            label=f"{name} ({ok.sum()})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("index (sorted)")
    ax.set_ylabel(ylabel + (" (fraction)" if normalise else ""))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend()
    return _maybe_save(fig, path)


def plot_ablation_curves(
    curves: Mapping[str, Mapping[str, Mapping[int, float]]],
    metric: str = "loss",
    baseline: float | Mapping[str, float] | None = None,
    log_x: bool = False,
    path: str | Path | None = None,
) -> Figure:
    """Metric vs number of kept features, one panel per site, one line per method.

    `curves` is {site: {method: {n_kept: metric}}}; `baseline` (the clean metric, overall or per
    site) is drawn as a dashed line.
    """
    sites = list(curves)
    n = max(len(sites), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = _new_figure((4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, site in zip(axes.flat, sites):
        for i, (method, points) in enumerate(curves[site].items()):
            ks = sorted(points)
            ax.plot(
                ks,
                [points[k] for k in ks],
                marker="o",
                ms=3,
                lw=1.5,
                color=_colour(method, i),
                label=method,
            )
        base = baseline.get(site) if isinstance(baseline, Mapping) else baseline
        if base is not None:
            ax.axhline(base, ls="--", color="#888", lw=1, label="clean")
        if log_x:
            ax.set_xscale("log")
        ax.set_title(site, fontsize=10)
        ax.set_xlabel("features kept")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(sites) :]:
        ax.set_visible(False)
    return _maybe_save(fig, path)


def plot_edges_required(
    data: Mapping[str, Mapping[str, float]],
    ylabel: str = "edges required",
    title: str = "",
    log_y: bool = False,
    path: str | Path | None = None,
) -> Figure:
    """For each section (e.g. a pair of sites), the edges each method needs: grouped bars on a
    linear axis from 0 (a bar's length is its count), or with `log_y` points on a log axis (a
    bar on a log axis has no meaningful length), each method's points joined in section
    order."""
    sections = list(data)
    methods: list[str] = []
    for vals in data.values():
        methods += [m for m in vals if m not in methods]
    fig = _new_figure((max(4.5, 1.1 * len(sections) * max(len(methods), 1) + 1.5), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(sections))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        heights = [float(data[s].get(method, np.nan)) for s in sections]
        if log_y:
            shown = [h if h > 0 else np.nan for h in heights]  # a log axis has no 0
            ax.plot(
                x, shown, marker="o", ms=5, lw=1, alpha=0.9, label=method, color=_colour(method, i)
            )
            continue
        bars = ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            heights,
            width,
            label=method,
            color=_colour(method, i),
        )
        ax.bar_label(bars, fmt="%g", fontsize=8, padding=2)
    ax.set_xticks(
        x,
        sections,
        rotation=20 if len(sections) > 4 else 0,
        ha="right" if len(sections) > 4 else "center",
    )
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="both" if log_y else "major", alpha=0.25)
    ax.legend()
    return _maybe_save(fig, path)


def plot_scatter(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    labels: Sequence[object] | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    log: bool = False,
    diagonal: bool = False,
    max_labels: int = 30,
    path: str | Path | None = None,
) -> Figure:
    """A labelled scatter plot; at most `max_labels` points (farthest from the median) are
    annotated; `diagonal` draws y = x."""
    xv, yv = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xv.shape != yv.shape:
        raise ValueError(f"x and y differ in shape: {xv.shape} vs {yv.shape}")
    fig = _new_figure((5.0, 4.2))
    ax = fig.add_subplot()
    ax.scatter(xv, yv, s=18, color="#1f78b4", alpha=0.8, edgecolor="none")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    if diagonal and xv.size:
        lo = np.nanmin([np.nanmin(xv), np.nanmin(yv)])
        hi = np.nanmax([np.nanmax(xv), np.nanmax(yv)])
        ax.plot([lo, hi], [lo, hi], ls="--", color="#888", lw=1)
    if labels is not None:
        if len(labels) != xv.size:
            raise ValueError(f"{len(labels)} labels for {xv.size} points")
        dist = np.abs(xv - np.nanmedian(xv)) + np.abs(yv - np.nanmedian(yv))
        for i in np.argsort(-np.nan_to_num(dist, nan=-1.0))[:max_labels]:
            ax.annotate(
                str(labels[i]),
                (xv[i], yv[i]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.25)
    return _maybe_save(fig, path)


def plot_llc_traces(
    panels: Mapping[str, npt.ArrayLike],
    burnin: int | Mapping[str, int] = 0,
    estimates: Mapping[str, float] | None = None,
    title: str = "",
    path: str | Path | None = None,
) -> Figure:
    """SGLD convergence: one panel per entry of `panels` (a [chain, step] array of the
    per-step estimate nβ (L_t − L*)), every chain's trace, the burn-in shaded and the estimate
    λ̂ (`estimates`) dashed. Chains that agree and flatten after the burn-in have converged."""
    names = list(panels)
    if not names:
        raise ValueError("no traces to plot")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _new_figure((4.2 * cols, 2.8 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        traces = np.atleast_2d(np.asarray(panels[name], dtype=np.float64))
        steps = np.arange(traces.shape[1])
        for c, trace in enumerate(traces):
            ax.plot(steps, trace, lw=0.6, color=_CYCLE[c % len(_CYCLE)], alpha=0.85)
        b = burnin.get(name, 0) if isinstance(burnin, Mapping) else burnin
        if b > 0:
            ax.axvspan(0, b, color="#bbbbbb", alpha=0.3, lw=0, label="burn-in")
        if estimates is not None and name in estimates and np.isfinite(estimates[name]):
            ax.axhline(estimates[name], ls="--", color="black", lw=1, label="λ̂")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("nβ (L_t − L*)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
    if title:
        fig.suptitle(title, fontsize=10)
    return _maybe_save(fig, path)


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_to_html(fig: Figure, alt: str = "", dpi: int = 110) -> Fragment:
    """The figure as an inline base64 PNG `<img>`, for offline pages."""
    data = base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")
    return Fragment(
        f'<figure class="tld-figure"><img alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{data}"></figure>'
    )
