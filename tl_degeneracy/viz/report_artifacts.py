"""A study report's inputs on disk: what `experiments.lm_study.write_lm_fit` writes (bases,
edges, `summary.json`) plus the views it does not (examples, logit effects, attribution,
dominant directions), written by `save_report_views`. `load_study_artifacts` reads them back
for `tl-degeneracy report OUT_DIR`, which re-renders the page without refitting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples
from tl_degeneracy.viz.report import StudyReportInputs

__all__ = ["load_study_artifacts", "save_report_views"]


def save_report_views(inputs: StudyReportInputs, out_dir: str | Path) -> Path:
    """Write the parts of `inputs` that `write_lm_fit` does not (examples, logit effects,
    attribution, diagnostic) as JSON into `out_dir`, where `load_study_artifacts` finds them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, by_kind in (("examples", inputs.examples), ("logit_effects", inputs.logit_effects)):
        for kind, by_site in by_kind.items():
            payload = {site: v.to_json() for site, v in by_site.items()}
            (out / f"{name}_{kind}.json").write_text(json.dumps(payload))
    for kind, comp in inputs.attribution.items():
        comp.save_json(out / f"attribution_{kind}.json")
    if inputs.diagnostic is not None:
        inputs.diagnostic.save(out / "diagnostic.json")
    return out


def load_study_artifacts(out_dir: str | Path) -> StudyReportInputs:
    """The report's inputs from a folder written by `experiments.lm_study.write_lm_fit`
    (`lib/`, `pca/`, `edges_{kind}.safetensors`, `summary.json`) plus, when present, the
    files of `save_report_views`. Without a saved diagnostic, the top-direction shares are
    computed from the saved PCA spectra (tokens are then not traced)."""
    from safetensors.torch import load_file

    from tl_degeneracy.engine.ablation import AblationCurve
    from tl_degeneracy.engine.attribution import AttributionComparison
    from tl_degeneracy.engine.diagnostics import SinkDiagnostic, dominant_directions
    from tl_degeneracy.engine.edges import SectionEdges
    from tl_degeneracy.engine.result import BasisResult
    from tl_degeneracy.engine.sections import Section

    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    kinds = [k for k in ("lib", "ib", "pca", "neuron") if (out / k / "metadata.json").exists()]
    if not kinds:
        raise FileNotFoundError(f"{out} holds no saved bases (lib/, pca/): run the study first")
    bases = {k: BasisResult.load(out / k) for k in kinds}
    edges: dict[str, dict[str, SectionEdges]] = {}
    for kind in kinds:
        path = out / f"edges_{kind}.safetensors"
        if not path.exists():
            continue
        tensors = load_file(str(path))
        sites = {name: b.site for name, b in bases[kind].bases.items()}
        edges[kind] = {}
        for name in dict.fromkeys(key.rsplit("/", 1)[0] for key in tensors):
            a, b = name.split("->")
            count = summary.get("edges", {}).get(name, {}).get(kind, {}).get("tokens", 0)
            edges[kind][name] = SectionEdges(
                Section(sites[a], sites[b]),
                tensors[f"{name}/edges"],
                tensors[f"{name}/mean_edges"],
                int(count),
                "stochastic",
            )
    curves = {
        site: {
            kind: AblationCurve(
                site,
                kind,
                {int(k): float(v) for k, v in c["loss"].items()},
                float(c["baseline_loss"]),
                higher_is_better=False,
            )
            for kind, c in by_kind.items()
        }
        for site, by_kind in summary.get("ablation", {}).items()
    }
    views: dict[str, dict[str, dict[str, Any]]] = {"examples": {}, "logit_effects": {}}
    for name, cls in (("examples", TopkExamples), ("logit_effects", LogitEffects)):
        for kind in kinds:
            path = out / f"{name}_{kind}.json"
            if path.exists():
                raw = json.loads(path.read_text())
                views[name][kind] = {s: cls.from_json(v) for s, v in raw.items()}
    attribution = {
        k: AttributionComparison.load_json(out / f"attribution_{k}.json")
        for k in kinds
        if (out / f"attribution_{k}.json").exists()
    }
    diag_path = out / "diagnostic.json"
    diagnostic = (
        SinkDiagnostic.load(diag_path)
        if diag_path.exists()
        else dominant_directions(bases["pca" if "pca" in bases else kinds[0]])
    )
    return StudyReportInputs(
        bases,
        edges,
        curves,
        attribution,
        views["examples"],
        views["logit_effects"],
        diagnostic,
        settings=summary.get("config", {}),
        timings=summary.get("timings_s", {}),
    )
