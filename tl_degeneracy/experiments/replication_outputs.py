"""What both replications (modular addition, the digits MLP) compute and write the same way:
the edges-required rows of every section and basis, and the PNG plots of a replication."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from tl_degeneracy.engine.ablation import Metric
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.edge_ablation import edges_required
from tl_degeneracy.engine.edges import InteractionGraph

Kind = TypeVar("Kind", bound=str)
"""A basis kind ("lib", "pca", ...)."""


def section_edges_required(
    model: Any,
    inputs: torch.Tensor,
    graphs: Mapping[Kind, InteractionGraph],
    bases: Mapping[Kind, BasisResult],
    metric: Metric,
    tolerance: float,
    baseline: float,
    batch_size: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Edges required (smallest edges ablated while the metric stays within `tolerance`) in
    every section of every basis: the replications' rows, `{section: {basis: row}}`."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for name in next(iter(graphs.values())).sections:
        rows[name] = {}
        for kind, graph in graphs.items():
            sec = graph[name]
            abl = edges_required(
                model,
                inputs,
                sec,
                bases[kind][sec.section.inp],
                bases[kind][sec.section.out],
                metric,
                tolerance,
                baseline=baseline,
                batch_size=batch_size,
            )
            rows[name][kind] = {
                "edges_required": abl.edges_required,
                "total_edges": sec.total_edges,
                "edges_for_99pct_weight": sec.edges_for_fraction(0.99),
                "method": sec.method,
                "accuracy_by_n": {str(k): v for k, v in sorted(abl.scores.items())},
            }
            log(f"  {name} {kind}: edges required {abl.edges_required} of {sec.total_edges}")
    return rows


def write_plots(
    result: dict,
    bases: dict,
    graphs: dict,
    folder: Path,
    metric: str = "loss",
    baseline: float | None = None,
) -> None:
    """Accuracy vs kept features, edges required, spectra, and the LIB graph as PNG
    (`metric` labels the node-ablation axis; `baseline` draws the unablated score)."""
    from tl_degeneracy.viz.plots import plot_ablation_curves, plot_edges_required, plot_spectra

    curves = {
        site: {
            kind.upper(): {int(k): v for k, v in entry[kind]["accuracy_by_k"].items()}
            for kind in ("lib", "pca")
        }
        for site, entry in result["sites"].items()
    }
    plot_ablation_curves(
        curves, metric=metric, baseline=baseline, path=folder / "node_ablation.png"
    )
    plot_edges_required(
        {
            name: {k.upper(): v["edges_required"] or 0 for k, v in sec.items()}
            for name, sec in result["sections"].items()
        },
        path=folder / "edges_required.png",
    )
    for site in result["sites"]:
        plot_spectra(
            {k.upper(): bases[k][site].importance.numpy() for k in bases},
            title=f"importance at {site}",
            path=folder / f"spectrum_{site.replace('[', '_').replace(']', '')}.png",
        )
    plot_graph(graphs["lib"], folder / "graph_lib.png")


def plot_graph(graph, path: Path, top_n: int = 12) -> None:
    """A layered drawing of the top features of each site and their strongest edges."""
    import matplotlib  # no backend switch: a Figure without pyplot saves through Agg
    from matplotlib.figure import Figure

    data = graph.to_graph_data(top_n=top_n)
    fig = Figure(figsize=(3 + 2.5 * len(data["layers"]), 6))
    ax = fig.add_subplot()
    pos = {}
    for x, layer in enumerate(data["layers"]):
        for y, feat in enumerate(layer["features"]):
            pos[feat["id"]] = (x, -y)
    weights = torch.tensor([e["weight"] for e in data["edges"]] or [1.0])
    top = float(weights.max())
    for e in data["edges"]:
        # an input from a feature below the top few is listed (it counts in the shares), but
        # has no node here
        if e["weight"] < 1e-3 * top or e["source"] not in pos or e["target"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:blue",
            alpha=0.6,
            linewidth=0.3 + 3 * (e["weight"] / top) ** 0.5,
        )
    palette = matplotlib.colormaps["tab10"]
    for layer in data["layers"]:
        for feat in layer["features"]:
            x, y = pos[feat["id"]]
            module = feat.get("module")  # absent when the graph has no modules
            colour = "lightgrey" if module is None else palette(module % 10)
            ax.scatter([x], [y], s=60, color=colour, zorder=3)
    ax.set_xticks(
        range(len(data["layers"])), [lay["site"] for lay in data["layers"]], rotation=15, fontsize=7
    )
    ax.set_yticks([])
    ax.set_title("LIB interaction graph (top features per site; colour = module, grey = none)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
