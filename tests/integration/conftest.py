"""Fixtures for this torch layer (torch is installed here, unlike in tests/static)."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, so a failure reproduces alone and in any order."""
    random.seed(0)
    torch.manual_seed(0)
    yield
