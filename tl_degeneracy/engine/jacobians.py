"""The Jacobian Gram `M'` of a section (docs/concepts.md, "Bases" and "Estimating M'").

`M' = (1/(N·P_in)) Σ_b Σ_{t,i} Σ_s J_{b,t,i,s,:}ᵀ J_{b,t,i,s,:}`, with J the Jacobian of the
output site's features `(F(f) − μ) C_out` with respect to the input site's raw activation.
How it is computed is the section's structure's business (`structures.structure_of`): a closed
form where the section has one (exact), else vector-Jacobian products through the structure's
forward, exact (one-hot cotangents) or stochastic (Rademacher sources).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import SITE_JSON, Result, build_metadata, check_saved
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.checks import whole_number
from tl_degeneracy.engine.compat import usable_device
from tl_degeneracy.engine.cotangents import SourcesOver
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import StatisticsMismatchError
from tl_degeneracy.engine.store import ActivationSource
from tl_degeneracy.engine.streaming import (
    Checkpointing,
    EmptyDataError,
    iter_batches,
    run_fingerprint,
)

Method = Literal["exact", "stochastic"]


@dataclass(frozen=True)
class JacobianConfig:
    """How `M'` is estimated."""

    method: Method = "exact"
    """'exact': the section's closed form where it has one, else one-hot cotangents;
    'stochastic': Rademacher sources through the section's forward. ('auto' is 'exact'.)"""
    n_sources: int = 4
    """Rademacher sources per data point (stochastic)."""
    sources_over: SourcesOver = "both"
    """Draw random signs over output positions and units ('both'), positions only (exact over
    units) or units only (exact over positions)."""
    chunk_size: int = 32
    """Cotangents per batched backward pass (memory ∝ chunk · batch · P_in · d_in)."""
    seed: int = 0
    stats_device: str | None = None
    """Where the float64 sums live: the model's device by default; 'cpu' for a device without
    float64 or memory to spare."""

    def __post_init__(self) -> None:
        if self.method == "auto":  # the name before closed forms became part of 'exact'
            object.__setattr__(self, "method", "exact")
        if self.method not in ("exact", "stochastic"):
            raise ValueError(f"method must be 'exact' or 'stochastic', got {self.method!r}")
        if self.sources_over not in get_args(SourcesOver):
            raise ValueError(
                f"sources_over must be one of {', '.join(get_args(SourcesOver))}, got "
                f"{self.sources_over!r}"
            )
        for name in ("n_sources", "chunk_size"):
            object.__setattr__(self, name, whole_number(name, getattr(self, name)))
        if self.stats_device is not None:
            usable_device(self.stats_device)  # before anything is loaded or computed


@dataclass(repr=False)
class JacobianGram(Result):
    """`M'` as a float64 sum and a count (mergeable), with a split-half error estimate."""

    section: Section
    total: Float[Tensor, "d d"]
    count: int
    halves: Float[Tensor, "2 d d"]
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "jacobian_gram"

    @property
    def matrix(self) -> Float[Tensor, "d d"]:
        if self.count == 0:
            raise EmptyDataError(f"section {self.section.name}: no tokens were accumulated")
        return self.total / self.count

    @property
    def split_half_rel_error(self) -> float | None:
        """‖M'_even − M'_odd‖ / ‖M'_even + M'_odd‖ over batches: the relative standard error
        of `matrix` from data and source sampling. None where it cannot be estimated: all the
        data came in one batch (a smaller `batch_size` gives the two halves)."""
        a, b = self.halves
        if not bool(a.any()) or not bool(b.any()):  # one batch: nothing to compare
            return None
        denom = float(torch.linalg.norm(a + b))
        return float(torch.linalg.norm(a - b)) / denom if denom > 0 else 0.0

    def merge(self, other: JacobianGram) -> JacobianGram:
        if other.section != self.section:
            raise StatisticsMismatchError(
                f"cannot merge Jacobian Grams of different sections: {self.section.name} vs "
                f"{other.section.name}"
            )
        if other.total.shape != self.total.shape:
            raise StatisticsMismatchError(
                f"section {self.section.name}: shapes {tuple(self.total.shape)} vs "
                f"{tuple(other.total.shape)} (field 'total')"
            )
        return JacobianGram(
            self.section,
            self.total + other.total.to(self.total),
            self.count + other.count,
            self.halves + other.halves.to(self.halves),
            self.method,
            self.metadata,
        )

    def _tensors(self) -> dict[str, Tensor]:
        return {"total": self.total, "halves": self.halves}

    def _metadata(self) -> dict[str, Any]:
        return {
            **self.metadata,
            "section": [self.section.inp.to_json(), self.section.out.to_json()],
            "count": self.count,
            "method": self.method,
        }

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """The section, count and method, and a finite `total` (d×d) with its `halves` (2×d×d)."""
        keys = {"section": [SITE_JSON], "count": int, "method": str}
        shapes = {"total": ("d", "d"), "halves": (2, "d", "d")}
        check_saved(folder, cls.ARTIFACT, meta, tensors, keys, shapes, finite=True)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> JacobianGram:
        inp, out = (Site.from_json(s) for s in meta["section"])
        return cls(
            Section(inp, out),
            tensors["total"],
            meta["count"],
            tensors["halves"],
            meta["method"],
            meta,
        )

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_spectra

        evals = torch.linalg.eigvalsh(self.matrix.cpu()).flip(0).clamp(min=1e-30)
        rows = [
            {
                "section": self.section.name,
                "method": self.method,
                "tokens": self.count,
                "split-half error": describe_error(self.split_half_rel_error),
            }
        ]
        return [
            PageSection("Jacobian Gram M'", table(rows)),
            PageSection("Spectrum", figure_to_html(plot_spectra({"M'": evals.numpy()}), "M'")),
        ]


def finish_jacobian_gram(acc: Any, model: nn.Module | None = None) -> JacobianGram:
    """The `JacobianGram` of a streamed accumulator (see `structures.base.JacobianSums`)."""
    total, halves, count = acc.sums()
    if total is None or count == 0:
        raise EmptyDataError(f"section {acc.section.name}: no data")
    assert halves is not None
    meta = {} if model is None else build_metadata(model, [acc.section.inp, acc.section.out])
    return JacobianGram(acc.section, total, count, halves, acc.method(), meta)


def jacobian_gram(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    section: Section,
    out_basis: SiteBasis | Float[Tensor, "d_out k_out"] | None = None,
    config: JacobianConfig | None = None,
    batch_size: int = 256,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    source: ActivationSource | None = None,
    ctx: Any = None,
) -> JacobianGram:
    """Stream `M'` of `section` over the data: the Gram of Jacobians of the output features
    `(F(f) − μ) out_basis` (raw output coordinates when `out_basis` is None). `out_basis` is
    the output site's fitted basis (`lib[section.out]`, a `SiteBasis`) or its matrix `C`,
    `[d_out, k_out]`. `source` supplies input activations (an activation store); `ctx` shards
    the batches over processes (`distributed.DistContext`)."""
    from tl_degeneracy.engine.distributed import DistContext, stream_sharded, sum_states
    from tl_degeneracy.engine.structures import structure_of

    out_basis = _out_matrix(section, out_basis)
    config = config or JacobianConfig()
    ctx = ctx or DistContext()
    source = source or ActivationSource(model)
    structure = structure_of(model, section)
    acc = structure.jacobian_accumulator(out_basis, config, source)
    batches = iter_batches(tokens, batch_size, model)

    def fingerprint() -> dict[str, Any]:
        return run_fingerprint(
            model,
            batches,
            state="M'",
            section=section.name,
            config=_result_settings(config),
            out_basis="raw" if out_basis is None else out_basis,
        )

    states = stream_sharded(
        acc,
        batches,
        f"M' {section.name} ({acc.method()})",
        ctx,
        checkpoint,
        jacobian_key(section),
        progress,
        fingerprint,
    )
    if ctx.active:
        acc.load_state_dict(sum_states([s for s in states if s]))
    return finish_jacobian_gram(acc, model)


def _out_matrix(section: Section, out_basis: Any) -> Tensor | None:
    """The readout matrix `C` of `out_basis`: a `SiteBasis` of the section's output site gives
    its `C`; a tensor is taken as it is."""
    if out_basis is None or isinstance(out_basis, Tensor):
        return out_basis
    if isinstance(out_basis, SiteBasis):
        if out_basis.site != section.out:
            raise ValueError(
                f"out_basis is the basis of {out_basis.site.name}, but the section "
                f"{section.name} ends at {section.out.name}: pass the output site's basis"
            )
        return out_basis.C
    raise TypeError(
        "out_basis must be the output site's SiteBasis (e.g. lib[section.out]), its matrix "
        f"C as a [d_out, k_out] tensor, or None for raw coordinates; got "
        f"{type(out_basis).__name__}"
    )


def jacobian_key(section: Section) -> str:
    """The checkpoint key of a section's `M'` pass."""
    return checkpoint_key(f"jacobian.{section.name}")


def checkpoint_key(text: str) -> str:
    """A checkpoint key that fits in a file name (sites with position lists have long names)."""
    import hashlib

    if len(text) <= 150:
        return text
    return f"{text[:80]}~{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def describe_error(error: float | None) -> str:
    """A split-half error for people: 'n/a (one batch)' where there is none."""
    return "n/a (one batch)" if error is None else f"{error:.3g}"


def _result_settings(config: Any) -> dict[str, Any]:
    """The fields of a config that change a checkpointed pass's result (not where or in what
    chunks it is computed)."""
    return {k: v for k, v in asdict(config).items() if k not in ("stats_device", "chunk_size")}
