"""Fit PCA, neuron, LIB or IB bases at a list of sites (method.md §3).

Data flows one way: Gram statistics at every site in one streamed pass; then, for LIB,
the Jacobian Grams backwards from the final site, each section using the next site's basis;
for IB, every site's Jacobian Gram to the final site.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import (
    SiteBasis,
    Truncation,
    interaction_basis,
    neuron_basis,
    pca_basis,
)
from tl_degeneracy.engine.compat import model_identity
from tl_degeneracy.engine.jacobians import JacobianConfig, JacobianGram, jacobian_gram
from tl_degeneracy.engine.result import BasisResult, _jsonable, build_metadata
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import SiteLike, validate_sites
from tl_degeneracy.engine.statistics import GramStatistics, collect_statistics
from tl_degeneracy.engine.streaming import Checkpointing

Kind = Literal["lib", "ib", "pca", "neuron"]


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
    checkpoint_dir: str | None = None
    """Save progress here every `checkpoint_every` batches and resume from it."""
    checkpoint_every: int = 10
    progress: bool = True


def fit_basis(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    config: LIBConfig,
    statistics: GramStatistics | None = None,
) -> BasisResult:
    """Fit `config.kind` bases at every site but the final one (which gets its raw or PCA
    basis) and return them with metadata. Pass `statistics` to reuse a Gram pass."""
    sites = validate_sites(model, config.sites)
    if len(sites) < 2 and config.kind in ("lib", "ib"):
        raise ValueError("LIB and IB need at least two sites: the last one is the final site")
    tokens = tokens if isinstance(tokens, Tensor) else list(tokens)
    ckpt = _checkpointing(config, model, tokens)
    if statistics is None:
        statistics = collect_statistics(
            model, sites, tokens, config.batch_size, ckpt, progress=config.progress
        )
    final = sites[-1]
    bases: dict[str, SiteBasis] = {}
    jgrams: dict[str, JacobianGram] = {}
    stat = statistics[final]
    if config.kind in ("lib", "ib") and config.final_basis == "raw":
        eye = torch.eye(stat.d, dtype=torch.float64)
        d_all, _ = stat.eigh()
        bases[final.name] = SiteBasis(
            final, "raw", eye, eye.clone(), torch.diagonal(stat.gram), stat.mean, d_all
        )
    elif config.kind == "neuron":
        bases[final.name] = neuron_basis(final, stat.mean, stat.gram)
    else:
        bases[final.name] = pca_basis(final, stat.mean, stat.gram, config.truncation)

    for index in range(len(sites) - 2, -1, -1):
        site = sites[index]
        st = statistics[site]
        if config.kind == "pca":
            bases[site.name] = pca_basis(site, st.mean, st.gram, config.truncation)
            continue
        if config.kind == "neuron":
            bases[site.name] = neuron_basis(site, st.mean, st.gram)
            continue
        target = sites[index + 1] if config.kind == "lib" else final
        out_basis = bases[target.name]
        raw_out = out_basis.kind == "raw"
        jg = jacobian_gram(
            model,
            tokens,
            Section(site, target),
            None if raw_out else out_basis.C,
            config.jacobian,
            config.batch_size,
            ckpt,
            progress=config.progress,
        )
        jgrams[site.name] = jg
        bases[site.name] = interaction_basis(
            site, st.mean, st.gram, jg.matrix, config.truncation, kind=config.kind
        )

    ordered = {s.name: bases[s.name] for s in sites}
    metadata = build_metadata(
        model,
        sites,
        kind=config.kind,
        n_tokens=statistics.count,
        truncation=config.truncation,
        jacobian=config.jacobian,
        final_basis=config.final_basis,
        jacobian_methods={k: v.method for k, v in jgrams.items()},
        jacobian_errors={k: v.split_half_rel_error for k, v in jgrams.items()},
    )
    return BasisResult(ordered, metadata)


def fit_lib(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    sites: Sequence[SiteLike],
    **kwargs,
) -> BasisResult:
    """Shortcut: `fit_basis(model, tokens, LIBConfig(tuple(sites), kind="lib", **kwargs))`."""
    return fit_basis(model, tokens, LIBConfig(tuple(sites), kind="lib", **kwargs))


def fit_pca(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    sites: Sequence[SiteLike],
    **kwargs,
) -> BasisResult:
    """Shortcut: PCA bases at every site."""
    return fit_basis(model, tokens, LIBConfig(tuple(sites), kind="pca", **kwargs))


def _checkpointing(
    config: LIBConfig, model: nn.Module, tokens: Tensor | list[Tensor]
) -> Checkpointing | None:
    """Checkpointing for this fit; refuses a folder written by a fit of other settings, model
    or data, which would otherwise be resumed silently."""
    if config.checkpoint_dir is None:
        return None
    folder = Path(config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for batch in [tokens] if isinstance(tokens, Tensor) else tokens:
        digest.update(batch.detach().cpu().to(torch.int64).numpy().tobytes())
    settings = {
        "config": _jsonable(
            {
                k: v
                for k, v in vars(config).items()
                if k not in ("checkpoint_dir", "checkpoint_every", "progress")
            }
        ),
        "sites": [s.to_json() for s in validate_sites(model, config.sites)],
        "model": model_identity(model),
        "tokens_sha256": digest.hexdigest(),
    }
    settings["model"].pop("api", None)
    record = folder / "fit.json"
    if record.exists():
        saved = json.loads(record.read_text())
        for key, value in settings.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"checkpoint folder {folder} was written by a fit with other settings "
                    f"('{key}' differs); use a new checkpoint_dir or delete this one"
                )
    else:
        record.write_text(json.dumps(settings, indent=1))
    return Checkpointing(folder, config.checkpoint_every)
