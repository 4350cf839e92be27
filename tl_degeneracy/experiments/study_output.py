"""A study's output: the report's inputs, `write_study` (artifacts, `summary.json`, the
report and its views), `load_study_artifacts` (for `tl-degeneracy report`, without refitting) and
the lines the commands print."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import jsonable
from tl_degeneracy.engine.progress import Log, quiet
from tl_degeneracy.experiments.study import Study


def report_inputs(study: Study, **fields: Any) -> Any:
    """The report's inputs from a study (bases, interaction graphs, curves, settings,
    timings); `fields` sets any other (`attribution=`, views). The settings list the ablation
    ks that ran (each clipped to its basis's width), not the ones asked for."""
    from tl_degeneracy.viz.report import StudyReportInputs

    graphs: dict[str, Any] = dict(study.graphs)  # the report takes their sections and modules
    settings = jsonable(study.config)
    ran = sorted(
        {k for by_kind in study.curves.values() for c in by_kind.values() for k in c.scores}
    )
    if study.config.ablation_ks is not None and ran:
        settings["ablation_ks"] = ran
    return StudyReportInputs(
        bases=study.bases,
        edges=graphs,
        curves=study.curves,
        settings=settings,
        timings=dict(study.timings),
        **fields,
    )


def write_study(
    study: Study,
    out: str | Path,
    model: nn.Module | None = None,
    heldout: Tensor | None = None,
    decode: Callable[[int], str] | None = None,
    attribution: dict[str, Any] | None = None,
    example_rows: int = 16,
    inputs: Any = None,
    log: Log = quiet,
) -> Path:
    """Save the study, `summary.json` and the report (`report.html` and the views beside it)
    under `out`. With the model, held-out rows and a token decoder, the report shows each
    feature's top-activating contexts and logit effects and traces dominant directions to
    their tokens (on `example_rows` rows spread over the held-out data). `inputs` replaces
    the report's inputs altogether (`report_inputs` plus views built by the caller).

    The report's time (its views and the page's body: graphs, features, plots) is added to
    the timings (`report_s`, and `total_s`) before the summary and the timings are written
    into the page, so the page, the saved study, `summary.json`, the terminal and a later
    `tl-degeneracy report` all state the same times (only writing the files is not counted).
    `log` gets a line as each part of the report starts (the views take tens of seconds on a
    language model)."""
    from tl_degeneracy.experiments.lm_report import lm_summary
    from tl_degeneracy.experiments.report_views import add_model_views
    from tl_degeneracy.viz.report import report_body, study_report
    from tl_degeneracy.viz.report_artifacts import save_report_views

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if inputs is None:
        inputs = report_inputs(study, attribution=attribution or {})
    if model is not None and heldout is not None and decode is not None:
        step = max(1, heldout.shape[0] // example_rows)
        rows = heldout[::step][:example_rows]
        log(
            f"report: feature examples, logit effects and dominant directions on "
            f"{rows.shape[0]} held-out rows"
        )
        inputs = add_model_views(inputs, model, rows, decode)
    log("report: graphs, tables and figures")
    save_report_views(inputs, out)
    body = report_body(inputs)
    _add_report_time(study, time.perf_counter() - start)
    if inputs.timings:  # the page states the times the study records
        inputs = replace(inputs, timings=_with_report_time(inputs.timings, study.timings))
    study_report(inputs, body).save(out / "report.html")
    study.save(out)
    (out / "summary.json").write_text(json.dumps(jsonable(lm_summary(study)), indent=1))
    return out


def load_study_artifacts(out: str | Path) -> Any:
    """The report's inputs from a folder written by `write_study`, without refitting; without
    saved views, the dominant-direction shares come from the saved PCA spectra."""
    from tl_degeneracy.engine.diagnostics import dominant_directions
    from tl_degeneracy.viz.report_artifacts import load_report_views

    study = Study.load(out)
    views = load_report_views(out, list(study.bases))
    if views["diagnostic"] is None:
        source = study.bases.get("pca") or next(iter(study.bases.values()))
        views["diagnostic"] = dominant_directions(source)
    return report_inputs(study, **views)


def write_language_model_study(
    study: Study, out: str | Path, model: nn.Module, heldout: Tensor | None, log: Log = print
) -> Path:
    """`write_study` for a language model: the report adds feature views from held-out text
    and attribution patching on indirect-object prompt pairs (when its tokenizer has the
    names they need)."""
    from tl_degeneracy.experiments.ioi import ioi_report_attribution

    start = time.perf_counter()
    before = study.timings.get("report_s", 0.0)
    tokenizer = getattr(model, "tokenizer", None)
    attribution = {}
    if tokenizer is not None:
        log("report: attribution patching on indirect-object prompt pairs")
        attribution = ioi_report_attribution(model, study.bases)
    decode = None if tokenizer is None else (lambda i: tokenizer.decode([i]))
    _add_report_time(study, time.perf_counter() - start)  # write_study adds the rest
    out = write_study(study, out, model, heldout, decode, attribution, log=log)
    log(f"report in {study.timings['report_s'] - before:.1f} s")
    return out


def _add_report_time(study: Study, seconds: float) -> None:
    """Count `seconds` of the report's work in `report_s` and `total_s`."""
    report = {"report_s": study.timings.get("report_s", 0.0) + seconds}
    if "total_s" in study.timings:
        report["total_s"] = study.timings["total_s"] + seconds
    study.timings = _with_report_time(study.timings, report)


def _with_report_time(timings: dict[str, float], source: dict[str, float]) -> dict[str, float]:
    """`timings` with `report_s` and `total_s` from `source`, the report among the phases
    (before the totals)."""
    phases = {k: v for k, v in timings.items() if not k.startswith(("total", "cpu"))}
    phases.pop("report_s", None)
    if "report_s" in source:
        phases["report_s"] = source["report_s"]
    totals = {k: v for k, v in timings.items() if k.startswith(("total", "cpu"))}
    if "total_s" in source:
        totals["total_s"] = source["total_s"]
    return {**phases, **totals}


def summary_lines(study: Study) -> list[str]:
    """A few lines for the terminal."""
    lines = [f"tokens {study.n_tokens}, total {study.timings.get('total_s', 0):.1f} s"]
    for kind, graph in study.graphs.items():
        n99 = [s.edges_for_fraction(0.99) for s in graph.sections.values()]
        totals = sorted(s.total_edges for s in graph.sections.values())
        if n99:
            of = f"{totals[0]}" if totals[0] == totals[-1] else f"{totals[0]}–{totals[-1]}"
            lines.append(
                f"{kind}: median edges for 99% of the weight {sorted(n99)[len(n99) // 2]} "
                f"(of {of} per section)"
            )
    for site, by_kind in study.curves.items():
        parts = [f"{kind} min k (0.05) {_k_text(curve)}" for kind, curve in by_kind.items()]
        base = next(iter(by_kind.values())).baseline
        lines.append(f"{site}: baseline {base:.3f}; " + "; ".join(parts))
    return lines


def _k_text(curve: Any, tolerance: float = 0.05) -> str:
    """A curve's `min_k` for the terminal: the count, "none" when no evaluated k is within the
    tolerance, "undecided" when a NaN score leaves it open."""
    k = curve.min_k(tolerance)
    if k is not None:
        return str(k)
    return "undecided (NaN)" if curve.undecided else "none"
