"""The error raised for bad loss inputs (out-of-range targets, mismatched shapes, bad options)."""

from __future__ import annotations

from rwkvslice.errors import RWKVSliceError


class SlicingError(RWKVSliceError, ValueError):
    """Invalid input to the sliced loss: a target id outside [0, V) other than -100, shapes that do not
    match, or an unknown option. Also a ValueError, so generic callers can catch it."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SlicingError(message)
