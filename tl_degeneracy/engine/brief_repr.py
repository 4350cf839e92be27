"""Short reprs for results: what a result holds (shapes, counts, headline numbers), never the
values of its tensors, traces or metadata.

A dataclass's own repr prints every field in full: a `print(report)` of an SGLD estimate ran
to its every loss trace, and an interaction graph to its every edge matrix and fingerprint.
Classes that hold such data inherit `BriefRepr` and are declared `@dataclass(repr=False)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from torch import Tensor

WIDTH = 60
"""Longest repr of one field before it is summarised by its type and length."""
HIDDEN = frozenset({"metadata", "state", "versions"})
"""Fields left out: provenance and resumable state, not what the result says."""


def brief(value: Any, nested: bool = False) -> str:
    """One short line for `value`: a tensor by its shape and dtype, a container by its length
    (or its items, when they are short), a number to 4 significant figures."""
    if isinstance(value, Tensor):
        if value.numel() == 1 and value.ndim == 0:
            return f"{value.item():.4g}"
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)} {value.dtype}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else repr(value)
    if isinstance(value, BriefRepr):
        text = repr(value)
        return text if len(text) <= WIDTH and not nested else f"{type(value).__name__}(...)"
    if isinstance(value, dict):
        if not nested and len(value) <= 6:
            items = ", ".join(f"{k!r}: {brief(v, nested=True)}" for k, v in value.items())
            if len(items) <= WIDTH:
                return "{" + items + "}"
        return f"{{{len(value)} entries}}"
    if isinstance(value, (list, tuple)):
        text = repr(value) if all(_is_atom(v) for v in value) else ""
        if text and len(text) <= WIDTH:
            return text
        return f"[{len(value)} {type(value[0]).__name__ if value else 'item'}s]"
    text = repr(value)
    return text if len(text) <= WIDTH else f"{type(value).__name__}(...)"


def _is_atom(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


class BriefRepr:
    """Mixin: `ClassName(field=brief(value), ...)` over the dataclass fields, leaving out
    `HIDDEN` ones and those declared `repr=False`. Declare the class `@dataclass(repr=False)`,
    or the dataclass's own repr replaces this one."""

    def __repr__(self) -> str:
        fields = [
            f
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.repr and f.name not in HIDDEN
        ]
        body = ", ".join(f"{f.name}={brief(getattr(self, f.name))}" for f in fields)
        return f"{type(self).__name__}({body})"
