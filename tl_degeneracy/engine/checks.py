"""Checks of settings that several configs share, so that each is refused with one message."""

from __future__ import annotations

import numbers


def whole_number(name: str, value: object, minimum: int = 1) -> int:
    """`value` as an `int` (Python or NumPy integers; not bools or floats), or a `ValueError`
    naming the setting, the value and the smallest one allowed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return int(value)
