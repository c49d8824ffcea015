"""The one place that makes neural-tangents 0.6.5 import on current JAX.

neural-tangents 0.6.5 (its last release) was written against JAX 0.4. On JAX >= 0.6
it fails at import time because names it uses have moved:

* ``jax.core.{Jaxpr, JaxprEqn, Literal, Var, Primitive}`` now live in
    ``jax.extend.core``;
* the module ``jax.util`` (``safe_map``, ``safe_zip``) is gone; the functions are
    still in ``jax._src.util``;
* ``jax.interpreters.ad.zeros_like_p`` is gone (it is ``jax._src.ad_util.zeros_like_p``
    where it still exists; otherwise a never-bound placeholder primitive is enough,
    because neural-tangents only uses it as a key of its structure-rule tables).

Its ``experimental`` subpackage needs TensorFlow (through tf2jax). ntk-poison never
uses it and keeps TensorFlow out of the environment, so this module registers a stub
``neural_tangents.experimental`` that raises a clear ImportError on attribute access.

:func:`patch` is idempotent and is called by ``ntk_poison/__init__.py`` before
anything imports ``neural_tangents``. Known limitation: the
``NtkImplementation.STRUCTURED_DERIVATIVES`` empirical-NTK method does not work on
current JAX even with these names restored; ntk-poison never selects it.
"""

from __future__ import annotations

import sys
import types

_PATCHED = False

#: Names that moved from ``jax.core`` to ``jax.extend.core``.
MOVED_CORE_NAMES = ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive")


class _ExperimentalStub(types.ModuleType):
    """Stands in for ``neural_tangents.experimental`` (which needs TensorFlow)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
                f"neural_tangents.experimental.{name} needs TensorFlow, which ntk-poison "
                "deliberately does not install. Use neural_tangents.empirical_ntk_fn "
                "(JAX) instead.")


def patch() -> None:
    """Restore the JAX names neural-tangents 0.6.5 imports, and stub `experimental`.

    Safe to call more than once; it only adds names that are missing, so on an old
    JAX that still has them it changes nothing.
    """
    global _PATCHED
    if _PATCHED:
        return
    import jax
    import jax.core
    import jax.interpreters.ad as ad

    try:
        import jax.extend.core as extend_core
    except ImportError:  # very old JAX: nothing moved
        extend_core = None
    if extend_core is not None:
        for name in MOVED_CORE_NAMES:
            if not hasattr(jax.core, name) and hasattr(extend_core, name):
                setattr(jax.core, name, getattr(extend_core, name))

    if "jax.util" not in sys.modules:
        try:
            import jax.util  # noqa: F401
        except ImportError:
            from jax._src import util as _src_util
            util = types.ModuleType("jax.util")
            util.safe_map = _src_util.safe_map
            util.safe_zip = _src_util.safe_zip
            sys.modules["jax.util"] = util
            jax.util = util

    if not hasattr(ad, "zeros_like_p"):
        try:
            from jax._src.ad_util import zeros_like_p
        except ImportError:
            zeros_like_p = jax.core.Primitive("zeros_like")
        ad.zeros_like_p = zeros_like_p

    if "neural_tangents.experimental" not in sys.modules:
        sys.modules["neural_tangents.experimental"] = _ExperimentalStub(
                "neural_tangents.experimental")
    _PATCHED = True
