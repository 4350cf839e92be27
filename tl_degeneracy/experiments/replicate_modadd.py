"""Replicate the modular-addition results of the LIB paper on one checkpoint: LIB and PCA with
the reference settings, node ablation (every k up to 64), edges and edge ablation by
bisection, Fourier labels and modules; written as `replication.json`, `report.md` and PNGs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from tl_degeneracy.engine.ablation import (
    evaluate,
    last_position_accuracy,
    node_ablation_curve,
)
from tl_degeneracy.engine.attach import site_features
from tl_degeneracy.engine.compat import API
from tl_degeneracy.engine.edges import interaction_graph
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.modularity import REFERENCE_MODULES, ModuleConfig, find_modules
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.experiments.modadd_modules import (
    EVAL_TOP,
    FrequencyLabels,
    frequency_ari,
    frequency_labels,
)
from tl_degeneracy.experiments.replication_outputs import section_edges_required, write_plots
from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint
from tl_degeneracy.models.modadd.fourier import fourier_labels
from tl_degeneracy.models.modadd.sites import REFERENCE_SITES

TOLERANCES = (0.001, 0.01)
ABLATION_BATCH = 1024
"""Test inputs per batch in the ablations: small enough that the per-batch intermediates of
the fast paths stay in cache (measured 2-4x faster than 4096 on this CPU)."""


def replicate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    max_k: int = 64,
    edge_tolerance: float = 0.001,
    api: API | Literal["auto"] = "auto",
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the whole replication on one checkpoint and write its outputs under `out`."""
    start = time.perf_counter()
    ckpt = ModAddCheckpoint.open(checkpoint)
    model = ckpt.model(api=api, dtype=torch.float64)
    data = ckpt.dataset()
    p = data.p
    train, _ = data.train()
    test, _ = data.test()
    metric = last_position_accuracy(lambda t: (t[:, 0] + t[:, 1]) % p)
    timings: dict[str, float] = {}

    cpu_timings: dict[str, float] = {}
    cpu = [time.process_time()]

    def lap(name: str, t0: float) -> float:
        """Wall and CPU seconds of a phase (CPU time shows the work on a shared machine)."""
        timings[name] = round(time.perf_counter() - t0, 2)
        cpu_timings[name] = round(time.process_time() - cpu[0], 2)
        cpu[0] = time.process_time()
        return time.perf_counter()

    t = time.perf_counter()
    stats = collect_statistics(model, REFERENCE_SITES, train, 4096, progress=progress)
    bases = {
        kind: fit_basis(
            model,
            train,
            LIBConfig(REFERENCE_SITES, kind=kind, batch_size=4096, progress=progress),
            statistics=stats,
        )
        for kind in ("lib", "pca")
    }
    # The reference keeps the logits in raw coordinates for PCA too (README: "output = logits
    # at the last position, not rotated"), so the last section is compared on equal terms.
    final = REFERENCE_SITES[-1].name
    bases["pca"].bases[final] = bases["lib"].bases[final]
    t = lap("fit", t)
    baseline = evaluate(model, test, metric, 4096)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "baseline_test_accuracy": baseline,
        "sites": {},
        "sections": {},
        "modules": {},
    }
    ks = list(range(0, max_k + 1))
    for site in REFERENCE_SITES[:-1]:
        entry: dict[str, Any] = {}
        for kind, basis in bases.items():
            b = basis[site]
            curve = node_ablation_curve(
                model,
                basis,
                site.name,
                test,
                metric,
                ks=[k for k in ks if k <= b.k],
                batch_size=ABLATION_BATCH,
            )
            curve.baseline = baseline
            entry[kind] = {
                "retained": b.k,
                ("lambda" if kind == "lib" else "variance"): [float(x) for x in b.importance[:40]],
                "min_k": {str(tol): curve.min_k(tol) for tol in TOLERANCES},
                "accuracy_by_k": {str(k): v for k, v in sorted(curve.scores.items())},
            }
        result["sites"][site.name] = entry
    t = lap("node_ablation", t)

    everything = data.tokens
    feats = site_features(model, bases["lib"], everything)
    for site in REFERENCE_SITES[:-1]:
        labels = fourier_labels(feats[site.name], p)
        result["sites"][site.name]["dominant_frequency"] = [
            int(w) for w in labels.dominant_frequency[:16]
        ]
        result["sites"][site.name]["fourier_labels"] = labels.labels()[:16]
    t = lap("fourier", t)

    graphs = {
        kind: interaction_graph(model, train, basis, batch_size=4096, progress=progress)
        for kind, basis in bases.items()
    }
    t = lap("edges", t)
    result["sections"] = section_edges_required(
        model, test, graphs, bases, metric, edge_tolerance, baseline, ABLATION_BATCH, log
    )
    t = lap("edge_ablation", t)

    for kind, graph in graphs.items():
        frequencies = frequency_labels(model, bases[kind], everything, p)
        result["modules"][kind] = module_report(graph, frequencies)
    lap("modules", t)
    result["timings_s"] = timings
    result["cpu_timings_s"] = cpu_timings
    result["total_s"] = round(time.perf_counter() - start, 1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "replication.json").write_text(json.dumps(result, indent=1))
    for kind, basis in bases.items():
        basis.save(folder / f"{kind}_basis")
    write_plots(result, bases, graphs, folder)
    (folder / "report.md").write_text(report_markdown(result, Path(checkpoint).name))
    return result


def module_report(graph, labels: FrequencyLabels, config: ModuleConfig | None = None) -> dict:
    """Modules of one basis's graph (default setting; its labels go into `graph.modules` for
    the graph widget), the reference's setting beside them, each judged by the adjusted Rand
    index against the features' dominant frequencies, and the modules where people look: their
    features, frequencies and share of the edge mass."""
    modules = find_modules(graph, config)
    graph.modules = modules.by_site()
    reference = find_modules(graph, REFERENCE_MODULES)
    return {
        **modules.to_json(),
        f"ari_vs_frequency_top{EVAL_TOP}": frequency_ari(modules, labels),
        "ari_vs_frequency_top10": frequency_ari(modules, labels, top=10),
        "reference_setting": {
            "setting": reference.setting,
            "n_modules": reference.n_modules,
            "modularity_q": reference.modularity_q,
            f"ari_vs_frequency_top{EVAL_TOP}": frequency_ari(reference, labels),
        },
        "summary": [
            s.to_json() for s in modules.describe(labels.labeller(), min_size=2, max_modules=12)
        ],
    }


def _short(site: str) -> str:
    """`blocks.0.hook_resid_mid[-1]` → `mid`, for compact module tables."""
    for part in ("resid_pre", "resid_mid", "resid_post", "logits"):
        if part in site:
            return part.removeprefix("resid_")
    return site


def modules_markdown(modules: dict) -> list[str]:
    """The report's modules section: per basis the count, Q and ARI beside the reference's
    setting, then the LIB modules with their features' frequencies and edge mass."""
    key = f"ari_vs_frequency_top{EVAL_TOP}"
    lines = [
        "",
        "## Modules",
        "",
        f"Default setting: {modules['lib']['setting']}. ARI: adjusted Rand index of the modules of "
        f"the top {EVAL_TOP} features per site at resid_mid and resid_post against each feature's "
        "dominant Fourier frequency (1 = the same partition, 0 = unrelated).",
        "",
        "| basis | modules | Q | ARI | reference setting: modules | Q | ARI |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, m in modules.items():
        ref = m["reference_setting"]
        lines.append(
            f"| {kind.upper()} | {m['n_modules']} | {m['modularity_q']:.3f} | {m[key]:.2f} | "
            f"{ref['n_modules']} | {ref['modularity_q']:.3f} | {ref[key]:.2f} |"
        )
    lines += [
        "",
        "LIB modules with more than one feature, most edge mass first: members as site:index, "
        "and the dominant frequencies w of the members with at least 50% of their power there:",
        "",
        "| module | features | share of edge mass | kept inside | frequencies | members |",
        "|---|---|---|---|---|---|",
    ]
    for s in modules["lib"]["summary"]:
        counts: dict[str, int] = {}
        unclear = 0
        for label in s["labels"]:
            w, _, share = label.partition(" (")
            if float(share.rstrip("%)") or 0) < 50:
                unclear += 1
                continue
            counts[w] = counts.get(w, 0) + 1
        freqs = ", ".join(f"{w} ×{n}" for w, n in sorted(counts.items(), key=lambda x: -x[1]))
        freqs += f"; {unclear} with no frequency above 50%" if unclear else ""
        members = ", ".join(f"{_short(site)}:{i}" for site, i in s["features"][:24])
        more = len(s["features"]) - 24
        lines.append(
            f"| {s['module']} | {len(s['features'])} | {s['edge_share']:.3f} | "
            f"{s['internal_fraction']:.2f} | {freqs} | {members}"
            + (f" … (+{more})" if more > 0 else "")
            + " |"
        )
    return lines


def _replicate_one(args: tuple) -> tuple[str, dict[str, Any]]:
    """Worker of `replicate_checkpoints`: one checkpoint on one thread."""
    checkpoint, out, max_k, tolerance, api = args
    torch.set_num_threads(1)
    return str(checkpoint), replicate_checkpoint(
        checkpoint, out, max_k, tolerance, api=api, log=lambda _: None
    )


def replicate_checkpoints(
    checkpoints: list[Path],
    out: str | Path,
    max_k: int = 64,
    edge_tolerance: float = 0.001,
    api: API | Literal["auto"] = "auto",
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """`replicate_checkpoint` for each checkpoint into `out/<name>`; with `jobs > 1`, that
    many worker processes of one thread each (a seed's work is mostly small float64
    products that a second thread barely speeds up, so processes use cores better)."""
    tasks = [(c, Path(out) / Path(c).name, max_k, edge_tolerance, api) for c in checkpoints]
    results: dict[str, dict[str, Any]] = {}
    if jobs <= 1 or len(tasks) == 1:
        for task in tasks:
            results[str(task[0])] = replicate_checkpoint(*task[:4], api=api, log=log)
            log(_summary(results[str(task[0])], task[1]))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
        for (name, result), task in zip(pool.map(_replicate_one, tasks), tasks):
            results[name] = result
            log(f"{name}:\n" + _summary(result, task[1]))
    return results


def _summary(result: dict[str, Any], folder: Path) -> str:
    return (
        f"  baseline {result['baseline_test_accuracy']:.5f}, {result['total_s']} s, wrote {folder}"
    )


def report_markdown(result: dict, name: str) -> str:
    """A readable summary of one checkpoint's replication."""
    lines = [
        f"# Modular addition replication: {name}",
        "",
        f"Baseline test accuracy: {result['baseline_test_accuracy']:.5f}.",
        "",
        "## Node ablation (kept features other than the mean)",
        "",
        "| site | LIB retained | LIB min k (0.001) | LIB min k (0.01) | PCA retained | "
        "PCA min k (0.001) | PCA min k (0.01) | dominant frequencies (LIB, top 8) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, e in result["sites"].items():
        lines.append(
            f"| `{site}` | {e['lib']['retained']} | {e['lib']['min_k']['0.001']} | "
            f"{e['lib']['min_k']['0.01']} | {e['pca']['retained']} | "
            f"{e['pca']['min_k']['0.001']} | {e['pca']['min_k']['0.01']} | "
            f"{', '.join(str(w) for w in e['dominant_frequency'][:8])} |"
        )
    lines += [
        "",
        "## Edges (tolerance 0.001 in test accuracy)",
        "",
        "| section | LIB edges required | PCA edges required | total | LIB 99% weight | "
        "PCA 99% weight |",
        "|---|---|---|---|---|---|",
    ]
    for sec, e in result["sections"].items():
        lines.append(
            f"| `{sec}` | {e['lib']['edges_required']} | {e['pca']['edges_required']} | "
            f"{e['lib']['total_edges']} | {e['lib']['edges_for_99pct_weight']} | "
            f"{e['pca']['edges_for_99pct_weight']} |"
        )
    lines += modules_markdown(result["modules"])
    lines += [
        "",
        f"Runtime: {result['total_s']} s ({result['timings_s']}).",
        "",
        "![node ablation](node_ablation.png) ![edges required](edges_required.png)",
        "![graph](graph_lib.png)",
        "",
    ]
    return "\n".join(lines)
