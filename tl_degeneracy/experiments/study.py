"""The main job for any model: LIB and PCA at a list of sites, edges, node-ablation curves and
the report, through the engine's fit pipeline (`engine.fit`).

One Gram pass collects every site's statistics and keeps the inputs of the sections that read
activations in a store; then, backwards from the final site, each section's `M'` is streamed
by its structure (block-local on a `HookedTransformer`); edges on the first rows of the data
reuse the store; node ablation runs on held-out data. Every pass is checkpointed under
`work_dir` (resume by running again with the same folder) and shards over `torch.distributed`
ranks. Memory does not grow with the number of tokens.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import (
    AblationCurve,
    Metric,
    next_token_loss,
    node_ablation_curve,
)
from tl_degeneracy.engine.artifacts import build_metadata, jsonable
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.distributed import DistContext, restored
from tl_degeneracy.engine.edges import EdgeConfig, InteractionGraph, edges_key, section_edges
from tl_degeneracy.engine.fit import (
    LIBConfig,
    StoreMode,
    _lib_sections,
    bases_pass,
    gram_pass,
    open_fit,
    store_sites,
)
from tl_degeneracy.engine.jacobians import JacobianConfig, checkpoint_key
from tl_degeneracy.engine.progress import Log
from tl_degeneracy.engine.sites import Site, SiteLike, validate_sites
from tl_degeneracy.engine.streaming import Checkpointing, iter_batches
from tl_degeneracy.viz.report_artifacts import ViewError, expect, read_view, within


@dataclass(frozen=True)
class StudyConfig:
    """Settings of the job. The defaults are the language-model demo's (see
    docs/language_models.md)."""

    kinds: tuple[Literal["lib", "pca"], ...] = ("lib", "pca")
    final_basis: Literal["raw", "pca"] = "pca"
    """Coordinates of the final site for LIB: its PCA basis (a residual stream) or raw (logits)."""
    truncation: Truncation = field(default_factory=lambda: Truncation(1e-15, 1e-10))
    """Relative cut-off 1e-10: float32 activations leave rounding-level directions that
    whitening would amplify (docs/concepts.md)."""
    jacobian: JacobianConfig = field(
        default_factory=lambda: JacobianConfig(method="stochastic", n_sources=4)
    )
    batch_rows: int = 8
    """Sequences per batch (the unit of streaming, checkpointing and sharding)."""
    edge_tokens: int = 128
    """Tokens (first rows of the data) for the edges; 0 skips edges."""
    edge_outputs: int | None = 16
    """Edges into the top `edge_outputs` output features of each section (None: all); into
    the first coordinates of a raw site, whose columns are not sorted (`SiteBasis.truncated`)."""
    edges: EdgeConfig = field(default_factory=lambda: EdgeConfig(method="stochastic"))
    ablation_tokens: int = 256
    """Held-out tokens for node-ablation curves; 0 skips them."""
    ablation_sites: tuple[str, ...] | None = None
    """Hook names to ablate at (None: three sites spread over the model)."""
    ablation_ks: tuple[int, ...] | None = (0, 4, 16, 64, 128, 256, 384, 512, 576)
    """Kept-feature counts (None: the dense-then-geometric schedule)."""
    store: StoreMode = "auto"
    checkpoint_every: int = 4
    progress: bool = True
    stats_device: str | None = None

    def __post_init__(self) -> None:
        for name, value in (
            ("batch_rows", self.batch_rows),
            ("checkpoint_every", self.checkpoint_every),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for kind in self.kinds:  # LIBConfig names a final basis, store or device out of range
            if kind not in ("lib", "pca"):
                raise ValueError(f"kinds must be lib and/or pca; got {kind!r}")
            replace(self.lib_config((), kind), store=self.store, stats_device=self.stats_device)
        for name, value in (
            ("edge_tokens", self.edge_tokens),
            ("ablation_tokens", self.ablation_tokens),
        ):
            if value < 0:
                raise ValueError(f"{name} must be 0 (skip) or more, got {value}")
        if self.edge_outputs is not None and self.edge_outputs < 1:
            raise ValueError(
                f"edge_outputs must be at least 1 (None: all), got {self.edge_outputs}"
            )

    def lib_config(self, sites: Sequence[Site], kind: str) -> LIBConfig:
        return LIBConfig(
            tuple(sites),
            kind=kind,  # type: ignore[arg-type]
            final_basis=self.final_basis,
            truncation=self.truncation,
            jacobian=self.jacobian,
            batch_size=self.batch_rows,
            progress=self.progress,
        )


@dataclass
class Study:
    """Bases, interaction graphs, ablation curves and timings of one run."""

    config: StudyConfig
    bases: dict[str, BasisResult]
    graphs: dict[str, InteractionGraph]
    curves: dict[str, dict[str, AblationCurve]]
    """{site: {kind: curve}}"""
    timings: dict[str, float]
    n_tokens: int
    jacobian_errors: dict[str, float | None]
    """Split-half relative error of each LIB `M'` (None: one batch, no estimate)."""
    used_store: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def edges(self) -> dict[str, dict[str, Any]]:
        """{kind: {section: SectionEdges}}."""
        return {k: g.sections for k, g in self.graphs.items()}

    def save(self, path: str | Path) -> Path:
        """`bases/<kind>/`, `graphs/<kind>/`, `curves/<site>__<kind>/`, `study.json`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for kind, result in self.bases.items():
            result.save(out / "bases" / kind)
        for kind, graph in self.graphs.items():
            graph.save(out / "graphs" / kind, basis_path=out / "bases" / kind)
        curves: list[dict[str, str]] = []
        for site, by_kind in self.curves.items():
            for kind, curve in by_kind.items():
                folder = f"{len(curves):03d}_{kind}"
                curve.save(out / "curves" / folder)
                curves.append({"site": site, "kind": kind, "folder": folder})
        record = {
            "config": jsonable(self.config),
            "timings_s": self.timings,
            "n_tokens": self.n_tokens,
            "jacobian_errors": self.jacobian_errors,
            "used_store": self.used_store,
            "curves": curves,
            "metadata": self.metadata,
        }
        (out / "study.json").write_text(json.dumps(record, indent=1, allow_nan=False))
        return out

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Study:
        """A study written by `save` (no refit)."""
        out = Path(path)
        record = read_view(out / "study.json", _study_record, STUDY_FIX)
        kinds = [p.name for p in sorted((out / "bases").iterdir())]
        bases = {k: BasisResult.load(out / "bases" / k, model) for k in kinds}
        graphs = (
            {
                p.name: InteractionGraph.load(p, model)
                for p in sorted((out / "graphs").iterdir())
                if (out / "graphs").exists()
            }
            if (out / "graphs").exists()
            else {}
        )
        curves: dict[str, dict[str, AblationCurve]] = {}
        for entry in record["curves"]:
            curve = AblationCurve.load(out / "curves" / entry["folder"], model)
            curves.setdefault(entry["site"], {})[entry["kind"]] = curve
        config = _config_from_json(record["config"])
        return cls(
            config,
            bases,
            graphs,
            curves,
            record["timings_s"],
            record["n_tokens"],
            record["jacobian_errors"],
            record["used_store"],
            record.get("metadata", {}),
        )


STUDY_FIX = (
    "restore the file the run wrote (tl-degeneracy report re-renders what fit wrote), or run "
    "the fit again into this folder"
)
"""The fix a damaged `study.json` names."""


def _study_record(record: Any) -> dict[str, Any]:
    """A `study.json` record that `Study.load` can read, else a `ViewError` naming the entry
    (the settings as an object of `StudyConfig` fields, the curves as a list of
    `{site, kind, folder}`, the counts and timings)."""
    expect(record, dict)
    kinds = {
        "config": dict,
        "timings_s": dict,
        "n_tokens": int,
        "jacobian_errors": dict,
        "used_store": bool,
        "curves": list,
    }
    for key, kind in kinds.items():
        if key not in record:
            raise ViewError("is missing", (key,))
        expect(record[key], kind, key)
    expect(record.get("metadata", {}), dict, "metadata")
    known = [f.name for f in fields(StudyConfig)]
    for key in record["config"]:
        if key not in known:
            raise ViewError(
                f"is not a setting (StudyConfig has {', '.join(known)})", ("config", key)
            )
    with within("config"):
        _config_from_json(record["config"])
    for i, entry in enumerate(record["curves"]):
        expect(entry, dict, "curves", i)
        for key in ("site", "kind", "folder"):
            expect(entry.get(key), str, "curves", i, key)
        if Path(entry["folder"]).name != entry["folder"]:
            raise ViewError("is not a folder name in curves/", ("curves", i, "folder"))
    return record


def _config_from_json(d: dict[str, Any]) -> StudyConfig:
    d = dict(d)
    d["truncation"] = Truncation(**d["truncation"])
    d["jacobian"] = JacobianConfig(**d["jacobian"])
    d["edges"] = EdgeConfig(**d["edges"])
    d["kinds"] = tuple(d["kinds"])
    for key in ("ablation_sites", "ablation_ks"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return StudyConfig(**d)


def default_ablation_sites(sites: Sequence[Site], n: int = 3) -> list[Site]:
    """`n` sites spread over the fitted ones (the final site excluded), preferring
    `hook_resid_mid`."""
    inner = list(sites[:-1])
    mids = [s for s in inner if s.hook.endswith("hook_resid_mid")] or inner
    if len(mids) <= n:
        return mids
    step = len(mids) / n
    return [mids[int(step * (i + 0.5))] for i in range(n)]


def run_study(
    model: nn.Module,
    sites: Sequence[SiteLike],
    tokens: Int[Tensor, "n pos"],
    config: StudyConfig | None = None,
    work_dir: str | Path | None = None,
    heldout: Int[Tensor, "m pos"] | None = None,
    metric: Metric = next_token_loss,
    higher_is_better: bool = False,
    ctx: DistContext | None = None,
    log: Log = print,
) -> Study:
    """Fit `config.kinds` at `sites`, stream edges on the first rows and ablate on `heldout`.

    `work_dir` holds checkpoints and a disk store (resume by calling again with the same
    folder); None computes without checkpoints."""
    config = config or StudyConfig()
    ctx = ctx or DistContext()
    resolved = validate_sites(model, sites)
    sections = _lib_sections(resolved, "lib") if "lib" in config.kinds else []
    settings = {k: v for k, v in vars(config).items() if k not in ("progress", "ablation_ks")}
    state = open_fit(
        model,
        tokens,
        resolved,
        sections,
        settings,
        config.batch_rows,
        None if work_dir is None else Path(work_dir) / "checkpoints",
        config.checkpoint_every,
        config.store,
        config.stats_device,
        config.progress,
        ctx,
        log,
    )
    bases: dict[str, BasisResult] = {}
    graphs: dict[str, InteractionGraph] = {}
    try:
        stats = gram_pass(state, resolved, store_sites(model, sections))
        for kind in config.kinds:
            bases[kind] = bases_pass(state, resolved, stats, config.lib_config(resolved, kind))
        jerrors = dict(bases["lib"].metadata.get("jacobian_errors", {})) if "lib" in bases else {}
        if config.edge_tokens > 0:
            graphs = _graphs(model, state, bases, config, tokens)
    finally:
        state.close()
    curves: dict[str, dict[str, AblationCurve]] = {}
    if heldout is not None and config.ablation_tokens > 0 and ctx.is_main:
        curves = _ablation_curves(
            model,
            heldout,
            bases,
            config,
            resolved,
            metric,
            higher_is_better,
            state.clock,
            state.checkpoint,
        )
    timings = dict(state.clock.timings)
    meta = build_metadata(model, resolved, n_tokens=stats.n_tokens, site_counts=stats.site_counts)
    used_store = state.source.store is not None
    return Study(config, bases, graphs, curves, timings, stats.n_tokens, jerrors, used_store, meta)


def _graphs(model, state, bases, config, tokens) -> dict[str, InteractionGraph]:
    """Edges of every section and kind on the first `edge_tokens` tokens (from the store)."""
    rows = -(-config.edge_tokens // tokens.shape[1])
    edge_tokens = torch.cat(state.batches)[:rows]
    graphs: dict[str, InteractionGraph] = {}
    state.clock.begin("edges")
    total = sum(len(r.bases) - 1 for r in bases.values())
    done = 0
    for kind, result in bases.items():
        names = list(result.bases)
        sections = {}
        for a, b in zip(names[::-1][1:], names[::-1][:-1]):  # backwards, like the M' passes
            b_in, b_out = result.bases[a], result.bases[b]
            if config.edge_outputs is not None:
                b_out = b_out.truncated(config.edge_outputs)
            key, n_batches = edges_key(b_in, b_out), -(-len(edge_tokens) // config.batch_rows)
            was_saved = restored(state.checkpoint, key, n_batches, state.ctx)
            se = section_edges(
                model,
                edge_tokens,
                b_in,
                b_out,
                config.edges,
                config.batch_rows,
                state.checkpoint,
                state.progress,
                state.source,
                state.ctx,
            )
            sections[se.section.name] = se
            done += 1
            state.clock.step("edges", done, total, f"{kind} {se.section.name}", was_saved)
        ordered = dict(reversed(list(sections.items())))
        meta = build_metadata(model, result.sites, kind=kind, edges=config.edges)
        graphs[kind] = InteractionGraph(result, ordered, metadata=meta)
    state.clock.end("edges")
    return graphs


def _ablation_curves(
    model, heldout, bases, config, sites, metric, higher_is_better, clock, checkpoint=None
) -> dict[str, dict[str, AblationCurve]]:
    """Node-ablation curves at the chosen sites for every kind. With `checkpoint` (the run's
    stamped folder), each finished curve is saved there and read back by a resumed run."""
    rows = max(1, config.ablation_tokens // heldout.shape[1])
    data = iter_batches(heldout[:rows], rows, model)[0]
    by_hook = {s.hook: s.name for s in sites}
    if config.ablation_sites is not None:
        chosen = [by_hook[h] for h in config.ablation_sites if h in by_hook]
    else:
        chosen = [s.name for s in default_ablation_sites(sites)]
    curves: dict[str, dict[str, AblationCurve]] = {}
    clock.begin("ablation")
    for n, site in enumerate(chosen, start=1):
        curves[site] = {}
        all_read = True
        for kind, result in bases.items():
            saved = None if checkpoint is None else _ablation_folder(checkpoint, kind, site)
            if saved is not None and (saved / "metadata.json").is_file():
                curves[site][kind] = AblationCurve.load(saved)
                continue
            all_read = False
            basis = result.bases[site]
            ks = None
            if config.ablation_ks is not None:
                ks = sorted({min(k, basis.k) for k in config.ablation_ks})
            curves[site][kind] = node_ablation_curve(
                model,
                {site: basis},
                site,
                data,
                metric,
                ks,
                batch_size=config.batch_rows,
                higher_is_better=higher_is_better,
                progress=config.progress,
            )
            if saved is not None:
                curves[site][kind].save(saved)
        clock.step("ablation", n, len(chosen), site, all_read and checkpoint is not None)
    clock.end("ablation")
    return curves


def _ablation_folder(checkpoint: Checkpointing, kind: str, site: str) -> Path:
    """Where a checkpointed run keeps a finished ablation curve."""
    return Path(checkpoint.path) / "ablation" / checkpoint_key(f"{kind}.{site}")


def finish_timings(study: Study, start: float) -> None:
    """Add the whole run's wall and CPU seconds to the study's timings."""
    study.timings["load_s"] = time.perf_counter() - start - sum(study.timings.values())
    study.timings["total_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    study.timings["cpu_total_s"] = usage.ru_utime + usage.ru_stime


__all__ = [
    "Study",
    "StudyConfig",
    "default_ablation_sites",
    "finish_timings",
    "run_study",
]
