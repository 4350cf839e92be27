"""Streaming mean and centred Gram of site activations (method.md §2).

Accumulated in float64 whatever the model's dtype, batch by batch, with Chan's pairwise
update (count, mean, centred sum of squares): numerically stable, O(d²) memory, and mergeable,
so statistics of several shards or processes combine into those of their union.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.compat import StopForward, frozen_parameters, run_with_hooks
from tl_degeneracy.engine.linalg import symmetric_eigh
from tl_degeneracy.engine.sites import Site, SiteLike, validate_sites
from tl_degeneracy.engine.streaming import Checkpointing, EmptyDataError, iter_batches, stream


class NonFiniteActivationError(FloatingPointError):
    """NaN or Inf in an activation: names the site, the batch and the offending positions."""


class StatisticsMismatchError(ValueError):
    """Statistics that cannot be combined (different sites, widths or settings)."""


@dataclass
class SiteStatistics:
    """Count, mean and centred sum of outer products of one site's activations (float64)."""

    site: Site
    count: int
    mean: Float[Tensor, " d"]
    m2: Float[Tensor, "d d"]

    @classmethod
    def empty(cls, site: Site, d: int) -> SiteStatistics:
        z = torch.zeros(d, dtype=torch.float64)
        return cls(site, 0, z, torch.zeros(d, d, dtype=torch.float64))

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
        x = x.to(torch.float64)
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
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
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
            out._merge(other.count, other.mean, other.m2)
        return out

    def eigh(self) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
        """Eigen-decomposition of the centred Gram, eigenvalues descending."""
        evals, evecs = symmetric_eigh(self.gram)
        return evals.flip(0), evecs.flip(1)


@dataclass
class GramStatistics:
    """Statistics of several sites over the same tokens; mergeable and savable."""

    sites: list[Site]
    per_site: dict[str, SiteStatistics] = field(default_factory=dict)

    def __getitem__(self, site: Site | str) -> SiteStatistics:
        return self.per_site[site.name if isinstance(site, Site) else site]

    @property
    def count(self) -> int:
        return min((s.count for s in self.per_site.values()), default=0)

    def merge(self, other: GramStatistics) -> GramStatistics:
        mine, theirs = [s.name for s in self.sites], [s.name for s in other.sites]
        if mine != theirs:
            raise StatisticsMismatchError(
                f"cannot merge statistics of different sites (field 'sites'): {mine} vs {theirs}"
            )
        return GramStatistics(
            list(self.sites), {k: v.merge(other.per_site[k]) for k, v in self.per_site.items()}
        )

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, st in self.per_site.items():
            out[f"{name}/count"] = torch.tensor([st.count], dtype=torch.int64)
            out[f"{name}/mean"] = st.mean
            out[f"{name}/m2"] = st.m2
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for site in self.sites:
            name = site.name
            if f"{name}/mean" not in state:
                raise StatisticsMismatchError(f"saved statistics have no site {name}")
            self.per_site[name] = SiteStatistics(
                site, int(state[f"{name}/count"][0]), state[f"{name}/mean"], state[f"{name}/m2"]
            )


def check_finite(act: Tensor, site: Site, batch_index: int) -> None:
    """Raise `NonFiniteActivationError` naming site, batch and positions of NaN/Inf values."""
    if torch.isfinite(act).all():
        return
    bad = (~torch.isfinite(act)).any(-1).nonzero().tolist()
    raise NonFiniteActivationError(
        f"NaN or Inf in the activation at site {site.name}, batch {batch_index}, "
        f"(row, position) {bad[:5]}{' ...' if len(bad) > 5 else ''}: check the model's dtype "
        "(float16 overflows) and the inputs of that batch"
    )


def add_to_statistics(
    stats: GramStatistics,
    sites: Sequence[Site],
    acts: Sequence[Float[Tensor, "batch site_pos d"]],
    batch_index: int,
) -> None:
    """Fold one batch of activations into each site's statistics.

    The NaN/Inf check rides on the Gram update (see `SiteStatistics.add`); on failure the error
    names the site, the batch and the positions, as `check_finite` does.
    """
    for site, act in zip(sites, acts):
        flat = act.reshape(-1, act.shape[-1])
        if site.name not in stats.per_site:
            stats.per_site[site.name] = SiteStatistics.empty(site, flat.shape[-1])
        try:
            stats.per_site[site.name].add(flat)
        except NonFiniteActivationError:
            check_finite(act, site, batch_index)
            raise


class _GramAccumulator:
    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model = model
        self.sites = sites
        self.stats = GramStatistics(sites)

    def update(self, batch_index: int, tokens: Tensor) -> None:
        captured = capture_sites(self.model, tokens, self.sites, batch_index, check=False)
        add_to_statistics(self.stats, self.sites, captured, batch_index)

    def state_dict(self) -> dict[str, Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.stats.load_state_dict(state)


@torch.no_grad()
def capture_sites(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[Site],
    batch_index: int = 0,
    check: bool = True,
) -> list[Float[Tensor, "batch site_pos d"]]:
    """Activations at each site's selected positions for one batch (stopping after the last
    site unless it is the logits), checked for NaN/Inf unless `check=False` (for callers that
    check on the way, like `add_to_statistics`). With `positions="all"` they are the model's
    own tensors, not copies: read-only."""
    store: dict[str, Tensor] = {}
    last_hook = sites[-1].hook

    def make_hook(site: Site):
        def hook(act: Tensor, hook=None) -> None:
            store[site.name] = site.select(act)
            if site.hook == last_hook and all(s.name in store for s in sites):
                raise StopForward

        return hook

    fwd = [(s.hook, make_hook(s)) for s in sites if not s.is_logits]
    with frozen_parameters(model):
        out = run_with_hooks(model, tokens, fwd, stop_early=True)
    result = []
    for site in sites:
        if site.is_logits:
            assert out is not None  # no hook reads the logits, so no StopForward ended the pass
            act = site.select(out)
        else:
            act = store[site.name]
        if check:
            check_finite(act, site, batch_index)
        result.append(act)
    return result


def collect_statistics(
    model: nn.Module,
    sites: Sequence[SiteLike],
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
) -> GramStatistics:
    """Stream the model over `tokens` and return each site's mean and centred Gram (float64).

    One forward per batch serves all sites; it stops at the last site.
    """
    resolved = validate_sites(model, sites)
    batches = iter_batches(tokens, batch_size)
    acc = _GramAccumulator(model, resolved)
    stream(acc, batches, "Gram statistics", checkpoint, key="gram", progress=progress)
    if acc.stats.count == 0:
        raise EmptyDataError("no tokens reached the sites")
    return acc.stats
