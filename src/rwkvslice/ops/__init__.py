"""Operators. Each op has its own module with a plain reference beside its fast paths."""

from rwkvslice.ops.wkv7 import BACKENDS, wkv7

__all__ = ["wkv7", "BACKENDS"]
