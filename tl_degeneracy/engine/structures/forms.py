"""Closed forms a section can have, in the row convention `y = x J` per position.

A *form* says what a section computes in weights, independent of the model it came from: the
structure recognisers (TransformerLens blocks) and models that declare their own sections
(`DeclaresSections`, e.g. an MLP written as a `HookedRootModule`) both produce forms, and the
structures that compute `M'`, edges and ablated rows from them read only the form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class AffineRelu:
    """`y = x P + ReLU(x W_in + b_in) Q + c` at every position (input and output positions
    matched). `P` None means no direct path; `Q` None means the hidden layer is the output
    (`Q = I`). Covers a ReLU MLP with residual (`P = I`, `Q = W_out`), a ReLU layer of a plain
    MLP (`P = None`, `Q = I`) and an MLP into a composite site (`P = [0 | I]`, `Q = [I | 0]`)."""

    W_in: Float[Tensor, "d_in d_hidden"]
    b_in: Float[Tensor, " d_hidden"]
    Q: Float[Tensor, "d_hidden d_out"] | None
    P: Float[Tensor, "d_in d_out"] | None
    c: Float[Tensor, " d_out"]

    @property
    def d_out(self) -> int:
        return int(self.c.shape[0])

    def read(self) -> Float[Tensor, "d_hidden d_out"]:
        """`Q`, materialised."""
        if self.Q is not None:
            return self.Q
        return torch.eye(self.W_in.shape[1], dtype=self.W_in.dtype, device=self.W_in.device)

    def direct(self) -> Float[Tensor, "d_in d_out"]:
        """`P`, materialised (zeros when there is no direct path)."""
        if self.P is not None:
            return self.P
        return self.W_in.new_zeros(self.W_in.shape[0], self.d_out)

    def __call__(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        y = torch.relu(x @ self.W_in + self.b_in) @ self.read() + self.c
        return y if self.P is None else y + x @ self.P


@dataclass(frozen=True)
class Affine:
    """`y = x P + c` at every position: a constant Jacobian (an unembedding without a final
    norm; the linear map out of a composite MLP or attention site)."""

    P: Float[Tensor, "d_in d_out"]
    c: Float[Tensor, " d_out"]

    def __call__(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return x @ self.P + self.c


Form = AffineRelu | Affine


@runtime_checkable
class DeclaresSections(Protocol):
    """A model that states the closed form of some of its sections (hook name to hook name,
    positions matched), so the engine can use it instead of autograd. Return None for a
    section without one. Forms are tested against autograd like every other structure."""

    def section_form(self, inp: str, out: str) -> Form | None: ...
