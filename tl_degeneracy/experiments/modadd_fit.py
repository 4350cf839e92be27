"""The modular-addition main job: fit LIB and PCA at the reference's sites, run node-ablation
curves on the test inputs, and write results, curves and plots to a folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tl_degeneracy.engine.ablation import AblationCurve, last_position_accuracy, node_ablation_curve
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.fit import Kind, LIBConfig, fit_basis
from tl_degeneracy.engine.statistics import collect_statistics
from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint
from tl_degeneracy.models.modadd.sites import REFERENCE_SITES


@dataclass
class ModAddFit:
    """LIB and PCA bases of one checkpoint and their node-ablation curves."""

    bases: dict[str, BasisResult]
    curves: dict[str, dict[str, AblationCurve]]
    baseline_test_accuracy: float
    timings: dict[str, float] = field(default_factory=dict)


def fit_modadd(
    checkpoint: str | Path | None = None,
    kinds: tuple[Kind, ...] = ("lib", "pca"),
    api: Literal["auto", "hooked", "bridge"] = "auto",
    ks: list[int] | None = None,
    progress: bool = True,
) -> ModAddFit:
    """Fit `kinds` on the training inputs (float64, reference settings) and ablate on the test
    inputs at every site but the logits."""
    ckpt = ModAddCheckpoint.open(checkpoint)
    model = ckpt.model(api=api, dtype=torch.float64)
    data = ckpt.dataset()
    train, _ = data.train()
    test, _ = data.test()
    p = data.p
    metric = last_position_accuracy(lambda t: (t[:, 0] + t[:, 1]) % p)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    stats = collect_statistics(model, REFERENCE_SITES, train, 4096, progress=progress)
    timings["statistics_s"] = time.perf_counter() - start
    bases: dict[str, BasisResult] = {}
    curves: dict[str, dict[str, AblationCurve]] = {}
    for kind in kinds:
        start = time.perf_counter()
        config = LIBConfig(REFERENCE_SITES, kind=kind, batch_size=4096, progress=progress)
        bases[kind] = fit_basis(model, train, config, statistics=stats)
        timings[f"{kind}_bases_s"] = time.perf_counter() - start
        start = time.perf_counter()
        curves[kind] = {
            site.name: node_ablation_curve(
                model,
                bases[kind],
                site.name,
                test,
                metric,
                ks=ks,
                batch_size=4096,
                progress=progress,
            )
            for site in REFERENCE_SITES[:-1]
        }
        timings[f"{kind}_ablation_s"] = time.perf_counter() - start
    baseline = next(iter(next(iter(curves.values())).values())).baseline
    return ModAddFit(bases, curves, baseline, timings)


def write_fit(fit: ModAddFit, out: str | Path) -> Path:
    """Save bases (safetensors + JSON), curves (JSON) and plots (PNG) under `out`."""
    from tl_degeneracy.viz.plots import plot_ablation_curves, plot_spectra

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for kind, result in fit.bases.items():
        result.save(out / kind)
    summary: dict[str, Any] = {
        "baseline_test_accuracy": fit.baseline_test_accuracy,
        "timings": fit.timings,
        "sites": {},
    }
    for site in REFERENCE_SITES[:-1]:
        entry = {}
        for kind, result in fit.bases.items():
            curve = fit.curves[kind][site.name]
            entry[kind] = {
                "retained": result[site].k,
                "importance": [float(x) for x in result[site].importance[:40]],
                "min_k": {str(t): curve.min_k(t) for t in (0.001, 0.01)},
                "accuracy_by_k": {str(k): v for k, v in sorted(curve.scores.items())},
            }
        summary["sites"][site.name] = entry
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_ablation_curves(
        {s: {k.upper(): fit.curves[k][s].scores for k in fit.curves} for s in summary["sites"]},
        path=out / "ablation_curves.png",
    )
    for site in REFERENCE_SITES[:-1]:
        plot_spectra(
            {k.upper(): fit.bases[k][site].importance.numpy() for k in fit.bases},
            title=f"importance at {site.name}",
            path=out / f"spectrum_{site.hook}_{site.positions}.png",
        )
    return out
