"""Placeholder: the fast CPU path is being written (see issue 2). Falls back to the reference loop."""

from rwkvslice.ops.wkv7_reference import wkv7_reference as wkv7_torch  # noqa: F401
