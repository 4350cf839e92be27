"""The LIB paper's third setting, a ReLU MLP classifying images, on the 8×8 digits: LIB and PCA
at the input and every hidden layer, node ablation on held-out images, edges and edges
required per section, for each training seed and summarised over seeds (mean ± sd).

Per checkpoint: `OUT/<name>/replication.json`, `report.md`, the fitted bases and PNGs; over all
checkpoints: `OUT/summary.json`, `OUT/summary.md` and `OUT/summary.png`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from tl_degeneracy.engine.ablation import evaluate, node_ablation_curve
from tl_degeneracy.engine.edges import interaction_graph
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.experiments.replication_outputs import section_edges_required, write_plots
from tl_degeneracy.models.digits.checkpoints import SEEDS, checkpoint_dir, load_checkpoint
from tl_degeneracy.models.digits.model import DigitsMLP

NODE_TOLERANCE = 0.01
"""Features needed: the fewest kept features with held-out accuracy within 1 point."""
EDGE_TOLERANCE = 0.001
"""Edges required: the paper's tolerance (the reference's bisection protocol)."""
KINDS: tuple[Literal["lib"], Literal["pca"]] = ("lib", "pca")
BATCH = 2048


def mlp_sites(model: DigitsMLP) -> list[Site]:
    """`hook_in`, every `layers.{i}.hook_post`, then the logits: the MLP's cuts in order."""
    return [Site(name) for name in model.cut_names]


class _Laps:
    """Wall and CPU seconds of consecutive phases (CPU time shows the work on a busy host)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = round(t - self._t, 2), round(c - self._c, 2)
        self._t, self._c = t, c


def replicate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    node_tolerance: float = NODE_TOLERANCE,
    edge_tolerance: float = EDGE_TOLERANCE,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """LIB vs PCA on one digits checkpoint; writes its outputs under `out`."""
    start = time.perf_counter()
    laps = _Laps()
    model, data = load_checkpoint(checkpoint, dtype=torch.float64)
    sites = mlp_sites(model)
    train_x, test_x = data.train_inputs, data.test_inputs
    metric = data.accuracy_metric()

    stats = collect_statistics(model, sites, train_x, BATCH, progress=progress)
    bases = {
        kind: fit_basis(
            model,
            train_x,
            LIBConfig(tuple(sites), kind=kind, batch_size=BATCH, progress=progress),
            statistics=stats,
        )
        for kind in KINDS
    }
    # The logits stay in raw coordinates for PCA too (the reference does not rotate the final
    # layer), so the last section compares the two bases on equal terms.
    final = sites[-1].name
    bases["pca"].bases[final] = bases["lib"].bases[final]
    laps.lap("fit")

    baseline = evaluate(model, test_x, metric, BATCH)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "baseline_test_accuracy": baseline,
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "node_tolerance": node_tolerance,
        "edge_tolerance": edge_tolerance,
        "sites": {},
        "sections": {},
    }
    for site in sites[:-1]:
        entry: dict[str, Any] = {}
        for kind, basis in bases.items():
            b = basis[site.name]
            curve = node_ablation_curve(
                model, basis, site.name, test_x, metric, ks=range(b.k + 1), batch_size=BATCH
            )
            curve.baseline = baseline
            entry[kind] = {
                "retained": b.k,
                "width": int(b.C.shape[0]),
                "importance": [float(x) for x in b.importance[:40]],
                "min_k": {str(t): curve.min_k(t) for t in sorted({node_tolerance, 0.001})},
                "accuracy_by_k": {str(k): v for k, v in sorted(curve.scores.items())},
            }
        result["sites"][site.name] = entry
    laps.lap("node_ablation")

    graphs = {
        kind: interaction_graph(model, train_x, basis, batch_size=BATCH, progress=progress)
        for kind, basis in bases.items()
    }
    laps.lap("edges")
    result["sections"] = section_edges_required(
        model, test_x, graphs, bases, metric, edge_tolerance, baseline, BATCH, log
    )
    laps.lap("edge_ablation")

    result["timings_s"], result["cpu_timings_s"] = laps.wall, laps.cpu
    result["total_s"] = round(time.perf_counter() - start, 1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "replication.json").write_text(json.dumps(result, indent=1))
    for kind, basis in bases.items():
        basis.save(folder / f"{kind}_basis")
    write_plots(
        result,
        bases,
        graphs,
        folder,
        metric="held-out accuracy",
        baseline=result["baseline_test_accuracy"],
    )
    (folder / "report.md").write_text(report_markdown(result, Path(checkpoint).name))
    return result


def _replicate_one(args: tuple) -> dict[str, Any]:
    """Worker of `replicate_checkpoints`: one checkpoint on one thread."""
    checkpoint, out, node_tolerance, edge_tolerance = args
    torch.set_num_threads(1)
    return replicate_checkpoint(checkpoint, out, node_tolerance, edge_tolerance, log=lambda _: None)


def replicate_checkpoints(
    checkpoints: Sequence[str | Path] | None,
    out: str | Path,
    node_tolerance: float = NODE_TOLERANCE,
    edge_tolerance: float = EDGE_TOLERANCE,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`replicate_checkpoint` for each checkpoint (default: the package's seeds 0…4) into
    `out/<name>`, then the summary over them; `jobs > 1` runs that many one-thread processes."""
    paths = [Path(c) for c in checkpoints] if checkpoints else [checkpoint_dir(s) for s in SEEDS]
    tasks = [(p, Path(out) / p.name, node_tolerance, edge_tolerance) for p in paths]
    start = time.perf_counter()
    if jobs <= 1 or len(tasks) == 1:
        results = [replicate_checkpoint(*task, log=log) for task in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            results = list(pool.map(_replicate_one, tasks))
    runs = {p.name: r for p, r in zip(paths, results)}
    for name, r in runs.items():
        log(f"{name}: baseline {r['baseline_test_accuracy']:.4f}, {r['total_s']} s")
    summary = summarise(runs)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["jobs"] = jobs
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "summary.md").write_text(summary_markdown(summary))
    plot_summary(summary, folder / "summary.png")
    return summary


def _spread(values: list[float | int | None]) -> dict[str, Any]:
    """Mean and sample sd over the values that exist (None: the criterion was never met)."""
    present = [float(v) for v in values if v is not None]
    return {
        "values": values,
        "mean": statistics.fmean(present) if present else None,
        "sd": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
    }


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-checkpoint numbers gathered into rows with mean ± sd over checkpoints."""
    first = next(iter(runs.values()))
    tol = str(first["node_tolerance"])
    rows: dict[str, Any] = {
        "baseline_test_accuracy": _spread([r["baseline_test_accuracy"] for r in runs.values()])
    }
    for site in first["sites"]:
        for kind in KINDS:
            rows[f"{site} features needed {kind}"] = _spread(
                [r["sites"][site][kind]["min_k"][tol] for r in runs.values()]
            )
            rows[f"{site} retained {kind}"] = _spread(
                [r["sites"][site][kind]["retained"] for r in runs.values()]
            )
    for sec in first["sections"]:
        for kind in KINDS:
            rows[f"{sec} edges required {kind}"] = _spread(
                [r["sections"][sec][kind]["edges_required"] for r in runs.values()]
            )
            rows[f"{sec} edges for 99% weight {kind}"] = _spread(
                [r["sections"][sec][kind]["edges_for_99pct_weight"] for r in runs.values()]
            )
    return {
        "checkpoints": list(runs),
        "node_tolerance": first["node_tolerance"],
        "edge_tolerance": first["edge_tolerance"],
        "sites": list(first["sites"]),
        "sections": list(first["sections"]),
        "rows": rows,
        "total_s": {name: r["total_s"] for name, r in runs.items()},
    }


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The over-seeds table: one column per checkpoint, then mean ± sd."""
    names = summary["checkpoints"]
    lines = [
        "# Digits MLP: LIB vs PCA over training seeds",
        "",
        f"Features needed: fewest kept features (besides the mean) with held-out accuracy "
        f"within {summary['node_tolerance']} of the unablated model. Edges required: fewest "
        f"edges within {summary['edge_tolerance']}. Mean ± sample sd over "
        f"{len(names)} checkpoint(s); – where the criterion was never met.",
        "",
        "| | " + " | ".join(names) + " | mean ± sd |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, row in summary["rows"].items():
        digits = 4 if label.startswith("baseline") else 0
        cells = ["–" if v is None else _fmt(v, digits) for v in row["values"]]
        spread = f"{_fmt(row['mean'], max(digits, 1))} ± {_fmt(row['sd'], max(digits, 1))}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {spread} |")
    lines += ["", f"Wall time {summary.get('wall_s', '?')} s.", "", "![summary](summary.png)", ""]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Two panels of grouped bars (LIB, PCA) with sd error bars: features needed per site and
    edges required per section."""
    from matplotlib.figure import Figure  # without pyplot: no backend switch, saves via Agg

    rows = summary["rows"]
    panels = [
        ("features needed", summary["sites"], "{} features needed {}"),
        ("edges required", summary["sections"], "{} edges required {}"),
    ]
    fig = Figure(figsize=(11, 4))
    for i, (title, groups, key) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, kind in enumerate(KINDS):
            means = [rows[key.format(g, kind)]["mean"] or 0.0 for g in groups]
            sds = [rows[key.format(g, kind)]["sd"] or 0.0 for g in groups]
            xs = [x + (j - 0.5) * 0.38 for x in range(len(groups))]
            ax.bar(xs, means, 0.38, yerr=sds, capsize=3, label=kind.upper())
        ax.set_xticks(range(len(groups)), groups, rotation=12, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_markdown(result: dict, name: str) -> str:
    """A readable summary of one checkpoint's run."""
    tol = str(result["node_tolerance"])
    lines = [
        f"# Digits MLP, LIB vs PCA: {name}",
        "",
        f"Baseline held-out accuracy {result['baseline_test_accuracy']:.4f} "
        f"({result['n_test']} images); bases fitted on {result['n_train']} training images.",
        "",
        f"## Node ablation (features needed within {tol}; within 0.001)",
        "",
        "| site | width | LIB retained | LIB needed | PCA retained | PCA needed |",
        "|---|---|---|---|---|---|",
    ]
    for site, e in result["sites"].items():
        lib, pca = e["lib"], e["pca"]
        lines.append(
            f"| `{site}` | {lib['width']} | {lib['retained']} | {lib['min_k'][tol]} "
            f"({lib['min_k']['0.001']}) | {pca['retained']} | {pca['min_k'][tol]} "
            f"({pca['min_k']['0.001']}) |"
        )
    lines += [
        "",
        f"## Edges (edges required within {result['edge_tolerance']})",
        "",
        "| section | total | LIB required | PCA required | LIB 99% weight | PCA 99% weight |",
        "|---|---|---|---|---|---|",
    ]
    for sec, e in result["sections"].items():
        lines.append(
            f"| `{sec}` | {e['lib']['total_edges']} | {e['lib']['edges_required']} | "
            f"{e['pca']['edges_required']} | {e['lib']['edges_for_99pct_weight']} | "
            f"{e['pca']['edges_for_99pct_weight']} |"
        )
    lines += [
        "",
        f"Runtime {result['total_s']} s ({result['timings_s']}).",
        "",
        "![node ablation](node_ablation.png) ![edges required](edges_required.png)",
        "![graph](graph_lib.png)",
        "",
    ]
    return "\n".join(lines)
