"""The one place that makes neural-tangents 0.6.5 import and run on current JAX.

neural-tangents 0.6.5 (its last release) was written against JAX 0.4 and SciPy < 1.14.
Two kinds of fixes live here.

**Import-time names** (applied by :func:`patch` itself). On JAX >= 0.6 neural-tangents
fails at import time because names it uses have moved:

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

**Run-time fixes inside neural-tangents modules** (applied when those modules are
imported, by a post-import hook that :func:`patch` installs, so that ``import
ntk_poison`` still does not import neural-tangents). Each replaces one module-level
name that ONE neural-tangents module looks up: a module it imported, by a
:class:`_ModuleView` of it (the same module, with only the missing/changed attributes
supplied), or one of its own helper functions. Nothing in JAX or SciPy themselves is
changed, except one added class attribute (``Primitive.map_primitive``).
Found by running neural-tangents' own test suite (``make test-upstream``):

* ``neural_tangents._src.predict``:

  - ``sp`` (SciPy): ``max_learning_rate`` calls
    ``scipy.linalg.eigvalsh(..., eigvals=(lo, hi))``; SciPy 1.14 removed ``eigvals``
    in favour of ``subset_by_index`` (same inclusive index pair). The view's
    ``sp.linalg.eigvalsh`` renames the argument.
  - ``jax`` : ``gradient_descent_mse`` computes the eigendecomposition of
    ``k_train_train`` inside ``jax.core.eval_context()`` (to cache it eagerly). On
    JAX 0.4 that meant "evaluate eagerly what is concrete, trace what is traced"; on
    stackless JAX (>= 0.4.36) it sends every operation to the eval trace, so a traced
    ``k_train_train`` (e.g. ``gradient_descent_mse`` under ``vmap`` over an ensemble
    of empirical kernels) raises ``UnexpectedTracerError``. The
    view's ``jax.core.eval_context`` is ``jax.ensure_compile_time_eval``, today's
    spelling of the old meaning. For a concrete kernel (the only case that worked
    before) both evaluate the same operations eagerly, so the numbers are identical.

* ``neural_tangents._src.empirical`` (only its ``STRUCTURED_DERIVATIVES`` and ``AUTO``
  empirical-NTK implementations; neural-tangents' own tests use the former as
  reference):

  - ``ad``: ``jax.interpreters.ad.linearize`` changed from
    ``linearize(wrapped_fun, *primals, has_aux)`` returning
    ``(out_primals, out_tangent_pvals, jaxpr, consts)`` to
    ``linearize(fun, primals_flat_tree, has_aux, is_vjp)`` returning
    ``(out_primals_flat_tree, out_zeros, jaxpr, consts)``; the view supplies the old
    signature on top of the new one (:func:`_linearize_jax04`). ``ad.config``
    (``jax_enable_checks``), ``ad.source_info_util``, ``ad.reducing_transposes`` and
    ``ad.add_tangents`` are no longer re-exported by ``jax.interpreters.ad``; the view
    falls back to ``jax._src.interpreters.ad`` and ``jax.config``.
  - ``core``: ``jax.core.DShapedArray`` (dynamic shapes) was removed; the view's is a
    class with no instances, so neural-tangents' ``type(aval) is DShapedArray`` test
    is False, as it always is now.
  - ``Primitive.map_primitive`` (the ``xmap``/``pmap`` flag) was removed from JAX's
    ``Primitive`` class; neural-tangents reads it on every equation. It is added back
    as the class attribute ``False`` (no primitive maps any more); nothing else in the
    environment reads it.
  - ``_get_flops`` (used only by ``NtkImplementation.AUTO`` to pick the cheapest
    implementation): ``Compiled.cost_analysis()`` now returns a dict, not a list of
    dicts, so its ``[0]`` raised ``KeyError: 0``. The module function is replaced by
    one that accepts both (:func:`_get_flops`).

The default empirical-NTK implementation (``JACOBIAN_CONTRACTION``) and ``nt.stax``
kernels do not go through any of these names.

:func:`patch` is idempotent and is called by ``ntk_poison/__init__.py`` before
anything imports ``neural_tangents``. Every fix is applied only where the old name or
argument is missing (``_get_flops`` handles both return types), so on an old
JAX/SciPy that still has them it changes nothing.
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


class _ModuleView(types.ModuleType):
    """A module as ONE neural-tangents module sees it: a few names supplied.

    Attribute look-ups go to ``overrides`` first, then to the real ``module``, then
    to ``fallback`` (e.g. the private module a name was moved to). The real module is
    not modified; only the neural-tangents module whose global is replaced sees this.
    """

    def __init__(self, module: types.ModuleType, overrides: dict | None = None,
                 fallback: types.ModuleType | None = None):
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update(overrides or {})
        self.__dict__["_view_of"] = module
        self.__dict__["_view_fallback"] = fallback

    def __getattr__(self, name: str):
        try:
            return getattr(self.__dict__["_view_of"], name)
        except AttributeError:
            fallback = self.__dict__["_view_fallback"]
            if fallback is None or name.startswith("__"):
                raise
            return getattr(fallback, name)


# --- neural_tangents._src.predict ------------------------------------------------------

def _eigvalsh_accepting_eigvals(a, b=None, *args, eigvals=None, **kwargs):
    """``scipy.linalg.eigvalsh`` that also accepts the removed ``eigvals=(lo, hi)``.

    ``eigvals`` (removed in SciPy 1.14) and ``subset_by_index`` both select the
    eigenvalues with ascending indices ``lo..hi`` inclusive.
    """
    import scipy.linalg
    if eigvals is not None:
        if kwargs.get("subset_by_index") is not None:
            raise TypeError("eigvalsh: give eigvals or subset_by_index, not both")
        kwargs["subset_by_index"] = eigvals
    return scipy.linalg.eigvalsh(a, b, *args, **kwargs)


def _scipy_lacks_eigvals() -> bool:
    import inspect

    import scipy.linalg
    try:
        return "eigvals" not in inspect.signature(scipy.linalg.eigvalsh).parameters
    except (TypeError, ValueError):  # pragma: no cover - signature unavailable
        return False


def _jax_is_stackless() -> bool:
    """True where ``jax.core.eval_context`` routes everything to the eval trace."""
    import jax
    from jax._src import core as src_core
    return (hasattr(src_core, "set_current_trace")
            and hasattr(jax, "ensure_compile_time_eval"))


def _fix_predict(module: types.ModuleType) -> None:
    """Fix ``max_learning_rate`` (SciPy ``eigvals``) and ``eval_context`` (stackless JAX)."""
    sp = getattr(module, "sp", None)
    if sp is not None and not isinstance(sp, _ModuleView) and _scipy_lacks_eigvals():
        import scipy.linalg
        module.sp = _ModuleView(sp, {"linalg": _ModuleView(
                scipy.linalg, {"eigvalsh": _eigvalsh_accepting_eigvals})})

    jax_ = getattr(module, "jax", None)
    if jax_ is not None and not isinstance(jax_, _ModuleView) and _jax_is_stackless():
        import jax.core
        module.jax = _ModuleView(jax_, {"core": _ModuleView(
                jax.core, {"eval_context": jax_.ensure_compile_time_eval})})


# --- neural_tangents._src.empirical ----------------------------------------------------

class _TangentPVal:
    """The part of JAX 0.4's ``PartialVal`` that neural-tangents reads: ``is_known()``.

    A linearized output's tangent is "known" exactly when it is a symbolic zero.
    """

    __slots__ = ("_known",)

    def __init__(self, known: bool):
        self._known = bool(known)

    def is_known(self) -> bool:
        return self._known

    def __repr__(self) -> str:
        return f"_TangentPVal(known={self._known})"


def _linearize_jax04(traceable, *primals, **kwargs):
    """``jax.interpreters.ad.linearize`` with JAX 0.4's signature, on current JAX.

    Returns ``(out_primals, out_tangent_pvals, jaxpr, consts)``: the flat primal
    outputs, one object per output whose ``is_known()`` is True iff that output's
    tangent is a symbolic zero, and the linear (tangent) jaxpr with its constants,
    whose invars are the tangents of ``primals`` and whose outvars are the non-zero
    output tangents -- what JAX 0.4 returned.
    """
    from jax._src.interpreters import ad as src_ad
    from jax._src.tree_util import FlatTree

    has_aux = kwargs.pop("has_aux", False)
    if has_aux or kwargs:
        raise NotImplementedError(
                "ntk_poison._compat: the JAX 0.4 `linearize` adapter supports only "
                "has_aux=False (all neural-tangents 0.6.5 uses)")
    fun = traceable.call_wrapped if hasattr(traceable, "call_wrapped") else traceable
    out_primals_ft, out_zeros, jaxpr, consts = src_ad.linearize(
            fun, FlatTree.flatten(tuple(primals)), has_aux=False)[:4]
    out_primals = list(out_primals_ft.vals)
    pvals = [_TangentPVal(known=zero) for zero in out_zeros]
    return out_primals, pvals, jaxpr, consts


class _NoDShapedArray:
    """Stands in for the removed ``jax.core.DShapedArray``: no aval is one."""


def _get_flops(f, optimize: bool, *a, **kw) -> float:
    """neural-tangents' ``empirical._get_flops``, for a dict from ``cost_analysis()``.

    ``Compiled.cost_analysis()`` returned a list with one dict per device program on
    JAX 0.4 and returns the dict itself now; neural-tangents indexed ``[0]``.
    """
    import jax
    lowered = jax.jit(f).lower(*a, **kw)
    analysis = lowered.compile().cost_analysis() if optimize else lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return analysis["flops"]


def _fix_empirical(module: types.ModuleType) -> None:
    """Make the ``STRUCTURED_DERIVATIVES`` implementation run (see module docstring)."""
    import inspect

    ad = getattr(module, "ad", None)
    if ad is not None and not isinstance(ad, _ModuleView):
        params = inspect.signature(ad.linearize).parameters.values()
        overrides = {}
        if not any(p.kind is p.VAR_POSITIONAL for p in params):
            overrides["linearize"] = _linearize_jax04
        if not hasattr(getattr(ad, "config", None), "jax_enable_checks"):
            import jax
            overrides["config"] = jax.config
        if overrides:
            from jax._src.interpreters import ad as src_ad
            module.ad = _ModuleView(ad, overrides, fallback=src_ad)

    core = getattr(module, "core", None)
    if (core is not None and not isinstance(core, _ModuleView)
            and not hasattr(core, "DShapedArray")):
        module.core = _ModuleView(core, {"DShapedArray": _NoDShapedArray})

    if getattr(module, "_get_flops", None) not in (None, _get_flops):
        module._get_flops = _get_flops

    from jax._src import core as src_core
    if not hasattr(src_core.Primitive, "map_primitive"):
        src_core.Primitive.map_primitive = False


#: neural-tangents modules fixed when they are imported, and how.
NT_MODULE_FIXES = {
    "neural_tangents._src.predict": _fix_predict,
    "neural_tangents._src.empirical": _fix_empirical,
}


class _FixingLoader:
    """Runs the real loader, then the module's fix; everything else is delegated.

    (Duck-typed loader and finder below: importing ``importlib.abc`` would add tens of
    milliseconds to ``import ntk_poison``.)
    """

    def __init__(self, loader, fix):
        self._loader = loader
        self._fix = fix

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._fix(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _NeuralTangentsFixFinder:
    """Post-import hook: finds the modules of :data:`NT_MODULE_FIXES` with the other
    finders and wraps their loader so that the fix runs right after the module."""

    def find_spec(self, fullname, path, target=None):
        fix = NT_MODULE_FIXES.get(fullname)
        if fix is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _FixingLoader(spec.loader, fix)
        return spec


def _install_neural_tangents_fixes() -> None:
    if not any(isinstance(f, _NeuralTangentsFixFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _NeuralTangentsFixFinder())
    for name, fix in NT_MODULE_FIXES.items():  # already imported: fix in place
        module = sys.modules.get(name)
        if module is not None:
            fix(module)


def patch() -> None:
    """Restore the JAX names neural-tangents 0.6.5 imports, stub `experimental`, and
    install the post-import fixes of :data:`NT_MODULE_FIXES`.

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
    _install_neural_tangents_fixes()
    _PATCHED = True
