"""Dominant directions: sites where one direction carries more than half of the variance.

A token with a massive activation (the BOS token of most language models, an attention sink)
puts one huge direction into every residual-stream site it reaches; its variance then dwarfs
the rest of the spectrum and every basis and edge statistic describes that one artefact. This
module finds such directions from the centred Gram spectrum of each site, and names the
positions and tokens they come from: the activations with the largest |projection| on the
direction over a data sample, and how the squared projection splits over positions and tokens.
Nothing here is specific to a model: sites, data and the token decoder come from the caller.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.statistics import GramStatistics, capture_sites
from tl_degeneracy.engine.streaming import iter_batches

__all__ = [
    "DominantDirection",
    "SinkDiagnostic",
    "TokenHit",
    "direction_sources",
    "dominant_directions",
    "top_direction_shares",
]

Decoder = Callable[[int], str]
Spectra = BasisResult | Mapping[str, SiteBasis] | GramStatistics


@dataclass(frozen=True)
class TokenHit:
    """One activation with a large projection on a direction."""

    sequence: int
    position: int
    token: str
    projection: float


@dataclass
class DominantDirection:
    """A site's top variance direction that carries more than the threshold of its variance."""

    site: str
    share: float
    """Top eigenvalue / trace of the site's centred Gram."""
    next_share: float
    """The second eigenvalue's share."""
    hits: list[TokenHit] = field(default_factory=list)
    """Largest |projection| on the direction over the sample, largest first."""
    position_share: dict[int, float] = field(default_factory=dict)
    """Share of the squared projection per position (the largest few)."""
    token_share: dict[str, float] = field(default_factory=dict)
    """Share of the squared projection per token string (the largest few)."""

    @property
    def located(self) -> bool:
        """Whether the direction was traced to tokens (it needs the model and data)."""
        return bool(self.position_share)

    @property
    def source(self) -> tuple[str, Any]:
        """What the direction comes from: ("position", p) or ("token", t) when one carries at
        least half of its squared projection, else ("spread", None); ("untraced", None)."""
        if not self.located:
            return ("untraced", None)
        pos, p_share = max(self.position_share.items(), key=lambda kv: kv[1])
        tok, t_share = max(self.token_share.items(), key=lambda kv: kv[1])
        if p_share >= 0.5:
            return ("position", pos)
        if t_share >= 0.5:
            return ("token", tok)
        return ("spread", None)

    def explanation(self) -> str:
        """Why the direction is flagged, where it comes from and what that suggests."""
        head = (
            f"One direction carries {self.share:.1%} of the variance at {self.site} "
            f"(the next one {self.next_share:.2%})."
        )
        if not self.located:
            return head + " Its tokens were not traced (no model or data given)."

        def top(shares: Mapping[Any, float], show: Callable[[Any], str]) -> str:
            items = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
            return ", ".join(f"{show(k)} {v:.0%}" for k, v in items)

        sources = (
            f" Its squared projection on the sample comes from tokens "
            f"{top(self.token_share, repr)}; by position {top(self.position_share, str)}."
        )
        tok = max(self.token_share.items(), key=lambda kv: kv[1])[0]
        kind, where = self.source
        if kind == "position":
            pos = where
            verdict = (
                f" Mostly position {pos} (token {tok!r}): one position with a massive "
                "activation, the signature of an attention sink. Leave that position out of "
                "the sites."
            )
        elif kind == "token":
            verdict = (
                f" Mostly the token {tok!r}, at several positions: one token with a massive "
                "activation wherever it occurs."
            )
        else:
            verdict = (
                " Spread over positions and tokens: a direction the data varies along, not a "
                "single-token artefact."
            )
        return head + sources + verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "share": self.share,
            "next_share": self.next_share,
            "hits": [vars(h) for h in self.hits],
            "position_share": {str(k): v for k, v in self.position_share.items()},
            "token_share": self.token_share,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DominantDirection:
        return cls(
            d["site"],
            d["share"],
            d["next_share"],
            [TokenHit(**h) for h in d.get("hits", [])],
            {int(k): v for k, v in d.get("position_share", {}).items()},
            dict(d.get("token_share", {})),
        )


@dataclass
class SinkDiagnostic:
    """Every site's top-direction share of variance, and the sites above `threshold`."""

    threshold: float
    shares: dict[str, float]
    """Top eigenvalue / trace of the centred Gram, per site in forward order."""
    directions: list[DominantDirection]
    n_tokens: int = 0
    """Tokens of the sample the directions were traced on (0: not traced)."""

    @property
    def flagged(self) -> list[str]:
        return [d.site for d in self.directions]

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shares": self.shares,
            "directions": [d.to_json() for d in self.directions],
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SinkDiagnostic:
        dirs = [DominantDirection.from_json(x) for x in d.get("directions", [])]
        return cls(d["threshold"], dict(d["shares"]), dirs, d.get("n_tokens", 0))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SinkDiagnostic:
        return cls.from_json(json.loads(Path(path).read_text()))


def _spectrum(source: Spectra, site: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """(eigenvalues descending, top eigenvector or None, mean) of a site's centred Gram."""
    if isinstance(source, GramStatistics):
        st = source[site]
        evals, evecs = st.eigh()
        return evals, evecs[:, 0], st.mean
    basis = (source.bases if isinstance(source, BasisResult) else source)[site]
    vec = basis.C[:, 0] / basis.C[:, 0].norm() if basis.kind == "pca" and basis.k else None
    return basis.gram_eigenvalues, vec, basis.mean


def _site_names(source: Spectra) -> list[str]:
    if isinstance(source, GramStatistics):
        return [s.name for s in source.sites]
    return list(source.bases if isinstance(source, BasisResult) else source)


def top_direction_shares(source: Spectra) -> dict[str, tuple[float, float]]:
    """(top, second) eigenvalue share of the trace of each site's centred Gram, from fitted
    bases (any kind: every basis keeps the Gram spectrum) or from statistics."""
    out: dict[str, tuple[float, float]] = {}
    for name in _site_names(source):
        evals = _spectrum(source, name)[0].to(torch.float64).clamp_min(0)
        total = float(evals.sum())
        if total <= 0 or evals.numel() == 0:
            out[name] = (0.0, 0.0)
            continue
        second = float(evals[1]) / total if evals.numel() > 1 else 0.0
        out[name] = (float(evals[0]) / total, second)
    return out


def direction_sources(
    acts: Float[Tensor, "batch pos d"],
    positions: Int[Tensor, " pos"],
    token_ids: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d"],
    mean: Float[Tensor, " d"],
    decode: Decoder | None = None,
    top: int = 8,
    first_sequence: int = 0,
) -> tuple[list[TokenHit], Float[Tensor, " pos"], dict[int, float]]:
    """Projections `(act − mean) · direction` of a batch: the `top` hits by |projection|, the
    squared projection summed per position of `positions`, and per token id."""
    acts = acts.to(torch.float64)
    proj = (acts - mean.to(acts)) @ direction.to(acts)  # on the activations' device
    sq = proj.pow(2)
    per_pos = sq.sum(0)
    per_token: dict[int, float] = {}
    for tid, v in zip(token_ids.flatten().tolist(), sq.flatten().tolist()):
        per_token[tid] = per_token.get(tid, 0.0) + v
    flat = proj.abs().flatten()
    idx = flat.topk(min(top, flat.numel())).indices.tolist()
    n_pos = proj.shape[1]
    name = decode or str
    hits = [
        TokenHit(
            first_sequence + i // n_pos,
            int(positions[i % n_pos]),
            name(int(token_ids[i // n_pos, i % n_pos])),
            float(proj[i // n_pos, i % n_pos]),
        )
        for i in idx
    ]
    return hits, per_pos, per_token


def _largest(shares: Mapping[Any, float], total: float, n: int = 5) -> dict[Any, float]:
    items = sorted(shares.items(), key=lambda kv: -kv[1])[:n]
    return {k: (v / total if total > 0 else 0.0) for k, v in items}


@torch.no_grad()
def dominant_directions(
    source: Spectra,
    model: nn.Module | None = None,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor] | None = None,
    decode: Decoder | None = None,
    threshold: float = 0.5,
    top: int = 8,
    batch_size: int = 8,
) -> SinkDiagnostic:
    """Sites whose top variance direction carries more than `threshold` of the variance and,
    with `model` and `tokens`, the positions and tokens that direction comes from.

    `source` is a PCA fit (the direction is its first column), or `GramStatistics`; any other
    basis kind gives the shares but cannot trace the direction. `decode(token_id)` names tokens.
    """
    shares = top_direction_shares(source)
    flagged = [name for name, (s, _) in shares.items() if s > threshold]
    directions = [DominantDirection(n, *shares[n]) for n in flagged]
    n_tokens = 0
    traced = {d.site: d for d in directions if _spectrum(source, d.site)[1] is not None}
    if model is not None and tokens is not None and traced:
        if isinstance(source, GramStatistics):
            site_objs = {s.name: s for s in source.sites}
        else:
            bases = source.bases if isinstance(source, BasisResult) else source
            site_objs = {name: bases[name].site for name in traced}
        sites = [site_objs[name] for name in traced]
        hits: dict[str, list[TokenHit]] = {n: [] for n in traced}
        per_pos: dict[str, Counter] = {n: Counter() for n in traced}
        per_tok: dict[str, Counter] = {n: Counter() for n in traced}
        first = 0
        for batch in iter_batches(tokens, batch_size, model):
            acts = capture_sites(model, batch, sites)
            for site, act in zip(sites, acts):
                _, vec, mean = _spectrum(source, site.name)
                assert vec is not None
                pos = site.index(batch.shape[1])
                h, sq_pos, sq_tok = direction_sources(
                    act, pos, batch[:, pos], vec, mean, decode, top, first
                )
                hits[site.name] = sorted(hits[site.name] + h, key=lambda t: -abs(t.projection))
                hits[site.name] = hits[site.name][:top]
                per_pos[site.name].update(dict(zip(pos.tolist(), sq_pos.tolist())))
                per_tok[site.name].update(sq_tok)
            first += batch.shape[0]
            n_tokens += batch.numel()
        name = decode or str
        for site_name, d in traced.items():
            total = sum(per_pos[site_name].values())
            d.hits = hits[site_name]
            d.position_share = _largest(per_pos[site_name], total)
            by_string: Counter = Counter()
            for tid, v in per_tok[site_name].items():
                by_string[name(int(tid))] += v
            d.token_share = _largest(by_string, total)
    return SinkDiagnostic(threshold, {n: s for n, (s, _) in shares.items()}, directions, n_tokens)
