"""The three sources of degeneracy of Paper A, per weight map and per section, as results.

For a weight map `W: R^{d_in} → R^{d_out}` (with a bias) between an input site and an output
(pre-activation) site:

1. activations: `k = d_in − rank_ε(G)` null directions of the input's centred Gram free
   `k · d_out` weights (a constant input direction is absorbed by the bias);
2. gradients: `k' = d_out − rank_ε(K)`, `K = Σ_x Jᵀ J` with J the Jacobian of the output
   (logits or a scalar metric) with respect to the map's output, free `k' · d_in` weights;
   jointly `k d_out + k' d_in − k k'`;
3. synchronised non-linearities (`groups`): neuron and head groups, dead neurons.

`measure_sources` (module `measure`) fills these from a model and its data.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.degeneracy.config import count, non_negative
from tl_degeneracy.engine.degeneracy.groups import HeadGroups, NeuronGroups
from tl_degeneracy.engine.degeneracy.spectra import (
    DEFAULT_EPS_GRID,
    Cutoff,
    joint_free_weights,
    nullity,
    nullity_curve,
    tied_free_weights,
)
from tl_degeneracy.engine.degeneracy.weight_maps import WeightMap


@dataclass(repr=False)
class MapSources(BriefRepr):
    """Activation and gradient sources of one weight map, as spectra (counts follow)."""

    map: WeightMap
    gram_spectrum: Float[Tensor, " d_in"]
    """Eigenvalues of the input's centred Gram (for one-hot inputs: token frequencies)."""
    grad_spectrum: Float[Tensor, " d_out"]
    """Eigenvalues of K = (1/N) Σ_x JᵀJ at the output site."""

    def k(self, eps: float, cutoff: Cutoff = "relative") -> int:
        return nullity(self.gram_spectrum, eps, cutoff)

    def k_prime(self, eps: float, cutoff: Cutoff = "relative") -> int:
        return nullity(self.grad_spectrum, eps, cutoff)

    def free(self, eps: float, cutoff: Cutoff = "relative") -> dict[str, int]:
        """Free weights by activations, by gradients, and jointly."""
        k, kp = self.k(eps, cutoff), self.k_prime(eps, cutoff)
        d_in, d_out = self.map.d_in, self.map.d_out
        return {
            "k": k,
            "k_prime": kp,
            "activations": k * d_out,
            "gradients": kp * d_in,
            "joint": joint_free_weights(k, kp, d_in, d_out),
        }

    def curves(self, eps_grid: Sequence[float], cutoff: Cutoff = "relative") -> dict[str, Tensor]:
        k = nullity_curve(self.gram_spectrum, eps_grid, cutoff)
        kp = nullity_curve(self.grad_spectrum, eps_grid, cutoff)
        d_in, d_out = self.map.d_in, self.map.d_out
        return {"k": k, "k_prime": kp, "joint": k * d_out + kp * d_in - k * kp}


@dataclass
class SourcesConfig:
    """Settings of `measure_sources`."""

    eps: float = 1e-10
    """The finite-data cutoff reported as 'the' count (curves cover `eps_grid`)."""
    cutoff: Cutoff = "relative"
    eps_grid: tuple[float, ...] = DEFAULT_EPS_GRID
    positions: Literal["last", "all"] | tuple[int, ...] = "last"
    """Output positions whose logits (or metric) define J."""
    metric: Callable[[Tensor, Tensor], Tensor] | None = None
    """Optional scalar metric per sequence, `metric(logits, tokens) -> [batch]`; J is then its
    gradient instead of the logits' Jacobian."""
    max_exact_outputs: int = 32
    """Exact K (one cotangent per output unit) up to this many output units (positions ×
    vocabulary), else `n_probes` Rademacher cotangents per sequence: the estimate has the
    same range (so the same null space) once enough tokens are seen, at a fraction of the
    cost (modular addition: 114 outputs, 16 probes, 7× faster)."""
    n_probes: int = 16
    chunk_size: int = 1
    """Cotangents per backward pass; 1 (a plain loop) measured fastest on 2 CPU cores."""
    sync_tolerance: float = 0.01
    """Smooth activations: a neuron is an on/off switch when its derivative is within this of
    0 or 1 on every token."""
    head_tolerance: float = 1e-6
    """Heads agree when their attention patterns differ by at most this anywhere."""
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cutoff not in get_args(Cutoff):
            raise ValueError(f"cutoff must be 'relative' or 'absolute', got {self.cutoff!r}")
        self.eps = _cutoff_eps("eps", self.eps, self.cutoff)
        self.eps_grid = tuple(_cutoff_eps("eps_grid", e, self.cutoff) for e in self.eps_grid)
        self.positions = check_positions(self.positions)
        if self.metric is not None and not callable(self.metric):
            raise ValueError(
                f"metric must be a function (logits, tokens) -> [batch] or None, "
                f"got {self.metric!r}"
            )
        for name in ("max_exact_outputs", "n_probes", "chunk_size", "batch_size"):
            setattr(self, name, count(name, getattr(self, name), 1))
        self.seed = count("seed", self.seed, None)
        non_negative("sync_tolerance", self.sync_tolerance, "e.g. 0.01")
        non_negative("head_tolerance", self.head_tolerance, "e.g. 1e-6")


def _cutoff_eps(name: str, eps: Any, cutoff: str) -> float:
    """A cutoff ε: ≥ 0, and below 1 when relative (ε ≥ 1 would count every direction)."""
    eps = non_negative(name, eps, "e.g. 1e-10 for float64, 1e-6 for float32 activations")
    if cutoff == "relative" and eps >= 1:
        raise ValueError(
            f"{name} must be below 1 with the relative cutoff (a direction is null when its "
            f"eigenvalue is ≤ ε × the largest; ε ≥ 1 counts every direction), got {eps:g}"
        )
    return eps


Positions = Literal["last", "all"] | tuple[int, ...]


def check_positions(positions: Any) -> Positions:
    """Checked positions: "last", "all" or a non-empty tuple of ints (a list becomes a tuple)."""
    if isinstance(positions, str):
        if positions in ("last", "all"):
            return positions  # type: ignore[return-value]
        raise ValueError(f"positions must be 'last', 'all' or a tuple of ints, got {positions!r}")
    if isinstance(positions, numbers.Integral):
        raise ValueError(
            f"positions must be a tuple of ints, got {positions!r}: write ({positions},)"
        )
    try:
        out = tuple(positions)
    except TypeError:
        raise ValueError(
            f"positions must be 'last', 'all' or a tuple of ints, got {positions!r}"
        ) from None
    bad = [p for p in out if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
    if not out or bad:
        raise ValueError(
            f"positions must be 'last', 'all' or a non-empty tuple of ints, got {positions!r}"
        )
    return tuple(int(p) for p in out)


def resolve_positions(positions: Positions, n_pos: int) -> tuple[int, ...]:
    """The positions (0 ≤ p < n_pos) that "last", "all" or a tuple of indices (negative ones
    count from the end, as in Python) pick in sequences of `n_pos` tokens; a ValueError for an
    index outside the sequence."""
    positions = check_positions(positions)
    if positions == "last":
        return (n_pos - 1,)
    if positions == "all":
        return tuple(range(n_pos))
    bad = [p for p in positions if not -n_pos <= p < n_pos]
    if bad:
        raise ValueError(
            f"positions {bad} are outside sequences of {n_pos} tokens: give positions from "
            f"0 to {n_pos - 1} (or from -{n_pos} to -1, counted from the end)"
        )
    return tuple(p % n_pos for p in positions)


@dataclass(repr=False)
class SourcesResult(BriefRepr):
    """All three sources for a model on a data set."""

    maps: list[MapSources]
    neurons: dict[str, NeuronGroups]
    """Per MLP section name."""
    heads: dict[str, HeadGroups]
    """Per attention section name."""
    section_params: dict[str, int]
    """Nominal parameter count per section."""
    n_tokens: int
    config: SourcesConfig
    act_fn: str = "relu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sections(self) -> list[str]:
        return list(self.section_params)

    def section_free(self, section: str, eps: float | None = None) -> dict[str, int]:
        """Free directions of a section by source at ε, and in total (see module docstring
        for the overlap rule: joint per map, dead neurons add only their bias beyond it)."""
        eps = self.config.eps if eps is None else eps
        cut = self.config.cutoff
        out = {"activations": 0, "gradients": 0, "joint": 0, "synchronised": 0, "dead": 0}
        for m in self.maps:
            if m.map.section == section and m.map.counted:  # a tied W_U counts with W_E
                f = m.free(eps, cut)
                if m.map.tied_to is not None:  # one matrix, two uses (weight_maps.WeightMap)
                    o = next((o for o in self.maps if o.map.name == m.map.tied_to), None)
                    ko = (0, 0) if o is None else (o.k(eps, cut), o.k_prime(eps, cut))
                    uses = (f["k"], f["k_prime"]), ko
                    f["joint"] = tied_free_weights(*uses, m.map.d_in, m.map.d_out)
                for key in ("activations", "gradients", "joint"):
                    out[key] += f[key]
        extra = 0
        if section in self.neurons:
            g = self.neurons[section]
            out["synchronised"] = g.free_synchronised
            out["dead"] = g.free_dead
            # a dead neuron's W_in column and W_out row are already free by gradients and
            # activations (its pre-activation is unread, its output is constant zero); only
            # its bias b_in is new
            extra = g.free_synchronised + g.n_dead
        if section in self.heads:
            out["synchronised"] = self.heads[section].free
            extra = self.heads[section].free
        out["total"] = min(out["joint"] + extra, self.section_params[section])
        return out

    def upper_bound(self, section: str | None = None, eps: float | None = None) -> int:
        """`N − free`: the upper bound on N_eff of a section (or the whole model)."""
        names = [section] if section is not None else self.sections
        return sum(self.section_params[s] - self.section_free(s, eps)["total"] for s in names)

    def bound_curve(self, section: str | None = None) -> Int[Tensor, " eps"]:
        return torch.tensor([self.upper_bound(section, e) for e in self.config.eps_grid])
