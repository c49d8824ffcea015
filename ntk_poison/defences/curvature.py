"""Input-curvature detection of triggered test inputs (THEORY.md sections 1, 2 and 4).

A clone cluster at ``zeta`` makes a bump in the fitted function. At a triggered input
``x0`` at distance ``r`` from ``zeta`` the poison adds ``y_t S grad_x k(x0, zeta)`` to
``grad_x f``, and the top eigenvalue of the loss's input Hessian

    H(x) = hess_x 1/2 (f(x) - y)^2 = g g^T + (f(x) - y) hess_x f(x),   g = grad_x f(x)

carries the spike ``Lambda_GN(x0) = R_k(x0, zeta) Delta f(x0)^2`` (for the RBF
kernel ``R_k = r^2 / l^4``). The detector scores each input by that top eigenvalue
and flags inputs whose curvature is above what clean inputs show.

It needs NO trigger knowledge: :meth:`CurvatureDetector.fit` sets the threshold to
the ``(1 - fpr)`` quantile of the scores of clean inputs. A trigger direction, if
given, is only used to REPORT the squared cosine between each top eigenvector and it
(the overlap metric of THEORY.md section 4), never to flag.

Labels. The loss needs a label. A test input has none, so by default the detector
uses the model's own decision: ``y = sign f(x)`` (``+1`` where ``f(x) = 0``) for a
scalar output (``+-1`` targets), and for C outputs the CENTRED one-hot row of
``argmax_c f_c(x)`` (``1 - 1/C`` there, ``-1/C`` elsewhere: the all-to-one targets of
:mod:`ntk_poison.scenario`; ``centred=False``: the plain one-hot row), with the loss
``1/2 |f(x) - y|^2`` summed over outputs. Pass ``y`` for anything else.

Cost per input: ``"dense"`` forms the ``d x d`` Hessian (``spectra.loss_hessian``,
``jax.hessian`` vmap'd over points) and a batched ``eigh``: O(d^2) memory, O(d^3)
time. ``"lanczos"`` runs block Lanczos (``spectra.lanczos_hessian``) on
Hessian-vector products inside one jit-compiled program per chunk shape and model
structure (so its Python-side checks and tracing run once, not per input), on the
single input of a chunk of one, or ``jax.vmap``'d over the points of a larger chunk
(its ``while_loop`` then runs until the slowest point of the chunk converges).

Chunk size. ``batch_size=None`` (the default) means 256 inputs a chunk for
``"dense"`` and ONE input a chunk for ``"lanczos"``. Under ``vmap`` the small
Rayleigh-Ritz ``eigh`` inside the Lanczos ``while_loop`` becomes a batched ``eigh``,
which jaxlib's CPU backend runs through ``ParallelBatchMap`` on XLA's intra-op
thread pool; nested in the loop, that deadlocked (jax 0.10.2, CPU) twice in about
15 experiment runs with 8 inputs a chunk. A chunk of one input is not vmapped, so
no ``eigh`` is batched and none goes through that path. It costs little: at
d = 784 (RBF KRR, n = 450) one input takes ~8 ms, mostly Hessian-vector products.
An explicit ``batch_size`` still overrides the default for either method (at your
own risk for ``"lanczos"`` on CPU).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ntk_poison import _validate, linalg, models, spectra

Array = Any

__all__ = ["CurvatureDetector", "smoothness_statement", "smoothness_text"]

_METHODS = ("dense", "lanczos")
#: inputs a chunk when ``batch_size`` is None (lanczos: 1, see the module docstring)
_DEFAULT_BATCH = {"dense": 256, "lanczos": 1}


@jax.jit
def _top_of_hessians(H):
    w, V = jnp.linalg.eigh(H)                       # ascending
    vals = w[:, ::-1]
    vecs = jnp.swapaxes(V[:, :, ::-1], 1, 2)        # (m, d, d): rows = eigenvectors
    return vals, vecs


@eqx.filter_jit
def _lanczos_chunk(predict, x, y, key, k, tol, plan, batched):
    """Lanczos top-k pairs of the loss input-Hessian at each input of a chunk.

    One compiled program per model structure and chunk shape; the solver is
    :func:`ntk_poison.spectra.lanczos_hessian` (no per-input checks inside jit).
    ``batched=False`` (a chunk of one input) calls it on that input alone, so no
    ``eigh`` is batched (see the module docstring). The start block is drawn by
    ``jax.random`` from ``key`` (deterministic).
    """
    shape = x.shape[1:]
    d = int(np.prod(shape))

    def one(xi, yi):
        start = jax.random.normal(key, (2 * plan.b, d), xi.dtype)
        vals, vecs, res, scale, _, _ = spectra.lanczos_hessian(
            spectra.LossFunction(predict, yi), xi.reshape(-1), start,
            jnp.asarray(tol, xi.dtype), shape, k, "LA", plan)
        return vals, vecs, res, scale

    if batched:
        return jax.vmap(one)(x, y)
    return jax.tree_util.tree_map(lambda a: a[None], one(x[0], y[0]))


@dataclasses.dataclass(frozen=True, eq=False)
class CurvatureDetector:
    """Flag inputs whose loss input-Hessian has an unusually large top eigenvalue.

    Attributes:
      k: eigenpairs computed per input (the score uses the top one; all k are
        returned in the info dict with their trigger alignments).
      method: ``"dense"`` or ``"lanczos"`` (see the module docstring).
      fpr: the target false-positive rate on clean inputs, in (0, 1).
      trigger_direction: for reporting only: an array of one input's shape, or a
        trigger object (its ``direction(shape)``; for a data-dependent patch pass
        ``patch.direction(shape, x)`` as an array instead).
      key: the Lanczos start block (an int seed or a jax PRNG key).
      tol: the Lanczos relative residual tolerance (default: the one per dtype, 1e-8 in
        float64, 1e-4 in float32).
      max_iters: the Lanczos iteration cap (default: spectra's).
      batch_size: inputs processed at once, or None (default) for the method's
        default, :attr:`effective_batch_size`: 256 for ``"dense"`` (bounds the
        memory of the dense Hessians, ``batch_size * d^2`` floats) and 1 for
        ``"lanczos"`` (a batched ``eigh`` inside the Lanczos loop can deadlock
        XLA's CPU thread pool; see the module docstring). An int overrides it.
      centred: vector-output pseudo-labels are the centred one-hot row of the argmax
        (True, the default) or the plain one-hot row (False).
      threshold: set by :meth:`fit`: a score above it is flagged.
      clean_scores: set by :meth:`fit`: the clean scores it was set from.

    Immutable: ``fit`` returns a NEW fitted detector, ``det = det.fit(...)``.
    """

    k: int = 1
    method: str = "dense"
    fpr: float = 0.05
    trigger_direction: Any = None
    key: Any = 0
    tol: Optional[float] = None
    max_iters: Optional[int] = None
    batch_size: Optional[int] = None
    centred: bool = True
    threshold: Optional[float] = None
    clean_scores: Optional[np.ndarray] = None

    def __post_init__(self):
        if not _validate.is_int_scalar(self.k) or self.k < 1:
            raise ValueError(f"`k` must be a positive int, got {self.k!r}.")
        if self.method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {self.method!r}.")
        _validate.nonneg("fpr", self.fpr, positive=True)
        if not self.fpr < 1:
            raise ValueError(f"`fpr` must be in (0, 1), got {self.fpr}.")
        if self.batch_size is not None and (not _validate.is_int_scalar(self.batch_size)
                                            or self.batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int or None (the method's "
                             f"default), got {self.batch_size!r}.")
        if self.tol is not None:
            _validate.nonneg("tol", self.tol, positive=True)
        td = self.trigger_direction
        if td is not None and not hasattr(td, "direction"):
            _validate.array("trigger_direction", td)

    @property
    def effective_batch_size(self) -> int:
        """Inputs a chunk: ``batch_size``, or 256 (dense) / 1 (lanczos) if None."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return _DEFAULT_BATCH[self.method]

    # ----------------------------------------------------------------- internals

    def _inputs(self, model, x, y, name):
        x = _validate.float_array(name, x)
        X = getattr(model, "X", None)
        if X is not None and hasattr(X, "shape"):
            x = x.astype(X.dtype)
            if x.ndim == X.ndim - 1:
                x = x[None]
            if tuple(x.shape[1:]) != tuple(X.shape[1:]):
                raise ValueError(f"`{name}` has inputs of shape {tuple(x.shape[1:])} but "
                                 f"the model was trained on {tuple(X.shape[1:])}; pass a "
                                 "batch (m, *input_shape).")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"`{name}` must be a non-empty batch (m, *input_shape), got "
                             f"shape {tuple(x.shape)}.")
        if y is None:
            pred = (model.predict(x) if hasattr(model, "predict")
                    else jax.vmap(models.as_model_function(model))(x))
            if (pred.ndim == 2 and pred.shape[0] == x.shape[0]
                    and not getattr(model, "leading_axes", 0)):
                C = pred.shape[1]
                y = jax.nn.one_hot(jnp.argmax(pred, axis=1), C, dtype=x.dtype)
                y = y - 1.0 / C if self.centred else y
                return x, y
            if pred.shape != (x.shape[0],):
                raise ValueError("The model's output is neither a scalar nor a vector per "
                                 "input, so no pseudo-label can be derived: pass `y`.")
            y = jnp.where(pred >= 0, 1.0, -1.0).astype(x.dtype)
        else:
            _validate.array("y", y, ndim=(1, 2))
            y = jnp.asarray(y, x.dtype)
            _validate.same_rows(name, x, "y", y)
        return x, y

    def _chunk(self, model, x, y):
        """Eigenpairs at one chunk of at most ``effective_batch_size`` inputs.

        The chunk is padded (with copies of its first input) to a power of two, capped
        at ``batch_size``, so that the compiled Hessian and eigen-solver are reused
        across calls with different numbers of inputs.
        """
        m = x.shape[0]
        d = int(np.prod(x.shape[1:]))
        if self.k > d:
            raise ValueError(f"`k` = {self.k} exceeds the flat input size d = {d}.")
        bucket = max(m, min(self.effective_batch_size, 1 << (m - 1).bit_length()))
        if bucket > m:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (bucket - m,) + x.shape[1:])])
            y = jnp.concatenate([y, jnp.broadcast_to(y[:1], (bucket - m,) + y.shape[1:])])
        vals, vecs, res, conv = self._eigs(model, x, y, d)
        if res is not None:
            res, conv = res[:m], conv[:m]
        return vals[:m], vecs[:m], res, conv

    def _eigs(self, model, x, y, d):
        m = x.shape[0]
        if self.method == "dense":
            H = spectra.loss_hessian(model, x, y)
            vals, vecs = _top_of_hessians(H)
            return vals[:, :self.k], linalg.sign_fix(vecs[:, :self.k]), None, None
        tol = _validate.default_tol(x.dtype) if self.tol is None else self.tol
        plan = linalg.lanczos_plan(d, self.k, None, self.max_iters, x.dtype.itemsize)
        vals, vecs, res, scale = _lanczos_chunk(
            models.as_model_function(model), x, y, _validate.as_key(self.key), self.k,
            float(tol), plan, m > 1)
        converged = np.asarray(res) <= tol * np.asarray(scale)[:, None]
        return vals, vecs.reshape(m, self.k, d), np.asarray(res), converged

    def spectrum(self, model: Any, x: Array, y: Optional[Array] = None
                 ) -> Dict[str, Any]:
        """The top-k eigenpairs of the loss input-Hessian at every input.

        Returns a dict: ``eigenvalues (m, k)`` (descending), ``vectors (m, k, d)``
        (unit, over the flattened input, each signed so its largest-magnitude entry
        is positive), ``labels (m,)`` (the labels used), ``pseudo_labels`` (True if
        they were the model's sign predictions), ``input_shape``, ``method``, and for
        Lanczos ``residuals (m, k)`` (``||H v - lambda v||``) and ``converged (m, k)``
        (``residual <= tol * scale``, spectra's criterion; a warning if any is False).
        """
        pseudo = y is None
        x, y = self._inputs(model, x, y, "x")
        b = self.effective_batch_size
        parts = [self._chunk(model, x[i:i + b], y[i:i + b]) for i in range(0, x.shape[0], b)]
        out = {"eigenvalues": np.concatenate([np.asarray(p[0]) for p in parts]),
               "vectors": np.concatenate([np.asarray(p[1]) for p in parts]),
               "labels": np.asarray(y), "pseudo_labels": pseudo, "method": self.method,
               "input_shape": tuple(int(s) for s in x.shape[1:])}
        if not np.all(np.isfinite(out["eigenvalues"])):
            raise ValueError("The loss Hessian is not finite at some inputs (NaN/inf "
                             "eigenvalues): check the model is twice differentiable and "
                             "finite there, and that `x` and `y` are finite.")
        if self.method == "lanczos":
            out["residuals"] = np.concatenate([p[2] for p in parts])
            out["converged"] = np.concatenate([p[3] for p in parts])
            if not out["converged"].all():
                bad = int((~out["converged"].all(axis=1)).sum())
                warnings.warn(
                    f"CurvatureDetector: Lanczos did not converge at {bad} of "
                    f"{x.shape[0]} inputs (see info['residuals']); increase max_iters "
                    "or loosen tol.", spectra.ConvergenceWarning, stacklevel=3)
        return out

    def _direction(self, shape, d):
        td = self.trigger_direction
        if td is None:
            return None
        u = td.direction(shape) if hasattr(td, "direction") else np.asarray(td)
        u = np.asarray(u, dtype=np.float64).reshape(-1)
        if u.size != d:
            raise ValueError(f"`trigger_direction` has {u.size} entries but the inputs "
                             f"have d = {d}; pass a direction of one input's shape.")
        if not np.any(u):
            raise ValueError("`trigger_direction` is the zero vector; pass a non-zero "
                             "direction.")
        return u

    # ----------------------------------------------------------------- public API

    def fit(self, model: Any, x_clean: Array, y_clean: Optional[Array] = None
            ) -> "CurvatureDetector":
        """Set the threshold from clean inputs; returns the fitted detector.

        ``threshold = quantile_{1 - fpr}`` of the top loss-Hessian eigenvalues at
        ``x_clean`` (numpy's linear-interpolation quantile), so about ``fpr`` of
        clean inputs score above it. No trigger knowledge is used.

        Args:
          model: a fitted model with ``.as_function()`` (e.g. the POISONED
            ``krr.KRRModel``: the one deployed), or a callable of one input.
          x_clean: clean inputs ``(m, *input_shape)`` (held out from training).
          y_clean: their labels ``(m,)`` (``(m, C)`` for C outputs), or None for the
            model's own decisions (module docstring).
        """
        scores = self.spectrum(model, x_clean, y_clean)["eigenvalues"][:, 0]
        thr = float(np.quantile(scores, 1.0 - self.fpr))
        return dataclasses.replace(self, threshold=thr, clean_scores=scores)

    def detect_with_vectors(self, model: Any, x: Array, y: Optional[Array] = None
                            ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """``(scores, flagged, info)``: :meth:`detect` plus the eigenpairs.

        ``info`` holds :meth:`spectrum`'s entries, the ``threshold``, and
        ``alignment (m, k)``: ``spectra.alignment`` (squared cosine) of each top
        eigenvector with the trigger direction, or None without one. The alignment
        is reported, never used to flag.
        """
        if self.threshold is None:
            raise ValueError("This CurvatureDetector is not fitted; fitting returns a new "
                             "detector: `det = det.fit(model, x_clean)`.")
        info = self.spectrum(model, x, y)
        scores = info["eigenvalues"][:, 0].astype(np.float64)
        flagged = scores > self.threshold
        m, k, d = info["vectors"].shape
        u = self._direction(info["input_shape"], d)
        if u is None:
            info["alignment"] = None
        else:
            align = jax.vmap(jax.vmap(spectra.alignment, in_axes=(0, None)),
                             in_axes=(0, None))
            info["alignment"] = np.asarray(align(jnp.asarray(info["vectors"]),
                                                 jnp.asarray(u)))
        info["threshold"] = self.threshold
        return scores, flagged, info

    def detect(self, model: Any, x: Array, y: Optional[Array] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, flagged)``: top loss-Hessian eigenvalue at each input, and
        ``score > threshold``.

        Args:
          model: the model (as in :meth:`fit`).
          x: inputs ``(m, *input_shape)``.
          y: labels ``(m,)``, or None for the model's sign predictions.
        """
        scores, flagged, _ = self.detect_with_vectors(model, x, y)
        return scores, flagged

    # ----------------------------------------------------------------- measurements

    def top_eigenvalue(self, model: Any, x: Array) -> float:
        """The top loss-Hessian eigenvalue at ONE input ``x`` (pseudo-label: the model's
        decision, sign f or the argmax's one-hot row).

        ``x`` is repeated to a full chunk of :attr:`effective_batch_size` rows, so the
        compiled chunk shape of :meth:`spectrum` is reused.
        """
        xs = np.repeat(np.asarray(x)[None], self.effective_batch_size, axis=0)
        return float(self.spectrum(model, xs)["eigenvalues"][0, 0])

    def smoothness(self, model: Any, x: Array, scale: float, deltas: Sequence[float],
                   seed: int) -> Dict[str, Any]:
        """Is the loss input Hessian at ``x`` well defined? Its top eigenvalue at
        ``x + delta scale u`` against that at x, u a fixed random unit direction.

        For a model twice differentiable at x the ratios tend to 1 as delta -> 0. A
        kernel with kinks (the ReLU CNN NTK wherever a filter-sized patch of x is blank
        or parallel to the same patch of a training image) gives autodiff numbers
        that jump by orders of magnitude under a tiny shift. Returns ``deltas``,
        ``lambda_x``, ``lambda_shifted``, ``ratios`` and ``smooth`` (every ratio in
        [0.5, 2]).
        """
        u = np.random.default_rng(seed + 7).standard_normal(np.shape(x))
        u /= np.linalg.norm(u)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.ConvergenceWarning)
            lam0 = self.top_eigenvalue(model, x)
            vals = [self.top_eigenvalue(model, np.asarray(x) + float(dl) * scale * u)
                    for dl in deltas]
        ratios = [v / lam0 if lam0 != 0 else float("inf") for v in vals]
        smooth = bool(all(0.5 <= r <= 2.0 for r in ratios))
        return dict(deltas=list(map(float, deltas)), lambda_x=lam0, lambda_shifted=vals,
                    ratios=ratios, smooth=smooth)

    def assess(self, model: Any, x_cal: Array, x_trig: Array, x_clean: Array,
               extra: Optional[Array] = None) -> Dict[str, Any]:
        """Fit on clean ``x_cal``, then score ``[x_trig; x_clean; extra]`` under ``model``.

        Returns the triggered/clean/calibration scores, the AUROC of triggered against
        clean (:func:`ntk_poison.defences.evaluate`), the TPR and FPR at the fitted
        threshold, the labels used, the fraction of inputs where Lanczos converged and
        the number of convergence warnings, and for ``extra`` its top eigenvalues,
        top eigenvectors and labels (plus the first triggered input's top vector).
        """
        from ntk_poison.defences.evaluate import evaluate
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", linalg.ConvergenceWarning)
            fitted = self.fit(model, x_cal)
            parts = [x_trig, x_clean] + ([] if extra is None else [extra])
            scores, flagged, info = fitted.detect_with_vectors(model, np.concatenate(parts))
        nt, nc = len(x_trig), len(x_clean)
        truth = np.r_[np.ones(nt, bool), np.zeros(nc, bool)]
        ev = evaluate(scores[:nt + nc], flagged[:nt + nc], truth, self.fpr)
        conv = np.asarray(info["converged"]).all(1) if "converged" in info else \
            np.ones(len(scores), bool)
        out = dict(auroc=ev["auroc"], tpr=float(flagged[:nt].mean()),
                   fpr=float(flagged[nt:nt + nc].mean()), threshold=float(fitted.threshold),
                   scores_trig=scores[:nt], scores_clean=scores[nt:nt + nc],
                   scores_cal=np.asarray(fitted.clean_scores),
                   labels=np.asarray(info["labels"]),
                   lanczos_converged=float(conv.mean()),
                   convergence_warnings=len(caught))
        if extra is not None:
            out["extra_vals"] = scores[nt + nc:]
            out["extra_vecs"] = np.asarray(info["vectors"])[nt + nc:, 0]
            out["extra_labels"] = np.asarray(info["labels"])[nt + nc:]
            out["trig_vecs0"] = np.asarray(info["vectors"])[0, 0]
        return out


def smoothness_statement(where: str, deltas: Sequence[float]) -> str:
    """The claim that :meth:`CurvatureDetector.smoothness` tests, in words."""
    return (f"The clean loss input Hessian at {where} is well defined: its top eigenvalue "
            f"changes by less than 2x under shifts of {where} by " +
            ", ".join(f"{d:g}" for d in deltas) + " l (a precondition of THEORY.md's "
            "smooth spike picture).")


def smoothness_text(name, sm, where="x0") -> str:
    """One sentence on the smoothness check (for the reports)."""
    pairs = ", ".join(f"{r:.3g}x at delta = {d:g} l" for d, r in zip(sm["deltas"], sm["ratios"]))
    if sm["smooth"]:
        return (f"{name}: the clean loss Hessian's top eigenvalue at {where} is stable under "
                f"a tiny shift {where} + delta l u ({pairs}): the input curvature is well "
                "defined there.")
    return (f"{name}: the clean loss Hessian's top eigenvalue at {where} ({sm['lambda_x']:.3g}) "
            f"is NOT stable under a tiny shift {where} + delta l u ({pairs}): the kernel is not "
            f"twice differentiable at {where}, so its input Hessian there is not defined and the "
            "autodiff value (and every curvature number for this kernel) reflects the kink, "
            "not THEORY.md's smooth spike picture." + (
                " For the ReLU CNN NTK the kinks sit wherever a filter-sized patch of the "
                "input is blank or parallel to the same patch of a training image, i.e. all "
                "over MNIST's background." if name == "nt_cnn" else ""))
