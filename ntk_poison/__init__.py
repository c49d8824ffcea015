"""ntk-poison: data poisoning, backdoors and their defences in the NTK regime.

A wide network trained by gradient flow is kernel ridge regression with its neural
tangent kernel. This package simulates clone poisons, their input-curvature spike
and the input-gradient-penalty defence in that exact model (see THEORY.md).

x64 is the user's switch: call :func:`enable_x64` or set ``JAX_ENABLE_X64=1``.
"""

import contextlib

from ntk_poison import _compat

_compat.patch()  # before anything imports neural_tangents

from ntk_poison import kernels, krr, poison, theory  # noqa: E402

__version__ = "0.2.0"


@contextlib.contextmanager
def x64_scope(enable: bool = True):
    """A context in which JAX's x64 switch is ``enable``; the old value is restored on
    exit (every experiment's ``run`` uses it, so a run leaves the global config as it
    found it)."""
    import jax
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", bool(enable))
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def enable_x64(enable: bool = True) -> None:
    """Switch JAX to float64 (the theory checks need it). Same as JAX_ENABLE_X64=1."""
    import jax
    jax.config.update("jax_enable_x64", bool(enable))


def __getattr__(name):
    # Lazily import the modules that pull in heavier dependencies.
    import importlib
    if name in ("data", "report", "spectra", "flow", "nets", "defences", "cli", "artefact",
                "triggers", "config", "io", "linalg", "models", "joint", "penalty",
                "penalized", "metrics", "attacks", "scenario", "continuum", "modes", "floor",
                "linear", "train", "convnets", "certify"):
        return importlib.import_module(f"ntk_poison.{name}")
    raise AttributeError(f"module 'ntk_poison' has no attribute {name!r}")
