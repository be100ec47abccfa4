"""Argument predicates shared by the input checks of the public APIs."""

from __future__ import annotations

import numbers

__all__ = ["is_int"]


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), and not a bool, which would otherwise pass as 0 or 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
