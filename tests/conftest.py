"""Session set-up for the ntk-poison tests.

x64 is the user's switch in ntk-poison (``ntk_poison.enable_x64``); the test session
turns it on at import so that theory checks run in float64. Tests that exercise
float32 pass float32 arrays explicitly.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ntk_poison  # noqa: E402,F401  (applies the neural-tangents compatibility patch)

# `from oracles import ...` in the test modules: the numpy references live beside this
# file (pytest's rootdir insertion does this too, but not if tests/ becomes a package).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator per test (tests are order-independent)."""
    return np.random.default_rng(20240601)
