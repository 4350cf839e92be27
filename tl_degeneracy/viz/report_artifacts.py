"""The report's views on disk: the parts of a report that a study's own artifacts do not hold
(examples, logit effects, attribution, the dominant-direction diagnostic), written beside them by
`save_report_views` and read back by `load_report_views` (see `experiments.study.
load_study_artifacts`, behind `tl-degeneracy report OUT_DIR`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples
from tl_degeneracy.viz.report import StudyReportInputs

__all__ = ["load_report_views", "save_report_views"]


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


def load_report_views(out_dir: str | Path, kinds: Sequence[str]) -> dict[str, Any]:
    """What `save_report_views` wrote into `out_dir` (missing parts are empty): keyword
    arguments for `StudyReportInputs` (`examples`, `logit_effects`, `attribution`,
    `diagnostic`)."""
    from tl_degeneracy.engine.attribution import AttributionComparison
    from tl_degeneracy.engine.diagnostics import SinkDiagnostic

    out = Path(out_dir)
    views: dict[str, Any] = {"examples": {}, "logit_effects": {}}
    for name, cls in (("examples", TopkExamples), ("logit_effects", LogitEffects)):
        for kind in kinds:
            path = out / f"{name}_{kind}.json"
            if path.exists():
                raw = json.loads(path.read_text())
                views[name][kind] = {s: cls.from_json(v) for s, v in raw.items()}
    views["attribution"] = {
        k: AttributionComparison.load_json(out / f"attribution_{k}.json")
        for k in kinds
        if (out / f"attribution_{k}.json").exists()
    }
    diag_path = out / "diagnostic.json"
    views["diagnostic"] = SinkDiagnostic.load(diag_path) if diag_path.exists() else None
    return views
