"""Synchronised non-linearities: MLP neurons with identical on/off patterns over the data, and
attention heads whose patterns agree (the third source of degeneracy).

A group S of neurons with the same pattern adds `|S|(|S| − 1)` free directions (always-on
neurons form such a group: they are linear); dead neurons free all their weights; a group S of
heads adds `|S|(|S| − 1) d_head²` (their OV circuits can exchange weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_degeneracy.engine.brief_repr import BriefRepr


@dataclass(repr=False)
class NeuronGroups(BriefRepr):
    """Neurons grouped by their on/off pattern over the data (one MLP layer)."""

    labels: Int[Tensor, " neurons"]
    """Group id of each neuron (equal ids: identical patterns); −1 for neurons that are not
    on/off switches on the data within the tolerance (smooth activations only)."""
    dead: Bool[Tensor, " neurons"]
    always_on: Bool[Tensor, " neurons"]
    weights_per_neuron: int = 0
    """Input + output weights (+ bias) of one neuron: what a dead neuron frees."""

    @property
    def groups(self) -> list[Int[Tensor, " size"]]:
        """Neuron indices of every group of two or more live neurons (always-on included)."""
        live = (self.labels >= 0) & ~self.dead
        ids, counts = torch.unique(self.labels[live], return_counts=True)
        return [torch.nonzero(self.labels == i).flatten() for i in ids[counts >= 2].tolist()]

    @property
    def group_sizes(self) -> list[int]:
        return sorted((len(g) for g in self.groups), reverse=True)

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())

    @property
    def n_always_on(self) -> int:
        return int(self.always_on.sum())

    @property
    def n_eligible(self) -> int:
        return int((self.labels >= 0).sum())

    @property
    def free_synchronised(self) -> int:
        """Σ_S |S|(|S| − 1) over groups of live neurons."""
        return sum(s * (s - 1) for s in self.group_sizes)

    @property
    def free_dead(self) -> int:
        """All weights of dead neurons."""
        return self.n_dead * self.weights_per_neuron


def pattern_groups(
    patterns: Bool[Tensor, "samples neurons"],
    eligible: Bool[Tensor, " neurons"] | None = None,
    weights_per_neuron: int = 0,
) -> NeuronGroups:
    """Group neurons whose boolean patterns over the samples are identical.

    Vectorised: the columns are bit-packed and grouped by `np.unique` (a sort), never compared
    pairwise. Neurons outside `eligible` get label −1.
    """
    bits = np.packbits(patterns.numpy().astype(bool), axis=0)
    return groups_from_bits(bits, ~patterns.any(0), patterns.all(0), eligible, weights_per_neuron)


def groups_from_bits(
    bits: np.ndarray,
    dead: Bool[Tensor, " neurons"],
    always_on: Bool[Tensor, " neurons"],
    eligible: Bool[Tensor, " neurons"] | None = None,
    weights_per_neuron: int = 0,
) -> NeuronGroups:
    """`pattern_groups` from bit-packed patterns `[bytes, neurons]` (any zero padding is the
    same for every neuron) and the neurons' dead / always-on flags."""
    n = bits.shape[1]
    labels = torch.zeros(n, dtype=torch.int64)
    if n:
        _, inverse = np.unique(bits.T, axis=0, return_inverse=True)
        labels = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    dead, always_on = dead.clone(), always_on.clone()
    if eligible is not None:
        labels = torch.where(eligible, labels, torch.full_like(labels, -1))
        dead &= eligible
        always_on &= eligible
    return NeuronGroups(labels, dead, always_on, weights_per_neuron)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def switch_pattern(
    pre: Float[Tensor, "samples neurons"],
    act_fn: str = "relu",
    tolerance: float = 0.01,
) -> tuple[Bool[Tensor, "samples neurons"], Bool[Tensor, " neurons"]]:
    """On/off pattern `pre > 0` and, per neuron, whether it acts as an on/off switch on every
    sample: always for ReLU; for a smooth activation when its derivative is within
    `tolerance` of 0 or of 1 on every sample (so the neuron is linear or off wherever it is
    evaluated, and neurons with equal patterns can mix like ReLU neurons)."""
    on = pre > 0
    if act_fn == "relu":
        return on, torch.ones(pre.shape[1], dtype=torch.bool)
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act_fn!r}; known: {sorted(ACTIVATIONS)}")
    x = pre.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        (slope,) = torch.autograd.grad(ACTIVATIONS[act_fn](x).sum(), x)
    switch = (slope.abs() <= tolerance) | ((slope - 1).abs() <= tolerance)
    return on, switch.all(0)


@dataclass(repr=False)
class HeadGroups(BriefRepr):
    """Attention heads of one layer grouped by agreeing patterns on the data."""

    labels: Int[Tensor, " heads"]
    max_difference: Float[Tensor, "heads heads"]
    """Largest absolute difference of the two heads' attention patterns over the data."""
    tolerance: float
    d_head: int

    @property
    def groups(self) -> list[list[int]]:
        ids, counts = torch.unique(self.labels, return_counts=True)
        out = [torch.nonzero(self.labels == i).flatten().tolist() for i in ids.tolist()]
        return [g for g, c in zip(out, counts.tolist()) if c >= 2]

    @property
    def free(self) -> int:
        """Σ_S |S|(|S| − 1) d_head²: OV weight the heads of a group can exchange."""
        return sum(len(g) * (len(g) - 1) for g in self.groups) * self.d_head**2


def head_groups(
    max_difference: Float[Tensor, "heads heads"], tolerance: float, d_head: int
) -> HeadGroups:
    """Connected components of the graph 'patterns agree within `tolerance`'."""
    from scipy.sparse.csgraph import connected_components

    agree = (max_difference <= tolerance).numpy()
    _, labels = connected_components(agree, directed=False)
    return HeadGroups(torch.from_numpy(labels.astype(np.int64)), max_difference, tolerance, d_head)
