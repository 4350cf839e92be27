"""`DegeneracyReport`: the degeneracy of a model per section and in total (Paper A).

For every section (embedding, each attention layer, each MLP, unembedding) and for the whole
model: the nominal parameter count N, the free directions found by the three sources at the
cutoff ε, the upper bound `N − free` on the effective parameter count, the SGLD estimate
`N_eff = 2λ̂ ± se` of the behavioural loss restricted to the section, and how the bound moves
with ε. Saved as JSON (numbers, settings) + safetensors (arrays); no pickle.
"""

from __future__ import annotations

import copy
import html
import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.degeneracy.llc import (
    Divergence,
    LLCResult,
    ModelProblem,
    ModularityResult,
    SGLDConfig,
    estimate_llc,
    model_llc,
    sensitivity_grid,
)
from tl_degeneracy.engine.degeneracy.sources import (
    SourcesConfig,
    SourcesResult,
    measure_sources,
    section_filter,
)
from tl_degeneracy.engine.identity import model_identity
from tl_degeneracy.viz.html import HtmlPage, table, text
from tl_degeneracy.viz.plots import figure_to_html, plot_llc_traces

SOURCE_KEYS = ("activations", "gradients", "joint", "synchronised", "dead", "total")


@dataclass
class SectionReport:
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

    @property
    def n_eff(self) -> float:
        return self.llc.n_eff if self.llc is not None else math.nan

    @property
    def n_eff_se(self) -> float:
        return self.llc.n_eff_se if self.llc is not None else math.nan


@dataclass
class DegeneracyReport:
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
    def modularity(self) -> ModularityResult | None:
        """Whole-model λ̂ against the sum of the sections' λ̂ (independent sections add)."""
        parts = {s.name: s.llc for s in self.sections if s.llc is not None}
        if self.total.llc is None or len(parts) < len(self.sections):
            return None
        return ModularityResult(self.total.llc, parts)

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
                    "SGLD N_eff = 2λ̂": _pm(2 * llc.llc, 2 * llc.llc_se) if llc else "—",
                    "R-hat": f"{llc.rhat:.3f}" if llc else "—",
                }
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

    def to_markdown(self) -> str:
        rows = self.rows()
        head = list(rows[0])
        lines = [
            f"# Degeneracy report ({html.escape(str(self.model.get('model_name', 'model')))})",
            "",
            f"{self.n_data} data points; cutoff ε = {self.eps:g} ({self.cutoff}); SGLD "
            f"{_settings_text(self.settings.get('sgld'))}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
        mod = self.modularity
        if mod is not None:
            lines += ["", f"Modularity: {mod.summary()}."]
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
        parts += ["</table>", "</div>"]
        return "\n".join(parts)

    def html_page(self) -> HtmlPage:
        """A self-contained page: the summary table, the bound against ε, the per-map counts,
        the SGLD settings and diagnostics (all text escaped)."""
        name = str(self.model.get("model_name", "model"))
        page = HtmlPage(
            f"Degeneracy report: {name}",
            f"{self.n_data} data points; cutoff ε = {self.eps:g} ({self.cutoff}); SGLD "
            f"{_settings_text(self.settings.get('sgld'))}.",
        )
        page.add("Per section and in total", table(self.rows()))
        mod = self.modularity
        if mod is not None:
            page.add("Modularity", text(mod.summary(), "p"))
        grid = [f"{e:.0e}" for e in self.eps_grid]
        curve_rows = [
            {"section": s.name, **{g: int(v) for g, v in zip(grid, s.bound_curve)}}
            for s in [*self.sections, self.total]
        ]
        page.add("Upper bound N − free against the cutoff ε", table(curve_rows))
        detail_rows = []
        for s in self.sections:
            for key, d in s.details.items():
                if "k" in d:
                    detail_rows.append({"section": s.name, "map": key, **d})
                else:
                    detail_rows.append({"section": s.name, "map": key, "groups": str(d)})
        if detail_rows:
            columns = list(dict.fromkeys(k for r in detail_rows for k in r))
            page.add("Weight maps and groups", table(detail_rows, columns))
        llc_rows = [
            {"section": s.name, "estimate": s.llc.summary(), "messages": "; ".join(s.llc.messages)}
            for s in [*self.sections, self.total]
            if s.llc is not None
        ]
        if llc_rows:
            runs = {s.name: s.llc for s in [*self.sections, self.total] if s.llc is not None}
            fig = plot_llc_results(runs)
            page.add(
                "SGLD diagnostics",
                table(llc_rows),
                figure_to_html(fig, "per-step LLC traces of every chain"),
                description="Every chain's nβ (L_t − L*) per step; burn-in shaded, λ̂ dashed. "
                "Converged chains agree and are flat after the burn-in.",
            )
        if self.sensitivity:
            fig = plot_llc_results(([self.total.llc] if self.total.llc else []) + self.sensitivity)
            page.add(
                "Sensitivity of λ̂ to the step size and the inverse temperature",
                table(self.sensitivity_rows()),
                figure_to_html(fig, "traces over the sensitivity grid"),
                description="The total's estimate at other SGLD settings. Estimates that move "
                "with ε mean the step size is too large (or the chains too short); λ̂ moves "
                "slowly with nβ in singular models (a −(m − 1)/log nβ term).",
            )
        return page

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
            "format": "tl_degeneracy.DegeneracyReport/1",
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
        stem = _stem(path)
        meta = json.loads(stem.with_suffix(".json").read_text())
        arrays = load_file(str(stem.with_suffix(".safetensors")))
        sections = []
        for i, entry in enumerate(meta["sections"]):
            key = f"section{i}"
            llc = None
            if entry["llc"] is not None:
                prefix = f"{key}/llc/"
                parts = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                llc = LLCResult.from_parts(entry["llc"], parts)
            sections.append(
                SectionReport(
                    entry["name"],
                    entry["n_params"],
                    entry["free"],
                    entry["upper_bound"],
                    arrays[f"{key}/bound_curve"],
                    llc,
                    entry["details"],
                )
            )
        sensitivity = []
        for i, entry in enumerate(meta.get("sensitivity", [])):
            prefix = f"sensitivity{i}/"
            parts = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            sensitivity.append(LLCResult.from_parts(entry, parts))
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


def plot_llc_results(
    results: Mapping[str, LLCResult] | Sequence[LLCResult], path: str | Path | None = None
) -> Figure:
    """Every chain's per-step estimate nβ (L_t − L*) for each SGLD result (burn-in shaded, λ̂
    dashed); a sequence is labelled by step size and nβ, e.g. `[report.total.llc,
    *report.sensitivity]`."""
    if not isinstance(results, Mapping):
        results = {f"ε = {r.config.step_size:g}, nβ = {r.nbeta:.4g}": r for r in results}
    return plot_llc_traces(
        {k: r.llc_traces.numpy() for k, r in results.items()},
        {k: r.config.n_burnin for k, r in results.items()},
        {k: r.llc for k, r in results.items()},
        path=path,
    )


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj)
    return str(obj)


def _pm(value: float, se: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.4g} ± {se:.2g}" if math.isfinite(se) else f"{value:.4g}"


def _settings_text(sgld: dict[str, Any] | None) -> str:
    if not sgld:
        return "not run"
    beta = sgld.get("beta")
    return (
        f"ε = {sgld['step_size']:g}, γ = {sgld['gamma']:g}, β = "
        f"{'1/log n' if beta is None else f'{beta:g}'}, {sgld['n_chains']} chains × "
        f"{sgld['n_steps']} steps ({sgld['n_burnin']} burn-in), batch {sgld['batch_size']}"
    )


def _versions() -> dict[str, str]:
    out: dict[str, str] = {"torch": str(torch.__version__)}
    for pkg in ("transformer-lens", "tl_degeneracy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def section_report(
    sources: SourcesResult, section: str | None, llc: LLCResult | None = None
) -> SectionReport:
    """Summarise the sources of one section (None: the whole model) into a `SectionReport`."""
    names = sources.sections if section is None else [section]
    free = {k: 0 for k in SOURCE_KEYS}
    for name in names:
        for k, v in sources.section_free(name).items():
            free[k] += v
    details: dict[str, Any] = {}
    eps, cut = sources.config.eps, sources.config.cutoff
    for m in sources.maps:
        if m.map.section in names:
            details[m.map.name] = {
                **m.free(eps, cut),
                "d_in": m.map.d_in,
                "d_out": m.map.d_out,
                "input_site": m.map.input_site,
                "output_site": m.map.output_site,
            }
    for name in names:
        if name in sources.neurons:
            g = sources.neurons[name]
            details[f"{name}/neurons"] = {
                "dead": g.n_dead,
                "always_on": g.n_always_on,
                "switch_neurons": g.n_eligible,
                "group_sizes": g.group_sizes,
            }
        if name in sources.heads:
            details[f"{name}/heads"] = {"groups": sources.heads[name].groups}
    n_params = sum(sources.section_params[n] for n in names)
    return SectionReport(
        name=section or "total",
        n_params=n_params,
        free=free,
        upper_bound=sources.upper_bound(section),
        bound_curve=sources.bound_curve(section),
        llc=llc,
        details=details,
    )


def degeneracy_report(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    sources_config: SourcesConfig | None = None,
    sgld_config: SGLDConfig | None = None,
    llc: Literal["all", "total", "none"] = "all",
    sections: Sequence[str] | None = None,
    divergence: Divergence = "kl",
    sgld_dtype: torch.dtype | None = None,
    sensitivity_step_sizes: Sequence[float] = (),
    sensitivity_nbetas: Sequence[float | None] = (None,),
    progress: bool = False,
) -> DegeneracyReport:
    """Measure the three sources and the SGLD LLC of a TransformerLens model on `tokens`.

    `llc`: "all" runs SGLD for every section (restricted to its parameters) and for the whole
    model, "total" only for the whole model, "none" skips SGLD. `sections` limits the report
    to some sections (names like "blocks.15.mlp"): only their sources are measured, and the
    total (its counts and its SGLD run) covers those sections together, the rest of the model
    held at the trained weights — how a language model's report stays tractable.
    The behavioural loss reads the positions `sources_config.positions`. `sgld_dtype` runs
    SGLD on a copy of the model in that dtype (float32 is twice as fast as float64 on a CPU;
    the sources always accumulate in float64, so give them a float64 model).
    `sensitivity_step_sizes` × `sensitivity_nbetas` (None: n / log n) re-estimates the
    total's λ̂ at each other setting (`sensitivity_grid`; the report's own setting is skipped).
    `progress` shows a tqdm bar per SGLD run.
    """
    sources_config = sources_config or SourcesConfig()
    sgld_config = sgld_config or SGLDConfig()
    sources = measure_sources(model, tokens, sources_config, sections=sections)
    names = sources.sections
    positions = sources_config.positions
    sampled = model
    if sgld_dtype is not None and sgld_dtype != next(model.parameters()).dtype:
        sampled = copy.deepcopy(model).to(sgld_dtype)

    def run(params: str | None) -> LLCResult:
        return model_llc(sampled, tokens, sgld_config, params, positions, divergence, progress)

    reports = [
        section_report(sources, n, run(section_filter(n)) if llc == "all" else None) for n in names
    ]
    union = None if sections is None else "|".join(f"(?:{section_filter(n)})" for n in names)
    problem = None  # the total's loss, built once for its own estimate and the grid
    if llc in ("all", "total") or sensitivity_step_sizes:
        problem = ModelProblem(sampled, tokens, union, positions, divergence)
    own = (
        estimate_llc(problem, sgld_config, progress)
        if problem is not None and llc != "none"
        else None
    )
    total = section_report(sources, None, own)
    grid = []
    if sensitivity_step_sizes and problem is not None:
        grid = sensitivity_grid(
            problem,
            sgld_config,
            sensitivity_step_sizes,
            sensitivity_nbetas,
            progress,
            skip_own=True,
        )
    src_settings = {
        k: v for k, v in asdict(sources_config).items() if k not in ("metric", "eps_grid")
    }
    src_settings["metric"] = None if sources_config.metric is None else repr(sources_config.metric)
    return DegeneracyReport(
        sections=reports,
        total=total,
        eps=sources_config.eps,
        cutoff=sources_config.cutoff,
        eps_grid=list(sources_config.eps_grid),
        n_data=int(tokens.shape[0]),
        model=model_identity(model),
        settings={
            "sources": src_settings,
            "sgld": asdict(sgld_config) if llc != "none" else None,
            "divergence": divergence,
            "sgld_dtype": str(sgld_dtype or next(model.parameters()).dtype),
            "act_fn": sources.act_fn,
            "sections": None if sections is None else list(names),
        },
        versions=_versions(),
        sensitivity=grid,
    )
