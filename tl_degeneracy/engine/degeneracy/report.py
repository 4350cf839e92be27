"""`DegeneracyReport`: the degeneracy of a model per section and in total (Paper A).

For every section (embedding, each attention layer, each MLP, unembedding) and for the whole
model: the nominal parameter count N, the free directions found by the three sources at the
cutoff ε, the upper bound `N − free` on the effective parameter count, the SGLD estimate
`N_eff = 2λ̂ ± se` of the behavioural loss restricted to the section, and how the bound moves
with ε. An estimate is shown only when it is a result (finite, converged, within the bound);
otherwise the table says "not converged" and the notes say why. Saved as JSON (numbers,
settings) + safetensors (arrays); no pickle. `build_report.degeneracy_report` builds it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_degeneracy.engine.artifacts import ArtifactError, rebuilding
from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.degeneracy.additivity import AdditivityResult
from tl_degeneracy.engine.degeneracy.calibrated import CalibratedLLC
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tl_degeneracy.viz.html import HtmlPage

SOURCE_KEYS = ("activations", "gradients", "joint", "synchronised", "dead", "total")
NOT_CONVERGED = "not converged"


@dataclass(repr=False)
class SectionReport(BriefRepr):
    """Degeneracy of one section (or of the whole model, named "total")."""

    name: str
    n_params: int
    """Nominal parameter count N."""
    free: dict[str, int]
    """Free directions at ε by source: activations, gradients, joint (both, overlap counted
    once), synchronised (neuron or head groups), dead (all weights of dead neurons), total."""
    upper_bound: int
    """N − free["total"]: an upper bound on N_eff."""
    bound_curve: Int[Tensor, " eps"]
    """The upper bound at every ε of the report's grid."""
    llc: LLCResult | None = None
    """SGLD estimate over this section's parameters (the rest held at the trained values)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Per weight map counts (k, k', joint) and neuron / head group summaries."""
    calibration: CalibratedLLC | None = None
    """How the step size and chain length of `llc` were chosen (None: fixed settings)."""

    @property
    def reasons(self) -> list[str]:
        """Why the estimate is not a result (empty when it is, or when there is none)."""
        if self.calibration is not None:
            return self.calibration.reasons
        return self.llc.unconverged_reasons(self.upper_bound) if self.llc is not None else []

    @property
    def converged(self) -> bool:
        """True when there is an estimate and it is a result."""
        return self.llc is not None and not self.reasons

    @property
    def n_eff(self) -> float:
        """2λ̂ when it is a result, else NaN."""
        return self.llc.n_eff if self.llc is not None and self.converged else math.nan

    @property
    def n_eff_se(self) -> float:
        return self.llc.n_eff_se if self.llc is not None and self.converged else math.nan

    def estimate_text(self) -> str:
        """`N_eff ± se` when the estimate is a result, "not converged" when not, "—" for none."""
        if self.llc is None and self.calibration is None:
            return "—"
        if not self.converged or self.llc is None:
            return NOT_CONVERGED
        return _pm(self.llc.n_eff, self.llc.n_eff_se)

    def note(self) -> str | None:
        """For an estimate that is not a result: the reasons and the best setting found."""
        if self.converged or (self.llc is None and self.calibration is None):
            return None
        text = f"{self.name}: {NOT_CONVERGED} — " + "; ".join(self.reasons)
        if self.llc is not None:
            r = self.llc
            setting = (
                f"ε = {r.config.step_size:g}, γ = {r.config.gamma:g}, nβ = {r.nbeta:.4g}, "
                f"{r.config.n_chains} chains × {r.config.n_steps} steps"
            )
            if not math.isfinite(r.n_eff) or bool(r.diverged.any()):
                text += (
                    f". No setting was stable ({setting}: {int(r.diverged.sum())} of "
                    f"{len(r.diverged)} chains diverged, N_eff = {_pm(r.n_eff, r.n_eff_se)})"
                )
            else:
                label = (
                    "Best stable setting found" if self.calibration is not None else "Setting run"
                )
                text += (
                    f". {label}: {setting}: N_eff = {_pm(r.n_eff, r.n_eff_se)}, R-hat {r.rhat:.3f}"
                )
        return text


REPORT_FORMAT = "tl_degeneracy.DegeneracyReport/1"
"""The `format` entry of a saved report's JSON file (`DegeneracyReport.save`)."""


@dataclass(repr=False)
class DegeneracyReport(BriefRepr):
    """Per-section and total degeneracy of a model on a data set."""

    sections: list[SectionReport]
    total: SectionReport
    eps: float
    cutoff: str
    eps_grid: list[float]
    n_data: int
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sensitivity: list[LLCResult] = field(default_factory=list)
    """λ̂ of the total at other SGLD step sizes and inverse temperatures: how much the
    estimate depends on its hyperparameters."""

    def __getitem__(self, name: str) -> SectionReport:
        for s in [*self.sections, self.total]:
            if s.name == name:
                return s
        raise KeyError(f"no section {name!r}; sections: {[s.name for s in self.sections]}")

    @property
    def additivity(self) -> AdditivityResult | None:
        """Whole-model λ̂ against the sum of the sections' λ̂ (independent sections add);
        None unless every estimate is a result."""
        parts = {s.name: s.llc for s in self.sections if s.llc is not None and s.converged}
        if self.total.llc is None or not self.total.converged or len(parts) < len(self.sections):
            return None
        if len(self._gammas()) > 1:  # posteriors of different localisations do not add
            return None
        return AdditivityResult(self.total.llc, parts)

    def _gammas(self) -> dict[str, float]:
        """The γ of every estimate, by section."""
        return {
            s.name: s.llc.config.gamma for s in [*self.sections, self.total] if s.llc is not None
        }

    # -- text ------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        """The summary table as strings (one row per section, then the total)."""
        out = []
        for s in [*self.sections, self.total]:
            llc = s.llc
            out.append(
                {
                    "section": s.name,
                    "N": f"{s.n_params:,}",
                    "free: activations": f"{s.free['activations']:,}",
                    "free: gradients": f"{s.free['gradients']:,}",
                    "free: joint": f"{s.free['joint']:,}",
                    "free: synchronised": f"{s.free['synchronised']:,}",
                    "free: dead": f"{s.free['dead']:,}",
                    "bound N − free": f"{s.upper_bound:,}",
                    "SGLD N_eff = 2λ̂": s.estimate_text(),
                    "R-hat": f"{llc.rhat:.3f}" if llc else "—",
                    "ε, γ, steps": _setting_cell(s),
                }
            )
        return out

    def notes(self) -> list[str]:
        """One line per estimate that is not a result, and the additivity line."""
        out = [n for s in [*self.sections, self.total] if (n := s.note()) is not None]
        add = self.additivity
        if add is not None:
            out.append(f"Additivity of the sections: {add.summary()}.")
        elif len(set(self._gammas().values())) > 1 and all(
            s.converged for s in [*self.sections, self.total]
        ):
            at = ", ".join(f"{n} at γ = {g:g}" for n, g in self._gammas().items())
            out.append(
                f"Additivity not computed: the estimates ended at different γ ({at}), and "
                "posteriors of different localisations do not add."
            )
        return out

    def sensitivity_rows(self) -> list[dict[str, str]]:
        """The report's own total estimate, then the sensitivity grid, as strings."""
        runs = ([self.total.llc] if self.total.llc is not None else []) + self.sensitivity
        return [
            {
                "ε (step)": f"{r.config.step_size:g}",
                "nβ": f"{r.nbeta:.4g}",
                "λ̂": _pm(r.llc, r.llc_se),
                "N_eff = 2λ̂": _pm(2 * r.llc, 2 * r.llc_se),
                "R-hat": f"{r.rhat:.3f}",
                "diverged": f"{int(r.diverged.sum())}/{len(r.diverged)}",
            }
            for r in runs
        ]

    def settings_text(self) -> str:
        return _settings_text(self.settings.get("sgld"), self.settings.get("calibration"))

    def to_markdown(self) -> str:
        rows = self.rows()
        head = list(rows[0])
        lines = [
            f"# Degeneracy report ({html.escape(str(self.model.get('model_name', 'model')))})",
            "",
            f"{self.n_data} data points; cutoff ε = {self.eps:g} ({self.cutoff}); SGLD "
            f"{self.settings_text()}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
        notes = self.notes()
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
        if self.sensitivity:
            lines += ["", "Sensitivity of λ̂ (total) to the SGLD step size and nβ:", ""]
            srows = self.sensitivity_rows()
            lines += ["| " + " | ".join(srows[0]) + " |", "|" + "---|" * len(srows[0])]
            lines += ["| " + " | ".join(r.values()) + " |" for r in srows]
        lines += ["", "Upper bound N − free against ε:", ""]
        grid = [f"{e:.0e}" for e in self.eps_grid]
        lines += ["| section | " + " | ".join(grid) + " |", "|---|" + "---|" * len(grid)]
        for s in [*self.sections, self.total]:
            lines.append(f"| {s.name} | " + " | ".join(str(int(v)) for v in s.bound_curve) + " |")
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        rows = self.rows()
        head = list(rows[0])
        esc = html.escape
        parts = [
            "<div>",
            f"<p>Degeneracy of {esc(str(self.model.get('model_name', 'model')))} on "
            f"{self.n_data} data points; cutoff ε = {self.eps:g} ({esc(self.cutoff)}).</p>",
            "<table>",
            "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>",
        ]
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(r[h])}</td>" for h in head) + "</tr>")
        parts.append("</table>")
        parts += [f"<p>{esc(n)}</p>" for n in self.notes()]
        parts.append("</div>")
        return "\n".join(parts)

    def html_page(self) -> HtmlPage:
        """A self-contained page: the summary table, the bound against ε, the per-map counts,
        the SGLD calibration, settings and diagnostics (all text escaped)."""
        from tl_degeneracy.viz.degeneracy_page import degeneracy_page

        return degeneracy_page(self)

    def save_html(self, path: str | Path) -> Path:
        """Write the report as one offline HTML page."""
        return self.html_page().save(path)

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write `<path>.json` (numbers, settings) and `<path>.safetensors` (curves, traces)."""
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Tensor] = {"eps_grid": torch.tensor(self.eps_grid, dtype=torch.float64)}
        meta: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "eps": self.eps,
            "cutoff": self.cutoff,
            "n_data": self.n_data,
            "model": self.model,
            "settings": self.settings,
            "versions": self.versions,
            "sections": [],
        }
        for i, s in enumerate([*self.sections, self.total]):
            key = f"section{i}"
            arrays[f"{key}/bound_curve"] = s.bound_curve.to(torch.int64)
            entry = {
                "name": s.name,
                "n_params": s.n_params,
                "free": s.free,
                "upper_bound": s.upper_bound,
                "details": s.details,
                "llc": None,
            }
            if s.llc is not None:
                entry["llc"] = s.llc.to_json()
                for k, v in s.llc.arrays().items():
                    arrays[f"{key}/llc/{k}"] = v.contiguous()
            if s.calibration is not None:
                entry["calibration"] = s.calibration.to_json()
            meta["sections"].append(entry)
        meta["sensitivity"] = []
        for i, r in enumerate(self.sensitivity):
            meta["sensitivity"].append(r.to_json())
            for k, v in r.arrays().items():
                arrays[f"sensitivity{i}/{k}"] = v.contiguous()
        save_file(arrays, str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=_json_default))

    @classmethod
    def load(cls, path: str | Path) -> DegeneracyReport:
        """Read a report written by `save(path)`: `path` is its stem (`out/report`), either of
        its files, or the folder `tl-degeneracy degeneracy --out` wrote (`out/`)."""
        stem = _stem(path)
        if stem.is_dir() and (stem / "report.json").is_file():
            stem = stem / "report"
        if not stem.with_suffix(".json").is_file():
            raise FileNotFoundError(
                f"no degeneracy report at {path}: give the stem the report was saved under "
                "(out/report for out/report.json and out/report.safetensors) or the folder "
                "`tl-degeneracy degeneracy --out` wrote"
            )
        meta, arrays = _read_report(stem.with_suffix(".json"), stem.with_suffix(".safetensors"))
        with rebuilding(
            stem.with_suffix(".json"), stem.with_suffix(".safetensors"), "degeneracy report"
        ):
            return cls._from_files(meta, arrays)

    @classmethod
    def _from_files(cls, meta: dict[str, Any], arrays: dict[str, Tensor]) -> DegeneracyReport:
        """The report of the JSON and arrays `save` wrote."""

        def result(prefix: str, entry: dict[str, Any]) -> LLCResult:
            parts = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            return LLCResult.from_parts(entry, parts)

        sections = []
        for i, entry in enumerate(meta["sections"]):
            key = f"section{i}"
            llc = result(f"{key}/llc/", entry["llc"]) if entry["llc"] is not None else None
            cal = entry.get("calibration")
            sections.append(
                SectionReport(
                    entry["name"],
                    entry["n_params"],
                    entry["free"],
                    entry["upper_bound"],
                    arrays[f"{key}/bound_curve"],
                    llc,
                    entry["details"],
                    CalibratedLLC.from_json(cal, llc) if cal is not None else None,
                )
            )
        sensitivity = [
            result(f"sensitivity{i}/", entry) for i, entry in enumerate(meta.get("sensitivity", []))
        ]
        return cls(
            sections[:-1],
            sections[-1],
            meta["eps"],
            meta["cutoff"],
            arrays["eps_grid"].tolist(),
            meta["n_data"],
            meta["model"],
            meta["settings"],
            meta["versions"],
            sensitivity,
        )


def _read_report(json_path: Path, tensor_path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A saved report's JSON object (of `REPORT_FORMAT`) and arrays, or an `ArtifactError`
    naming the damaged file."""
    fix = "restore it or build the report again (`tl-degeneracy degeneracy`)"
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{json_path} is corrupted (invalid JSON: {e}); {fix}") from e
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"{json_path} is corrupted (a JSON {type(meta).__name__}, not an object); {fix}"
        )
    if meta.get("format") != REPORT_FORMAT:
        found = repr(meta["format"]) if "format" in meta else "missing"
        raise ArtifactError(
            f"{json_path}: 'format' is {found} where a saved degeneracy report has "
            f"{REPORT_FORMAT!r}: this is not a report this version reads, or the file was "
            f"edited; {fix}"
        )
    try:
        arrays = load_file(str(tensor_path))
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{tensor_path} is corrupted ({e}); {fix}") from e
    return meta, arrays


def plot_llc_results(
    results: Mapping[str, LLCResult] | Sequence[LLCResult], path: str | Path | None = None
) -> Figure:
    """Every chain's per-step estimate nβ (L_t − L*) for each SGLD result (burn-in shaded, λ̂
    dashed); a sequence is labelled by step size and nβ, e.g. `[report.total.llc,
    *report.sensitivity]`."""
    from tl_degeneracy.viz.plots import plot_llc_traces

    if not isinstance(results, Mapping):
        results = {f"ε = {r.config.step_size:g}, nβ = {r.nbeta:.4g}": r for r in results}
    return plot_llc_traces(
        {k: r.llc_traces.numpy() for k, r in results.items()},
        {k: r.config.n_burnin for k, r in results.items()},
        {k: r.llc for k, r in results.items()},
        path=path,
    )


def _step_text(cfg: Any) -> str:
    """The step size, or the range of per-section step sizes of a preconditioned run."""
    if not cfg.step_scales:
        return f"{cfg.step_size:g}"
    factors = [f for _, f in cfg.step_scales]
    return f"{cfg.step_size * min(factors):g}–{cfg.step_size * max(factors):g}"


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _pm(value: float, se: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.4g} ± {se:.2g}" if math.isfinite(se) else f"{value:.4g}"


def _settings_text(sgld: dict[str, Any] | None, calibration: dict[str, Any] | None) -> str:
    if not sgld:
        return "not run"
    beta = sgld.get("beta")
    beta_text = "1/log n (n: loss terms, rows × read positions)" if beta is None else f"{beta:g}"
    common = f"γ = {sgld['gamma']:g}, β = {beta_text}, {sgld['n_chains']} chains"
    if calibration:
        grid = ", ".join(f"{e:g}" for e in calibration["step_sizes"])
        return (
            f"calibrated per estimate: ε from {grid}"
            f" by pilots of {calibration['pilot_steps']} steps, {common} × "
            f"{sgld['n_steps']} steps doubled while R-hat > {sgld['rhat_max']:g} (at most "
            f"{calibration['max_steps']}), batch {sgld['batch_size']}"
        )
    return (
        f"ε = {sgld['step_size']:g}, {common} × {sgld['n_steps']} steps ({sgld['n_burnin']} "
        f"burn-in), batch {sgld['batch_size']}"
    )


def _setting_cell(section: SectionReport) -> str:
    """The estimate's ε, γ and steps; without one, the γ its calibration last tried."""
    llc, cal = section.llc, section.calibration
    if llc is not None:
        return f"{_step_text(llc.config)}, {llc.config.gamma:g}, {llc.config.n_steps}"
    if cal is not None and cal.higher_gammas:
        return f"none at γ = {cal.higher_gammas[-1]['gamma_low']:g}"
    return "—"
