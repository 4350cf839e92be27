"""The fit pipeline: PCA, neuron, LIB or IB bases at a list of sites, for any model
(docs/concepts.md, "Bases").

Data flows one way: Gram statistics at every site in one streamed pass (which also fills an
activation store with the inputs of the sections that read activations, see `engine.store`);
then, for LIB, the Jacobian Grams backwards from the final site, each section using the next
site's basis; for IB, every site's Jacobian Gram to the final site. Each section's `M'` is
computed by its structure (`engine.structures`). Every pass shows progress, checkpoints and
resumes (`checkpoint_dir`), and shards over `torch.distributed` ranks (`ctx`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import build_metadata, compare_model, jsonable
from tl_degeneracy.engine.bases import (
    SiteBasis,
    Truncation,
    interaction_basis,
    neuron_basis,
    pca_basis,
)
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.checks import whole_number
from tl_degeneracy.engine.compat import model_device, model_dtype, usable_device
from tl_degeneracy.engine.distributed import (
    DistContext,
    merge_gram_states,
    restored,
    stream_sharded,
    sum_states,
)
from tl_degeneracy.engine.identity import model_identity
from tl_degeneracy.engine.jacobians import (
    JacobianConfig,
    JacobianGram,
    describe_error,
    finish_jacobian_gram,
    jacobian_key,
)
from tl_degeneracy.engine.progress import JobClock, Log, quiet
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site, SiteLike, validate_sites
from tl_degeneracy.engine.statistics import (
    GramAccumulator,
    GramStatistics,
    StatisticsMismatchError,
)
from tl_degeneracy.engine.store import ActivationSource, ActivationStore
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    claim_checkpoint_folder,
    data_fingerprint,
    iter_batches,
)

Kind = Literal["lib", "ib", "pca", "neuron"]
StoreMode = Literal["auto", "memory", "disk", "off"]

RESULT_NEUTRAL = frozenset({"checkpoint_dir", "checkpoint_every", "progress"})
"""Settings that change how a run saves or shows its progress, not its result: a checkpoint
folder's fingerprint leaves them out, so a resume may change them."""

MEMORY_STORE_BYTES = 2 * 2**30
"""`store="auto"` keeps activations in host memory below this size, on disk above it (on a GPU
the budget is half its free memory, see `memory_budget`)."""


@dataclass(frozen=True)
class LIBConfig:
    """What to fit and how. The defaults reproduce the reference implementation."""

    sites: tuple[SiteLike, ...]
    """Sites in forward order; the last one is the final site (e.g. "logits")."""
    kind: Kind = "lib"
    final_basis: Literal["raw", "pca"] = "raw"
    """Coordinates of the final site: raw (e.g. logits) or its PCA basis."""
    truncation: Truncation = field(default_factory=Truncation)
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    batch_size: int = 256
    """Rows per batch: a token tensor is split into batches of this many rows, and so is any
    larger item of an iterable of batches (`streaming.iter_batches`); smaller items are kept."""
    checkpoint_dir: str | None = None
    """Save progress here every `checkpoint_every` batches and resume from it (a folder of
    other settings, model or data is refused, naming what differs)."""
    checkpoint_every: int = 10
    """How often to save; it does not change the result, so a resume may change it."""
    progress: bool = True
    store: StoreMode = "auto"
    """Where section inputs are kept between passes: in memory, on disk (under
    `checkpoint_dir`, else a temporary folder), 'auto' (memory when small), or 'off'
    (re-run the model to reach each section)."""
    stats_device: str | None = None
    """Where float64 statistics live (the model's device by default; 'cpu' to spare it)."""

    def __post_init__(self) -> None:
        if isinstance(self.sites, (str, Site)):
            raise TypeError(
                f"sites must be a sequence of sites in forward order, got one: {self.sites!r}; "
                "pass (site, ..., final_site)"
            )
        object.__setattr__(self, "sites", tuple(self.sites))
        for name, value, allowed in (
            ("kind", self.kind, get_args(Kind)),
            ("final_basis", self.final_basis, ("raw", "pca")),
            ("store", self.store, get_args(StoreMode)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.stats_device is not None:
            usable_device(self.stats_device)
        for name in ("batch_size", "checkpoint_every"):
            object.__setattr__(self, name, whole_number(name, getattr(self, name)))


def _lib_sections(sites: list[Site], kind: Kind) -> list[Section]:
    """The sections whose `M'` a fit needs, backwards from the final site."""
    if kind not in ("lib", "ib"):
        return []
    final = sites[-1]
    return [
        Section(sites[i], sites[i + 1] if kind == "lib" else final)
        for i in range(len(sites) - 2, -1, -1)
    ]


def store_sites(model: nn.Module, sections: Sequence[Section]) -> list[Site]:
    """Input sites of the sections whose structures read activations (deduplicated by hook)."""
    from tl_degeneracy.engine.structures import structure_of

    out: dict[str, Site] = {}
    for section in sections:
        if structure_of(model, section).needs_activation:
            out.setdefault(section.inp.hook, section.inp)
    return list(out.values())


def memory_budget(device: torch.device) -> int:
    """Bytes an in-memory store may take on `device`: `MEMORY_STORE_BYTES` of host memory, or
    half the free memory of a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] // 2)
    return MEMORY_STORE_BYTES


def make_store(
    mode: StoreMode,
    sites: Sequence[Site],
    batches: Sequence[Tensor],
    d_of: dict[str, int] | None,
    folder: Path | None,
    elem_size: int,
) -> ActivationStore | None:
    """The store a run uses: none when nothing reads activations or `mode` is 'off'. `auto`
    keeps it in memory when it fits (`memory_budget`), except on the CPU of a run with a
    checkpoint `folder`: there it goes to disk, so that an interrupted run resumes from it
    (a memory store is lost, and the resumed `M'` passes re-ran the model prefix per section:
    35 s against 6 s on SmolLM2). On a GPU the prefix is cheap and memory stays faster."""
    if mode == "off" or not sites:
        return None
    rows = int(batches[0].shape[0])
    if mode == "memory":
        return ActivationStore(None, rows)
    on_gpu = batches[0].device.type == "cuda"
    if mode == "auto" and d_of is not None and (folder is None or on_gpu):
        tokens = sum(int(b.numel()) for b in batches)
        size = sum(tokens * d_of.get(s.name, 0) * elem_size for s in sites)
        if size <= memory_budget(batches[0].device):
            return ActivationStore(None, rows)
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="tl_degeneracy_store_"))
    return ActivationStore(folder, rows)


@dataclass
class FitState:
    """What the passes of one run share: data, checkpoints, store, processes, clock."""

    model: nn.Module
    batches: list[Tensor]
    checkpoint: Checkpointing | None
    source: ActivationSource
    ctx: DistContext
    clock: JobClock
    progress: bool
    stats_device: torch.device
    temp_store: Path | None = None
    """A disk store's temporary folder (no checkpoint folder): removed however the run ends."""
    checkpoint_store: Path | None = None
    """Where this process's disk store lives in the checkpoint folder (whether or not this run
    uses one): kept when the run is interrupted, removed when it completes."""

    def close(self, completed: bool | None = None) -> None:
        """Drop the store once the run has `completed`. An interrupted run (an exception,
        Ctrl-C) keeps a disk store in a checkpoint folder, so that the resumed run reads the
        activations back instead of re-running the model; a temporary or in-memory store
        goes either way. `None` asks whether an exception is propagating (for a `finally`)."""
        if completed is None:
            completed = sys.exc_info()[0] is None
        store = self.source.store
        if store is not None and (completed or store.root != self.checkpoint_store):
            store.clear()
        if completed and self.checkpoint_store is not None:
            shutil.rmtree(self.checkpoint_store, ignore_errors=True)
        if self.temp_store is not None:
            shutil.rmtree(self.temp_store, ignore_errors=True)


def open_fit(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    sites: Sequence[Site],
    sections: Sequence[Section],
    settings: dict[str, Any],
    batch_size: int,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    store: StoreMode = "auto",
    stats_device: str | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
    log: Log = quiet,
) -> FitState:
    """Validate the data, claim the checkpoint folder (refusing one of another run, naming what
    differs) and set up the activation store for `sections`. Settings that do not change the
    result (`RESULT_NEUTRAL`) are left out of the folder's fingerprint."""
    ctx = ctx or DistContext()
    batches = iter_batches(tokens, batch_size, model)
    ckpt = None
    if checkpoint_dir is not None:
        identity = {k: v for k, v in model_identity(model).items() if k != "api"}
        kept = {k: v for k, v in settings.items() if k not in RESULT_NEUTRAL}
        # each process checkpoints its own shard: another process count finds none of them
        # and would silently start over (then delete them), so it is refused instead
        processes = {"world_size": ctx.world_size} if ctx.active and ctx.world_size > 1 else {}
        claim_checkpoint_folder(
            checkpoint_dir,
            {
                "settings": jsonable(kept),
                "sites": [s.to_json() for s in sites],
                "model": identity,
                "model_dtype": str(model_dtype(model)),
                "data": data_fingerprint(batches),
                **processes,
            },
            ctx.barrier if ctx.active else None,
        )
        ckpt = Checkpointing(checkpoint_dir, checkpoint_every)
    needed = store_sites(model, sections)
    widths = _site_widths(model, batches[0], needed) if store == "auto" else None
    folder = None if checkpoint_dir is None else Path(checkpoint_dir) / "activations"
    if folder is not None and ctx.active:
        folder = folder / f"rank{ctx.rank}"
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    act_store = make_store(store, needed, batches, widths, folder, elem)
    temp = None
    if act_store is not None and act_store.root is not None and checkpoint_dir is None:
        temp = act_store.root
    log(
        f"{len(needed)} section input(s) kept in an activation store ({_where(act_store)})"
        if needed
        else "every section runs from the inputs"
    )
    device = torch.device(stats_device) if stats_device else model_device(model)
    return FitState(
        model,
        batches,
        ckpt,
        ActivationSource(model, act_store),
        ctx,
        JobClock(log),
        progress and ctx.is_main,
        device,
        temp,
        folder,
    )


def _where(store: ActivationStore | None) -> str:
    if store is None:
        return "none: re-run from the inputs"
    return "memory" if store.root is None else f"disk, {store.root}"


def _site_widths(model: nn.Module, batch: Tensor, sites: Sequence[Site]) -> dict[str, int]:
    from tl_degeneracy.engine.capture import capture_sites

    if not sites:
        return {}
    acts = capture_sites(model, batch[:1], list(sites), check=False)
    return {s.name: int(a.shape[-1]) for s, a in zip(sites, acts)}


def gram_pass(state: FitState, sites: list[Site], store_for: Sequence[Site]) -> GramStatistics:
    """Statistics of every site in one pass (filling the store with `store_for`)."""
    state.clock.begin("statistics")
    acc = GramAccumulator(state.model, sites, state.stats_device, state.source.store, store_for)
    states = stream_sharded(
        acc, state.batches, "Gram statistics", state.ctx, state.checkpoint, "gram", state.progress
    )
    stats = merge_gram_states(states, GramStatistics(sites), state.stats_device)
    if stats.count == 0:
        raise EmptyDataError("no tokens reached the sites")
    state.clock.step("statistics", 1, 1, f"{len(sites)} sites, {stats.n_tokens} tokens")
    state.clock.end("statistics")
    stats.metadata = build_metadata(
        state.model, sites, n_tokens=stats.n_tokens, site_counts=stats.site_counts
    )
    return stats


def jacobian_pass(
    state: FitState, section: Section, out_basis: Tensor | None, config: JacobianConfig
) -> JacobianGram:
    """`M'` of one section over the run's data (sharded, checkpointed, from the store)."""
    from tl_degeneracy.engine.structures import structure_of

    acc = structure_of(state.model, section).jacobian_accumulator(out_basis, config, state.source)
    states = stream_sharded(
        acc,
        state.batches,
        f"M' {section.name} ({acc.method()})",
        state.ctx,
        state.checkpoint,
        jacobian_key(section),
        state.progress,
    )
    if state.ctx.active:
        acc.load_state_dict(sum_states([s for s in states if s]))
    return finish_jacobian_gram(acc)


def final_basis(stats: GramStatistics, site: Site, config: LIBConfig) -> SiteBasis:
    st = stats[site]
    if config.kind in ("lib", "ib") and config.final_basis == "raw":
        eye = torch.eye(st.d, dtype=torch.float64, device=st.mean.device)
        d_all, _ = st.eigh()
        return SiteBasis(site, "raw", eye, eye.clone(), torch.diagonal(st.gram), st.mean, d_all)
    if config.kind == "neuron":
        return neuron_basis(site, st.mean, st.gram)
    return pca_basis(site, st.mean, st.gram, config.truncation)


def check_statistics(model: nn.Module, stats: GramStatistics, sites: Sequence[Site]) -> None:
    """Refuse statistics that cannot serve a fit of `model` at `sites`: computed on another
    model (as a saved result is checked, `artifacts.compare_model`), or lacking a site."""
    problem, caveat = compare_model(stats.metadata, model, "GramStatistics")
    if problem is not None:
        raise StatisticsMismatchError(f"the statistics passed to fit_basis: {problem}")
    if caveat is not None:
        warnings.warn(caveat, UserWarning, stacklevel=3)
    missing = [s.name for s in sites if s.name not in stats.per_site]
    if missing:
        raise StatisticsMismatchError(
            f"the statistics passed to fit_basis have no site {', '.join(missing)} (they hold "
            f"{list(stats.per_site)}): collect statistics at all of config.sites, "
            "collect_statistics(model, config.sites, tokens), or fit at the sites they hold"
        )


def _check_count(stats: GramStatistics, site: Site, jacobian: JacobianGram) -> None:
    """Given statistics and the fit's tokens must count the same token positions at a site:
    the one check that they come from the same data (no digest of the data is kept, so other
    tokens of the same count pass)."""
    counted = stats[site].count
    if jacobian.count != counted:
        raise StatisticsMismatchError(
            f"the statistics passed to fit_basis count {counted} token positions at "
            f"{site.name}, but the tokens given to it count {jacobian.count} there: statistics "
            "must be collected on the tokens of the fit; collect them with "
            "collect_statistics(model, config.sites, tokens), or fit on their tokens"
        )


WIDE_SOLVE = 1024
"""Sites at least this wide say so before their basis is solved: the eigendecompositions grow
as the cube of the width (a few seconds at an MLP site of 2,000 units on one core) and run
after the `M'` pass's bar has closed."""


def bases_pass(
    state: FitState,
    sites: list[Site],
    stats: GramStatistics,
    config: LIBConfig,
    given: bool = False,
) -> BasisResult:
    """The bases of `config.kind` from the statistics (and, for LIB/IB, the `M'` passes).
    With `given` statistics (not from this run's Gram pass), each `M'` pass must count as
    many token positions as they do (`_check_count`)."""
    final = sites[-1]
    bases: dict[str, SiteBasis] = {final.name: final_basis(stats, final, config)}
    jgrams: dict[str, JacobianGram] = {}
    sections = _lib_sections(sites, config.kind)
    if sections:
        state.clock.begin("M'")
    for done, section in enumerate(sections, start=1):
        site = section.inp
        out_basis = bases[section.out.name]
        c_out = None if out_basis.kind == "raw" else out_basis.C
        jacobian = config.jacobian
        if jacobian.stats_device is None and config.stats_device is not None:
            jacobian = replace(jacobian, stats_device=config.stats_device)
        was_saved = restored(state.checkpoint, jacobian_key(section), len(state.batches), state.ctx)
        jg = jacobian_pass(state, section, c_out, jacobian)
        if given:
            _check_count(stats, site, jg)
        jgrams[site.name] = jg
        st = stats[site]
        m_prime = jg.matrix.to(st.mean.device)
        if st.gram.shape[0] >= WIDE_SOLVE:
            state.clock.log(
                f"[M' {done}/{len(sections)}] {section.name}: rotating {st.gram.shape[0]} "
                "units (two eigendecompositions, seconds at this width)"
            )
        bases[site.name] = interaction_basis(
            site, st.mean, st.gram, m_prime, config.truncation, kind=config.kind
        )
        state.clock.step(
            "M'",
            done,
            len(sections),
            f"{section.name}: kept {bases[site.name].k}, split-half error "
            f"{describe_error(jg.split_half_rel_error)}",
            restored=was_saved,
        )
    if sections:
        state.clock.end("M'")
    for site in sites[:-1]:
        st = stats[site]
        if config.kind == "pca":
            bases[site.name] = pca_basis(site, st.mean, st.gram, config.truncation)
        elif config.kind == "neuron":
            bases[site.name] = neuron_basis(site, st.mean, st.gram)
    ordered = {s.name: bases[s.name].to("cpu") for s in sites}
    _warn_if_empty(list(ordered.values()), config.truncation)
    metadata = build_metadata(
        state.model,
        sites,
        kind=config.kind,
        n_tokens=stats.n_tokens,
        site_counts=stats.site_counts,
        statistics="given" if given else "computed",
        truncation=config.truncation,
        jacobian=config.jacobian,
        final_basis=config.final_basis,
        jacobian_methods={k: v.method for k, v in jgrams.items()},
        jacobian_errors={k: v.split_half_rel_error for k, v in jgrams.items()},
    )
    return BasisResult(ordered, metadata)


def _warn_if_empty(bases: Sequence[SiteBasis], truncation: Truncation) -> None:
    """One warning per cause for sites left without a feature: the truncation's cut-offs, or
    activations that do not vary (or that nothing downstream reads)."""
    empty = [b for b in bases if b.k == 0]
    cut = [b.site.name for b in empty if truncation.emptied(b)]
    flat = [b.site.name for b in empty if b.site.name not in cut]
    if cut:
        warnings.warn(
            f"no feature kept at {cut}: {truncation} keeps no eigenvalue there, where the "
            "default Truncation() keeps some; lower its cut-offs (absolute, relative), or "
            "ablation there keeps only the mean",
            UserWarning,
            stacklevel=4,
        )
    if flat:
        warnings.warn(
            f"no feature kept at {flat}: the activations there do not vary over the data "
            "fitted (one row, or rows all alike), or nothing downstream reads them; fit on "
            "more varied data, or ablation there keeps only the mean",
            UserWarning,
            stacklevel=4,
        )


def fit_basis(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    config: LIBConfig,
    statistics: GramStatistics | None = None,
    ctx: DistContext | None = None,
    log: Log = quiet,
) -> BasisResult:
    """Fit `config.kind` bases at every site but the final one (which gets its raw or PCA
    basis) and return them with metadata. Pass `ctx` to shard the passes over
    `torch.distributed` ranks, and `statistics` to reuse a Gram pass: they must come from this
    model (checked as a saved result is), hold every site, and be collected on `tokens` (for
    LIB and IB, each `M'` pass must count the token positions they count; PCA and neuron
    bases read only the statistics). `StatisticsMismatchError` says what does not match."""
    sites = validate_sites(model, config.sites)
    if len(sites) < 2 and config.kind in ("lib", "ib"):
        raise ValueError("LIB and IB need at least two sites: the last one is the final site")
    if statistics is not None:
        check_statistics(model, statistics, sites)
    sections = _lib_sections(sites, config.kind)
    settings = {
        k: v for k, v in vars(config).items() if k not in ("checkpoint_dir", "progress", "store")
    }
    state = open_fit(
        model,
        tokens,
        sites,
        sections,
        settings,
        config.batch_size,
        config.checkpoint_dir,
        config.checkpoint_every,
        config.store,
        config.stats_device,
        config.progress,
        ctx,
        log,
    )
    try:
        given = statistics is not None
        if statistics is None:
            needed = store_sites(model, sections)
            statistics = gram_pass(state, sites, needed)
        result = bases_pass(state, sites, statistics.to(state.stats_device), config, given)
    except BaseException:  # Ctrl-C included: a disk store in the checkpoint folder stays
        state.close(completed=False)
        raise
    state.close(completed=True)
    return result


def fit_lib(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    sites: Sequence[SiteLike],
    **kwargs: Any,
) -> BasisResult:
    """Shortcut: `fit_basis(model, tokens, LIBConfig(tuple(sites), kind="lib", **kwargs))`."""
    return fit_basis(model, tokens, LIBConfig(tuple(sites), kind="lib", **kwargs))


def fit_pca(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    sites: Sequence[SiteLike],
    **kwargs: Any,
) -> BasisResult:
    """Shortcut: PCA bases at every site."""
    return fit_basis(model, tokens, LIBConfig(tuple(sites), kind="pca", **kwargs))
