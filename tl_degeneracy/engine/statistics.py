"""Streaming mean and centred Gram of site activations (docs/concepts.md, "Statistics").

Accumulated in float64 whatever the model's dtype, batch by batch, with Chan's pairwise
update (count, mean, centred sum of squares): numerically stable, O(d²) memory, and mergeable,
so statistics of several shards or processes combine into those of their union.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import SITE_JSON, Result, build_metadata, check_saved
from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.capture import NonFiniteActivationError, capture_sites, check_finite
from tl_degeneracy.engine.compat import is_transformer, model_device, usable_device
from tl_degeneracy.engine.linalg import symmetric_eigh
from tl_degeneracy.engine.sites import Site, SiteLike, site_key, validate_sites
from tl_degeneracy.engine.store import ActivationStore
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    iter_batches,
    run_fingerprint,
)

__all__ = [
    "GramAccumulator",
    "GramStatistics",
    "NonFiniteActivationError",
    "SiteStatistics",
    "StatisticsMemoryError",
    "StatisticsMismatchError",
    "add_to_statistics",
    "check_gram_memory",
    "capture_sites",
    "check_finite",
    "collect_statistics",
]


class StatisticsMismatchError(ValueError):
    """Statistics that cannot be combined (different sites, widths or settings)."""


class StatisticsMemoryError(ValueError):
    """Sites whose float64 Gram statistics would not fit in the memory of their device."""


def _available_bytes(device: torch.device | str) -> int | None:
    """Memory free for new tensors on `device` (Linux hosts and CUDA), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_gram_memory(widths: dict[str, int], device: torch.device | str) -> None:
    """Refuse, before allocating, sites whose statistics (a float64 d × d sum per site, and
    one batch's d × d product at a time) exceed the free memory of `device`: a logits site
    of a language model is as wide as its vocabulary (49,152 units: 19 GB)."""
    need = 8 * (sum(d * d for d in widths.values()) + max(d * d for d in widths.values()))
    free = _available_bytes(device)
    if free is None or need <= free:
        return
    widest = sorted(widths.items(), key=lambda kv: -kv[1])[:3]
    named = ", ".join(f"{name}: {d} units, {8 * d * d / 1e9:.1f} GB" for name, d in widest)
    raise StatisticsMemoryError(
        f"the Gram statistics of these sites need {need / 1e9:.1f} GB of float64 on "
        f"{torch.device(device)} ({named}), more than the {free / 1e9:.1f} GB free. A site as "
        "wide as the vocabulary (the logits) is rarely the final site a language model "
        "wants: end the sites at the last residual-stream site (residual_sites(model)), or "
        "keep the statistics on a device with more memory (stats_device=...)."
    )


@dataclass(repr=False)
class SiteStatistics(BriefRepr):
    """Count, mean and centred sum of outer products of one site's activations (float64)."""

    site: Site
    count: int
    mean: Float[Tensor, " d"]
    m2: Float[Tensor, "d d"]

    @classmethod
    def empty(cls, site: Site, d: int, device: torch.device | str = "cpu") -> SiteStatistics:
        z = torch.zeros(d, dtype=torch.float64, device=device)
        return cls(site, 0, z, torch.zeros(d, d, dtype=torch.float64, device=device))

    @property
    def d(self) -> int:
        return int(self.mean.shape[0])

    @property
    def gram(self) -> Float[Tensor, "d d"]:
        """Centred Gram `G = (1/n) Σ (f − μ)(f − μ)ᵀ` (the PCA covariance)."""
        if self.count == 0:
            raise EmptyDataError(f"site {self.site.name}: no tokens were accumulated")
        return self.m2 / self.count

    def add(self, x: Float[Tensor, "n d"]) -> None:
        """Fold in a block of samples (rows).

        Raises `NonFiniteActivationError` (and leaves the statistics unchanged) if a sample holds
        NaN or Inf: the block's mean is then not finite, a check of d numbers instead of n·d.
        """
        x = x.to(self.mean.device, torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        if not torch.isfinite(mean_b).all():
            raise NonFiniteActivationError(f"NaN or Inf in the samples for site {self.site.name}")
        xc = x - mean_b
        self._merge(n, mean_b, xc.T @ xc)

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        # in place (the sums are this object's own); the same operations, in the same order,
        # as `m2 + m2_b + outer · c`, so the same rounding as before it was in place
        self.m2.add_(m2_b).add_(torch.outer(delta, delta) * (n_a * n_b / n))
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def merge(self, other: SiteStatistics) -> SiteStatistics:
        """Statistics of the union of the two data sets (new object)."""
        if other.site != self.site:
            raise StatisticsMismatchError(
                f"cannot merge statistics of different sites: {self.site.name} vs {other.site.name}"
            )
        if other.d != self.d:
            raise StatisticsMismatchError(
                f"site {self.site.name}: width {self.d} vs {other.d} (field 'mean')"
            )
        out = SiteStatistics(self.site, self.count, self.mean.clone(), self.m2.clone())
        if other.count:
            out._merge(other.count, other.mean.to(out.mean), other.m2.to(out.m2))
        return out

    def eigh(self) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
        """Eigen-decomposition of the centred Gram, eigenvalues descending."""
        evals, evecs = symmetric_eigh(self.gram)
        return evals.flip(0), evecs.flip(1)

    def to(self, device: torch.device | str) -> SiteStatistics:
        return SiteStatistics(self.site, self.count, self.mean.to(device), self.m2.to(device))


@dataclass(repr=False)
class GramStatistics(Result):
    """Statistics of several sites over the same tokens; mergeable and savable."""

    sites: list[Site]
    per_site: dict[str, SiteStatistics] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "gram_statistics"

    def __getitem__(self, site: SiteLike) -> SiteStatistics:
        return self.per_site[site_key(site, self.per_site, "statistics")]

    @property
    def count(self) -> int:
        """Samples at the site that has the fewest (0: some site saw no data)."""
        return min((s.count for s in self.per_site.values()), default=0)

    @property
    def n_tokens(self) -> int:
        """Token positions fitted on: the most any site counted. A site read at fewer
        positions (a final site at the last position) counts fewer; `site_counts` has each."""
        return max((s.count for s in self.per_site.values()), default=0)

    @property
    def site_counts(self) -> dict[str, int]:
        """Samples per site (rows × the site's positions)."""
        return {name: s.count for name, s in self.per_site.items()}

    def merge(self, other: GramStatistics) -> GramStatistics:
        mine, theirs = [s.name for s in self.sites], [s.name for s in other.sites]
        if mine != theirs:
            raise StatisticsMismatchError(
                f"cannot merge statistics of different sites (field 'sites'): {mine} vs {theirs}"
            )
        merged = {k: v.merge(other.per_site[k]) for k, v in self.per_site.items()}
        return GramStatistics(list(self.sites), merged, self.metadata)

    def to(self, device: torch.device | str) -> GramStatistics:
        device = usable_device(device)
        per_site = {k: v.to(device) for k, v in self.per_site.items()}
        return GramStatistics(list(self.sites), per_site, self.metadata)

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, st in self.per_site.items():
            out[f"{name}/count"] = torch.tensor([st.count], dtype=torch.int64)
            out[f"{name}/mean"] = st.mean
            out[f"{name}/m2"] = st.m2
        return out

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device | str = "cpu") -> None:
        for site in self.sites:
            name = site.name
            if f"{name}/mean" not in state:
                raise StatisticsMismatchError(f"saved statistics have no site {name}")
            self.per_site[name] = SiteStatistics(
                site,
                int(state[f"{name}/count"][0]),
                state[f"{name}/mean"].to(device),
                state[f"{name}/m2"].to(device),
            )

    # -- the result protocol -------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        return self.state_dict()

    def _metadata(self) -> dict[str, Any]:
        return {**self.metadata, "sites": [s.to_json() for s in self.sites]}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """The sites, and per site a count, a mean (d) and a finite m2 (d×d)."""

        def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
            names = [Site.from_json(s).name for s in meta["sites"]]
            return {
                f"{n}/{f}": dims
                for n in names
                for f, dims in (("count", (1,)), ("mean", (n,)), ("m2", (n, n)))
            }

        keys = {"sites": [SITE_JSON]}
        check_saved(folder, cls.ARTIFACT, meta, tensors, keys, shapes, finite=True)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> GramStatistics:
        stats = cls([Site.from_json(s) for s in meta["sites"]], metadata=meta)
        stats.load_state_dict(tensors)
        return stats

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_spectra

        rows = [
            {"site": name, "d": st.d, "tokens": st.count, "trace": float(st.gram.trace())}
            for name, st in self.per_site.items()
        ]
        spectra = {
            n: st.eigh()[0].clamp(min=1e-30).cpu().numpy() for n, st in self.per_site.items()
        }
        return [
            PageSection("Gram statistics", table(rows)),
            PageSection("Spectra", figure_to_html(plot_spectra(spectra), "Gram spectra")),
        ]


def add_to_statistics(
    stats: GramStatistics,
    sites: Sequence[Site],
    acts: Sequence[Float[Tensor, "batch site_pos d"]],
    batch_index: int,
    device: torch.device | str = "cpu",
    batched: bool | None = None,
) -> None:
    """Fold one batch of activations into each site's statistics (on `device`).

    Every site's batch mean is checked for NaN/Inf first, all at once: on a non-finite value
    nothing is folded in and the error names the site, the batch and the positions
    (`check_finite`). `batched` (default: on a GPU) folds sites of one width and sample count
    in together: one float64 buffer, one batched product, one merge (a few launches per batch
    instead of several per site); otherwise each site gets its own BLAS product, folded in and
    freed before the next (faster on a CPU, and one site's memory at a time:
    `benchmarks/bench_lm.py`).
    """
    new = {s.name: a.shape[-1] for s, a in zip(sites, acts) if s.name not in stats.per_site}
    if new:
        check_gram_memory(new, device)
    if batched is None:
        batched = torch.device(device).type != "cpu"
    if batched:
        _add_batched(stats, sites, acts, batch_index, device)
        return
    flats = [act.reshape(-1, act.shape[-1]) for act in acts]
    means = [batch_mean(a).to(device) if flat.shape[0] else None for a, flat in zip(acts, flats)]
    _check_means(sites, acts, [m for m in means if m is not None], batch_index)
    for site, flat, mean in zip(sites, flats, means):
        if mean is not None:
            xc = flat.to(device, torch.float64) - mean
            _site_statistics(stats, site, mean.shape[0], device)._merge(
                flat.shape[0], mean, xc.T @ xc
            )


def batch_mean(act: Float[Tensor, "... d"]) -> Float[Tensor, " d"]:
    """The mean over every axis but the last, in float64, read where `act` lies (a selection
    of positions is not copied first). Both updates take a batch's means this way."""
    return act.mean(tuple(range(act.ndim - 1)), dtype=torch.float64)


def centred_gram(x: Float[Tensor, "S n d"]) -> Float[Tensor, "S d d"]:
    """`xᵀx` of each of S matrices by two batched products, a quarter fewer operations than
    one: the first half of the rows of `xᵀx` (`x₁ᵀx`), then the last block (`x₂ᵀx₂`); the
    block below the diagonal is the transpose of the one above it. The float64 products are
    about half of a batch's update on a GPU (4.9 ms against 5.2 for one `bmm` on an H100, at
    61 sites of 576 and 8,192 tokens: the halves are strided)."""
    h = x.shape[-1] // 2
    if h == 0:
        return torch.bmm(x.transpose(1, 2), x)
    top = torch.bmm(x[..., :h].transpose(1, 2), x)
    bottom = torch.bmm(x[..., h:].transpose(1, 2), x[..., h:])
    return torch.cat([top, torch.cat([top[..., h:].transpose(1, 2), bottom], 2)], 1)


def _add_batched(
    stats: GramStatistics,
    sites: Sequence[Site],
    acts: Sequence[Tensor],
    batch_index: int,
    device: torch.device | str,
) -> None:
    """`add_to_statistics` for groups of sites of one shape: each activation is centred and
    converted in one pass, from where it lies, into one float64 buffer `[S, n, d]`, whose
    Grams are taken together (`centred_gram`) and merged into all S sites' sums at once
    (`_merge_group`), one group's buffer at a time.

    The update reads the device once, for the NaN/Inf check of the batch means, before any
    product is queued: on a GPU the check then waits for the forward only, and the products
    run while the host queues the next batch's forward."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, act in enumerate(acts):
        n = act.numel() // act.shape[-1] if act.shape[-1] else 0
        if n:
            groups.setdefault((n, int(act.shape[-1])), []).append(i)
    means = {
        (n, d): torch.stack([batch_mean(acts[i]) for i in idx]).to(device)
        for (n, d), idx in groups.items()
    }
    _check_means(sites, acts, [mean.flatten() for mean in means.values()], batch_index)
    for (n, d), idx in groups.items():
        x = torch.empty(len(idx), n, d, dtype=torch.float64, device=device)
        for j, i in enumerate(idx):
            # (a - mean) in float64, written into the buffer: the conversion is exact, so
            # this is the per-site update's centring, rounded once
            a = acts[i] if acts[i].device == x.device else acts[i].to(x.device)
            torch.sub(a, means[n, d][j], out=x[j].view(a.shape))
        m2 = centred_gram(x)
        del x  # before the next group's buffer
        group = [_site_statistics(stats, sites[i], d, device) for i in idx]
        _merge_group(group, n, means[n, d], m2)


def _merge_group(
    group: list[SiteStatistics],
    n_b: int,
    mean_b: Float[Tensor, "S d"],
    m2_b: Float[Tensor, "S d d"],
) -> None:
    """`SiteStatistics._merge` of S sites at once (the same update, to rounding): the
    between-means term folded into the batch's sums by one batched product, then one
    multi-tensor add into every site's sums; a few launches instead of several per site.
    Sites with different counts (a rare case: statistics merged from elsewhere) are merged
    one by one, since their weights differ. `m2_b` is overwritten."""
    n_a = group[0].count
    if any(st.count != n_a for st in group):
        for st, mean, m2 in zip(group, mean_b, m2_b):
            st._merge(n_b, mean, m2)
        return
    # the weights as `_merge` computes them, Python numbers: a tensor of them would be a
    # copy from the host, which synchronises a GPU
    c, share = n_a * n_b / (n_a + n_b), n_b / (n_a + n_b)
    delta = mean_b - torch.stack([st.mean for st in group])
    m2_b.baddbmm_((delta * c)[:, :, None], delta[:, None, :])
    torch._foreach_add_([st.m2 for st in group], list(m2_b.unbind(0)))
    torch._foreach_add_([st.mean for st in group], list((delta * share).unbind(0)))
    for st in group:
        st.count += n_b


def _check_means(
    sites: Sequence[Site], acts: Sequence[Tensor], means: list[Tensor], batch_index: int
) -> None:
    """One check over all batch means (one synchronisation on a GPU); on NaN/Inf, the error of
    the first offending site (`check_finite`)."""
    if means and not bool(torch.isfinite(torch.cat(means)).all()):
        for site, act in zip(sites, acts):
            check_finite(act, site, batch_index)
        raise NonFiniteActivationError(f"NaN or Inf in the activations of batch {batch_index}")


def _site_statistics(
    stats: GramStatistics, site: Site, d: int, device: torch.device | str
) -> SiteStatistics:
    if site.name not in stats.per_site:
        stats.per_site[site.name] = SiteStatistics.empty(site, d, device)
    return stats.per_site[site.name]


class GramAccumulator:
    """The Gram pass: one forward per batch reads every site (stopping after the last) and
    folds it into the statistics; with a store, it also keeps the full activation of the
    sites in `store_sites` for the later passes (see `engine.store`)."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        device: torch.device | str | None = None,
        store: ActivationStore | None = None,
        store_sites: Sequence[Site] = (),
    ):
        self.model, self.sites = model, sites
        self.device = torch.device(device) if device is not None else model_device(model)
        self.stats = GramStatistics(sites)
        self.store = store
        self.store_sites = [s for s in store_sites] if store is not None else []

    def update(self, batch_index: int, tokens: Tensor) -> None:
        names = {s.name for s in self.sites}
        extra = [
            s
            for s in self.store_sites
            if s.name not in names and s.hook not in {t.hook for t in self.sites}
        ]
        wanted = self.sites + extra
        full = bool(self.store_sites)
        acts = capture_sites(
            self.model, tokens, wanted, batch_index, False, full, not is_transformer(self.model)
        )
        by_hook = {s.hook: a for s, a in zip(wanted, acts)}
        chosen = [s.select(a) if full else a for s, a in zip(self.sites, acts)]
        add_to_statistics(self.stats, self.sites, chosen, batch_index, self.device)
        if self.store is not None:
            for site in self.store_sites:
                self.store.write(site, batch_index, by_hook[site.hook])

    def state_dict(self) -> dict[str, Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.stats.load_state_dict(state, self.device)


def collect_statistics(
    model: nn.Module,
    sites: Sequence[SiteLike],
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    ctx: Any = None,
) -> GramStatistics:
    """Stream the model over `tokens` and return each site's mean and centred Gram (float64,
    on `device`: the model's by default; "cpu" when the model's device lacks float64 or
    memory). One forward per batch serves all sites; it stops at the last site. With `ctx`
    (`distributed.DistContext`) the batches are sharded over processes and every process
    returns the merged statistics."""
    from tl_degeneracy.engine.distributed import DistContext, merge_gram_states, stream_sharded

    ctx = ctx or DistContext()
    if device is not None:
        usable_device(device)  # before the data is read (torch would fail at the first sum)
    resolved = validate_sites(model, sites)
    batches = iter_batches(tokens, batch_size, model)
    acc = GramAccumulator(model, resolved, device)

    def fingerprint() -> dict[str, Any]:
        sites = [s.to_json() for s in resolved]
        return run_fingerprint(model, batches, state="gram statistics", sites=sites)

    states = stream_sharded(
        acc, batches, "Gram statistics", ctx, checkpoint, "gram", progress, fingerprint
    )
    stats = (
        merge_gram_states(states, GramStatistics(resolved), acc.device) if ctx.active else acc.stats
    )
    if stats.count == 0:
        raise EmptyDataError("no tokens reached the sites")
    stats.metadata = build_metadata(model, resolved, n_tokens=stats.count)
    return stats
