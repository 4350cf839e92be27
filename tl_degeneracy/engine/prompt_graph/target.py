"""What a prompt graph explains: one scalar of the logits (a logit, a logit difference, or any
metric of the logits at a position)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

TargetFn = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


@dataclass(frozen=True)
class Target:
    """A scalar per sequence computed from the logits, `fn(logits) -> [batch]`.

    `position` is the position it reads (the viewer draws the target node there); `spec`
    describes it in JSON (`{"kind": "logit", "token": 42}`), so that a saved graph says what it
    explained.
    """

    name: str
    fn: TargetFn = field(compare=False, repr=False)
    position: int = -1
    spec: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def logit(cls, token: int, position: int = -1, label: str | None = None) -> Target:
        """The logit of `token` at `position`."""
        token = int(token)

        def fn(logits: Tensor) -> Tensor:
            return logits[:, position, token].to(torch.float64)

        name = f"logit({label or token})"
        return cls(name, fn, position, {"kind": "logit", "token": token})

    @classmethod
    def logit_difference(
        cls, good: int, bad: int, position: int = -1, labels: tuple[str, str] | None = None
    ) -> Target:
        """`logit(good) − logit(bad)` at `position` (e.g. the indirect object against the
        subject)."""
        good, bad = int(good), int(bad)

        def fn(logits: Tensor) -> Tensor:
            last = logits[:, position].to(torch.float64)
            return last[:, good] - last[:, bad]

        a, b = labels or (str(good), str(bad))
        spec = {"kind": "logit_difference", "good": good, "bad": bad}
        return cls(f"logit({a}) - logit({b})", fn, position, spec)

    @classmethod
    def from_metric(cls, fn: TargetFn, name: str | None = None, position: int = -1) -> Target:
        """Any differentiable scalar of the logits, one value per sequence."""
        label = name or str(getattr(fn, "__name__", "metric"))
        return cls(label, fn, position, {"kind": "metric", "name": label})

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        self._check_reads(logits)
        value = self.fn(logits)
        if not isinstance(value, Tensor) or value.shape != (logits.shape[0],):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"target {self.name!r} must return one value per sequence, shape "
                f"({logits.shape[0]},); got {got}"
            )
        return value.to(torch.float64)

    def _check_reads(self, logits: Tensor) -> None:
        """Name a position or token id outside the logits (indexing would raise a bare
        IndexError, or read another position from the end)."""
        n_pos, d_vocab = logits.shape[-2], logits.shape[-1]
        if not -n_pos <= self.position < n_pos:
            raise IndexError(
                f"target {self.name!r} reads position {self.position}, outside the prompt's "
                f"{n_pos} tokens (0 to {n_pos - 1}, or -{n_pos} to -1 from the end)"
            )
        ids = [v for k, v in self.spec.items() if k in ("token", "good", "bad")]
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise IndexError(
                f"target {self.name!r} reads token id {bad[0]}, outside this model's "
                f"vocabulary [0, {d_vocab}): take ids from this model's tokenizer"
            )

    def metric(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The target as a `(logits, tokens)` metric of `engine.attribution`."""
        return lambda logits, tokens: self(logits)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "position": self.position, **self.spec}


TargetLike = Target | int | tuple[int, int] | TargetFn


def as_target(target: TargetLike) -> Target:
    """A `Target` from a `Target`, a token id (its logit; an int, a NumPy integer or a 0-d
    integer tensor such as `logits.argmax()`), a `(good, bad)` pair of them (their logit
    difference) or a function of the logits (at the last position)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, bool):
        raise TypeError("a target is a Target, a token id, a (good, bad) pair or a function")
    token = _token_id(target)
    if token is not None:
        return Target.logit(token)
    if isinstance(target, (tuple, list)) and len(target) == 2:
        good, bad = (_token_id(t) for t in target)
        if good is None or bad is None:
            raise TypeError(
                f"a (good, bad) target is a pair of token ids, got {target!r}: pass two integers"
            )
        return Target.logit_difference(good, bad)
    if callable(target):
        return Target.from_metric(target)
    raise TypeError(
        f"cannot make a target of {target!r}: pass a Target, a token id, a (good, bad) pair of "
        "token ids or a function logits -> [batch]"
    )


def _token_id(value: object) -> int | None:
    """`value` as a token id when it is one: a Python, NumPy or 0-d integer torch scalar (what
    `logits.argmax()` or `tokenizer.encode(...)[0]` give); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point():
        if value.dtype != torch.bool and not value.is_complex():
            return int(value.item())
    return None
