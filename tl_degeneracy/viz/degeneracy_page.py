"""The degeneracy report as one offline HTML page: the table, the notes (estimates that are not
results, additivity), the bound against ε, per-map counts, the SGLD calibration and traces."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tl_degeneracy.viz.html import HtmlPage, table, text
from tl_degeneracy.viz.plots import figure_to_html

if TYPE_CHECKING:
    from tl_degeneracy.engine.degeneracy.report import DegeneracyReport


def degeneracy_page(report: DegeneracyReport) -> HtmlPage:
    """A self-contained page for `report` (all text escaped)."""
    from tl_degeneracy.engine.degeneracy.report import plot_llc_results

    name = str(report.model.get("model_name", "model"))
    every = [*report.sections, report.total]
    page = HtmlPage(
        f"Degeneracy report: {name}",
        f"{report.n_data} data points; cutoff ε = {report.eps:g} ({report.cutoff}); SGLD "
        f"{report.settings_text()}.",
    )
    page.add("Per section and in total", table(report.rows()))
    notes = report.notes()
    if notes:
        page.add("Notes", *[text(n, "p") for n in notes])
    grid = [f"{e:.0e}" for e in report.eps_grid]
    curve_rows = [
        {"section": s.name, **{g: int(v) for g, v in zip(grid, s.bound_curve)}} for s in every
    ]
    page.add("Upper bound N − free against the cutoff ε", table(curve_rows))
    detail_rows = []
    for s in report.sections:
        for key, d in s.details.items():
            if "k" in d:
                detail_rows.append({"section": s.name, "map": key, **d})
            else:
                detail_rows.append({"section": s.name, "map": key, "groups": str(d)})
    if detail_rows:
        columns = list(dict.fromkeys(k for r in detail_rows for k in r))
        page.add("Weight maps and groups", table(detail_rows, columns))
    pilots = [
        {"section": s.name, **row}
        for s in every
        if s.calibration is not None
        for row in s.calibration.table()
    ]
    if pilots:
        lengths = [
            {
                "section": s.name,
                "chosen ε": "—" if s.calibration.chosen is None else f"{s.calibration.chosen:g}",
                "steps per chain (R-hat)": ", ".join(
                    f"{n} ({r:.3f})" for n, r in s.calibration.lengths
                ),
                "γ tried": " → ".join(
                    f"{g:g}"
                    for g in [h["gamma"] for h in s.calibration.higher_gammas]
                    + ([s.llc.config.gamma] if s.llc is not None else [])
                ),
                "step-size check": _check_text(
                    s.calibration.discretisation, "llc_fine", "step_size_fine", "ε"
                ),
                "localisation check": _check_text(
                    s.calibration.localisation, "llc_low", "gamma_low", "γ"
                ),
                "SGLD steps": f"{s.calibration.steps_used:,}",
                "seconds": f"{s.calibration.seconds:.1f}",
                "notes": "; ".join(s.calibration.notes),
            }
            for s in every
            if s.calibration is not None
        ]
        page.add(
            "SGLD calibration",
            table(pilots),
            table(lengths),
            description="Pilot chains at each step size for the same Langevin time ε × steps; "
            "the chosen step size is the largest whose pilot is stable and agrees with the next "
            "smaller one. The chains then double in length while R-hat asks for it (at least "
            "one relaxation time 2/(εγ)); λ̂ is checked at the next smaller step size over the "
            "same Langevin time and at γ/10, and γ is lowered while λ̂ depends on it.",
        )
    llc_rows = [
        {"section": s.name, "estimate": s.llc.summary(), "messages": "; ".join(s.llc.messages)}
        for s in every
        if s.llc is not None
    ]
    if llc_rows:
        runs = {s.name: s.llc for s in every if s.llc is not None}
        page.add(
            "SGLD diagnostics",
            table(llc_rows),
            figure_to_html(plot_llc_results(runs), "per-step LLC traces of every chain"),
            description="Every chain's nβ (L_t − L*) per step; burn-in shaded, λ̂ dashed. "
            "Converged chains agree and are flat after the burn-in.",
        )
    if report.sensitivity:
        own = [report.total.llc] if report.total.llc else []
        fig = plot_llc_results(own + report.sensitivity)
        page.add(
            "Sensitivity of λ̂ to the step size and the inverse temperature",
            table(report.sensitivity_rows()),
            figure_to_html(fig, "traces over the sensitivity grid"),
            description="The total's estimate at other SGLD settings. Estimates that move "
            "with ε mean the step size is too large (or the chains too short); λ̂ moves "
            "slowly with nβ in singular models (a −(m − 1)/log nβ term).",
        )
    return page


def _check_text(check: Any, llc: str, setting: str, symbol: str) -> str:
    """One check of a calibrated estimate as "λ̂ at setting (passed)", or "—"."""
    if check is None:
        return "—"
    verdict = "passed" if check.passed else "failed"
    return f"λ̂ {getattr(check, llc):.4g} at {symbol} = {getattr(check, setting):g} ({verdict})"
