"""Property-based tests (hypothesis) of the public API under bad and edge-case input
(issue 15, "Bad input at scale, and fuzzing").

Every call either returns finite results that match a dense float64 numpy oracle
(tolerance by dtype), or raises a ValueError whose message names an argument in
backticks. Never a TypeError / IndexError / XLA shape error, never NaN silently.

Draws: shapes (n = 0, 1, small; d = 1, small), dtypes (float32, float64, int, bool,
complex), NaN and inf entries, wrong ranks, ridge 0 with duplicate points, huge and
tiny length scales. Values come from a numpy generator seeded by hypothesis (cheap to
draw; the shapes, dtypes and corruptions are hypothesis's). Bounded and derandomised,
so CI is reproducible.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from oracles import arccos, closed_forms
from ntk_poison import kernels, krr, spectra, theory
from ntk_poison.certify import kernel as certify
from ntk_poison.defences import EPIC, ActivationClustering, SpectralSignatures


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),   # no shrinking: bounded time
                    suppress_health_check=list(HealthCheck))


NAMED = re.compile(r"`[A-Za-z_][A-Za-z0-9_]*")
EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps),
       np.dtype(np.float64): float(np.finfo(np.float64).eps)}
DTYPES = ("float64", "float32", "int64", "bool", "complex128")
CORRUPTIONS = ("none", "none", "none", "nan", "inf", "rank")


def raises_named(call, *names):
    """``call()`` raises a ValueError naming an argument (one of ``names`` if given)."""
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    found = NAMED.findall(msg)
    assert found, f"ValueError without an argument name: {msg}"
    if names:
        assert any(f"`{nm}" in msg for nm in names), f"expected one of {names}: {msg}"


def compute_dtype(*arrays) -> np.dtype:
    """The float dtype the library computes in (ints and bools become float64)."""
    dts = [a.dtype for a in arrays if np.issubdtype(a.dtype, np.floating)]
    return np.result_type(*dts) if dts else np.dtype(np.float64)


@st.composite
def batch(draw, n, d, *, dtypes=DTYPES, corruptions=CORRUPTIONS, scale=None):
    """``(x, valid)``: a batch ``(n, d)`` of a drawn dtype, maybe corrupted."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    dtype = draw(st.sampled_from(dtypes))
    bad = draw(st.sampled_from(corruptions))
    s = draw(st.sampled_from((1e-3, 1.0, 30.0))) if scale is None else scale
    x = rng.normal(size=(n, d)) * s
    if dtype == "int64":
        x = np.round(x * 3)
    x = (x > 0) if dtype == "bool" else x.astype(dtype)
    if dtype == "complex128":
        x = x + 1j
    if bad in ("nan", "inf") and x.size and np.issubdtype(x.dtype, np.floating):
        x = x.copy()
        x.flat[draw(st.integers(0, x.size - 1))] = np.nan if bad == "nan" else -np.inf
    elif bad == "rank":
        x = x.reshape(-1) if draw(st.booleans()) else x[..., None]
    valid = (dtype != "complex128" and x.ndim == 2
             and bool(np.all(np.isfinite(np.asarray(x, np.float64).real))))
    return x, valid


def f64(x):
    x = np.asarray(x)
    return (x.real if np.iscomplexobj(x) else x).astype(np.float64)


def sq_dists(a, b):
    """``|a_i - b_j|^2`` by explicit differences, float64 (any n, including 0)."""
    diff = f64(a)[:, None, :] - f64(b)[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def rbf(a, b, ls=1.0):
    return np.exp(-0.5 * sq_dists(a, b) / ls ** 2)


# --------------------------------------------------------------------------- kernels

def _band(profile, sq, delta, var):
    """Kernel values of a decreasing radial ``profile`` over ``sq +- delta``: the
    library's sq_dists carries round-off of a few ulp of ``|x|^2`` (documented), which
    at a tiny length scale moves a coincident pair anywhere in ``[k(delta), k(0)]``."""
    return var * profile(sq + delta), var * profile(np.maximum(sq - delta, 0.0))


def _rbf_profile(ls):
    return lambda sq: np.exp(-0.5 * ((sq / ls) / ls))


def _matern_profile(ls):
    def prof(sq):
        a = np.sqrt(5.0 * ((sq / ls) / ls))
        return (1.0 + a + a * a / 3.0) * np.exp(-a)
    return prof


def _kernel_case(name, ls, var, x1, x2):
    """``(kernel, lo, hi, scale)``: the oracle's interval for the Gram matrix and the
    size of its entries; NaN bounds where the kernel is undefined."""
    a, b = f64(x1), f64(x2)
    if a.ndim == 2 and name in ("nt_fc", "normalized", "on_sphere") and not len(a):
        a = b[:0]                                     # the arccos oracle needs n >= 1
        k = _kernel_case(name, ls, var, b, b)[0]
        return k, np.zeros((0, len(b))), np.zeros((0, len(b))), 1.0
    if name in ("rbf", "matern52"):
        k = kernels.get(name, length_scale=ls, variance=var)
        sq = sq_dists(a, b)
        dt = compute_dtype(x1, x2)
        nrm = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None]
        delta = 16 * EPS[dt] * (nrm + 1.0) * (a.shape[1] + 2)
        prof = _rbf_profile(ls) if name == "rbf" else _matern_profile(ls)
        lo, hi = _band(prof, sq, delta, var)
        return k, lo, hi, var
    if name == "linear":
        k = kernels.get("linear", bias=var, scale=ls)
        K = ls * a @ b.T + var
        scale = ls * np.sqrt(np.outer(np.sum(a * a, 1), np.sum(b * b, 1))) + var
        return k, K, K, scale
    if name == "nt_fc":
        k = kernels.get("nt_fc", depth=2, W_std=ls, b_std=var)
        K = arccos.relu_ntk(a, b, 2, ls, var)
        d11 = np.diag(arccos.relu_ntk(a, a, 2, ls, var))
        d22 = np.diag(arccos.relu_ntk(b, b, 2, ls, var))
        return k, K, K, np.sqrt(np.outer(d11, d22)) + 1e-300
    if name == "normalized":
        k = kernels.get("normalized", base="nt_fc", depth=2, W_std=ls, b_std=var)
        with np.errstate(all="ignore"):
            d1 = np.diag(arccos.relu_ntk(a, a, 2, ls, var))
            d2 = np.diag(arccos.relu_ntk(b, b, 2, ls, var))
            K = arccos.relu_ntk(a, b, 2, ls, var) / np.sqrt(np.outer(d1, d2))
        return k, K, K, 1.0
    if name == "on_sphere":
        k = kernels.get("on_sphere", base="nt_fc", radius=ls, depth=2, b_std=var)
        with np.errstate(all="ignore"):
            pa = ls * a / np.linalg.norm(a, axis=1, keepdims=True)
            pb = ls * b / np.linalg.norm(b, axis=1, keepdims=True)
            K = arccos.relu_ntk(pa, pb, 2, 1.0, var)
        return k, K, K, ls * ls + var + 1e-300
    raise AssertionError(name)


FLAT_KERNELS = ("rbf", "matern52", "linear", "nt_fc", "normalized", "on_sphere")


def test_every_registered_kernel_is_fuzzed():
    assert set(kernels.available()) == set(FLAT_KERNELS) | {"nt_cnn"}


@pytest.mark.parametrize("name", FLAT_KERNELS)
@fuzz(10)
@given(data=st.data())
def test_kernel_gram(name, data):
    stax = name in ("nt_fc", "normalized", "on_sphere")   # slow to compile: few shapes
    n1 = data.draw(st.sampled_from((0, 1, 3)), "n1")
    n2 = 2 if stax else data.draw(st.sampled_from((1, 2)), "n2")
    d = 2 if stax else data.draw(st.sampled_from((1, 3)), "d")
    x1, ok1 = data.draw(batch(n1, d), "x1")
    x2, ok2 = data.draw(batch(n2, d, dtypes=("float64",) if stax else
                              ("float64", "float32", "int64")), "x2")
    if name in ("rbf", "matern52"):
        ls = 10.0 ** data.draw(st.sampled_from((-45, -30, -8, -2, 0, 3, 30, 45)), "log_ls")
    else:
        ls = data.draw(st.sampled_from((0.5, 1.0, 2.0, -1.0)), "scale")
    var = data.draw(st.sampled_from((1.0, 0.3, 0.0)), "var")
    if name in ("rbf", "matern52") and (var == 0.0 or not 1.2e-38 <= ls <= 3.4e38):
        raises_named(lambda: _kernel_case(name, ls, var, x1, x2), "variance", "length_scale")
        return
    if ls <= 0:
        raises_named(lambda: _kernel_case(name, ls, var, x1, x2))
        return
    if not (ok1 and ok2):
        good = np.ones((1, d))
        k = _kernel_case(name, ls, var, good, good)[0]
        raises_named(lambda: k(x1, x2), "x1", "x2")
        return
    k, lo, hi, scale = _kernel_case(name, ls, var, x1, x2)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raises_named(lambda: k(x1, x2), "x1", "x2")   # zero input on the sphere etc.
        return
    K = np.asarray(k(x1, x2))
    dt = compute_dtype(x1, x2)
    assert K.shape == (n1, n2) and K.dtype == dt
    tol = (2e-4 if dt == np.float32 else 1e-9) * scale
    assert np.all(np.isfinite(K))
    assert np.all(K >= np.minimum(lo, hi) - tol) and np.all(K <= np.maximum(lo, hi) + tol), (
        K, lo, hi)


@fuzz(4)
@given(data=st.data())
def test_kernel_cnn_gram(data):
    from oracles import cnn_kernels
    n = data.draw(st.sampled_from((0, 1, 2)), "n")
    x, ok = data.draw(batch(n, 16, dtypes=("float64", "complex128"),
                            corruptions=("none", "none", "nan", "rank"), scale=1.0), "x")
    k = kernels.get("nt_cnn", depth=1, channels=4, filter_size=3)
    if not ok:
        raises_named(lambda: k(np.reshape(x, (-1, 4, 4, 1)) if x.ndim == 2 else x, x), "x1")
        return
    imgs = x.reshape(n, 4, 4, 1)
    K = np.asarray(k(imgs, imgs))
    assert K.shape == (n, n)
    if n:
        ref = cnn_kernels.cnn_kernels(imgs, depth=1, filter_size=3)
        ref = ref[1] if isinstance(ref, tuple) else ref
        np.testing.assert_allclose(K, ref, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- KRR

def _oracle_fit(X, y, ridge, ls):
    Xf = f64(X)
    n = Xf.shape[0]
    A = rbf(Xf, Xf, ls) + n * ridge * np.eye(n)
    cond = np.linalg.cond(A)
    alpha = np.linalg.lstsq(A, f64(y), rcond=None)[0]
    return alpha, cond


@fuzz(30)
@given(data=st.data())
def test_krr_fit_predict_derivatives(data):
    n = data.draw(st.sampled_from((0, 1, 2, 4)), "n")
    d = data.draw(st.sampled_from((1, 2)), "d")
    X, okX = data.draw(batch(n, d, scale=1.0), "X")
    dup = data.draw(st.booleans(), "duplicate") and okX and n >= 1
    if dup:
        X = np.concatenate([X, X[:1]])
    ny = X.shape[0] if getattr(X, "ndim", 0) >= 1 else 0
    y_kind = data.draw(st.sampled_from(("float", "float", "multi", "int", "nan", "complex",
                                        "rows")), "y_kind")
    y = np.random.default_rng(ny).normal(size=(ny,))
    y = {"float": y, "multi": np.stack([y, -y], 1), "int": np.sign(y).astype(int),
         "nan": np.where(np.arange(ny) == 0, np.nan, y), "complex": y + 0j,
         "rows": y[:-1] if ny else np.ones(1)}[y_kind]
    if okX and np.issubdtype(X.dtype, np.floating) and X.dtype == np.float32:
        y = y.astype(np.float32) if y_kind not in ("int", "complex") else y
    ridge = data.draw(st.sampled_from((0.0, 1e-3, 1.0, -1e-3, float("nan"))), "ridge")
    ls = data.draw(st.sampled_from((1.0, 0.3, 1e3)), "ls")
    k = kernels.get("rbf", length_scale=ls)

    ok_y = y_kind in ("float", "multi") or (y_kind == "nan" and ny == 0)
    valid = okX and n >= 1 and ok_y and ridge >= 0
    if not valid:
        raises_named(lambda: krr.fit(k, X, y, ridge=ridge))
        return
    dt = compute_dtype(X, y)
    alpha, cond = _oracle_fit(X, y, ridge, ls)
    if dup and ridge == 0.0:
        # A repeated point at ridge 0: K is singular, so the fit must refuse and say
        # which knob fixes it (the Cholesky path's check).
        raises_named(lambda: krr.fit(k, X, y, ridge=ridge), "ridge")
        return
    if cond * EPS[dt] > 1e-2:      # numerically singular: refusing is right, and so is
        try:                       # a finite fit (its accuracy is not defined)
            model = krr.fit(k, X, y, ridge=ridge)
        except ValueError as e:
            assert "`ridge`" in str(e)
            return
        assert np.all(np.isfinite(np.asarray(model.alpha)))
        return
    model = krr.fit(k, X, y, ridge=ridge)
    tol = 50 * EPS[dt] * cond * (1 + np.abs(alpha).sum())
    np.testing.assert_allclose(f64(model.alpha), alpha, atol=tol, rtol=0)

    m = data.draw(st.sampled_from((0, 1, 3)), "m")
    x, okx = data.draw(batch(m, d, scale=1.0), "x")
    if not okx:
        raises_named(lambda: model.predict(x), "x")
        raises_named(lambda: model.input_hessian(x), "x", "y")
        return
    pred = np.asarray(model.predict(x))
    Kx = rbf(f64(x), f64(X), ls)
    np.testing.assert_allclose(pred, Kx @ alpha, atol=tol, rtol=0)
    assert pred.shape == (m,) + np.shape(y)[1:]
    if y_kind == "multi":
        raises_named(lambda: model.input_grad(x))
        return
    g = np.asarray(model.input_grad(x))
    H = np.asarray(model.input_hessian(x))
    assert g.shape == (m, d) and H.shape == (m, d, d)
    if m == 0:
        return
    tg = tol / min(ls, 1.0) ** 2
    np.testing.assert_allclose(g, closed_forms.rbf_krr_grad(X, alpha, x, ls), atol=tg, rtol=0)
    np.testing.assert_allclose(H, closed_forms.rbf_krr_hessian(X, alpha, x, ls),
                               atol=tg / min(ls, 1.0) ** 2, rtol=0)


# --------------------------------------------------------------------------- spectra

@fuzz(14)
@given(data=st.data())
def test_top_eigenpairs(data):
    d = data.draw(st.sampled_from((1, 3)), "d")
    rng = np.random.default_rng(d)
    X, y = rng.normal(size=(4, d)), rng.normal(size=4)
    model = krr.fit(kernels.get("rbf"), X, y, ridge=1e-2)
    xb, _ = data.draw(batch(1, d, scale=1.0), "x")
    x = xb[0] if xb.ndim == 2 else xb            # one point; "rank" gives (d,) or (d, 1)
    ok = (x.shape == (d,) and not np.iscomplexobj(x)
          and bool(np.all(np.isfinite(f64(x)))))
    k = data.draw(st.sampled_from((1, d, 0, d + 1)), "k")
    method = data.draw(st.sampled_from(("dense", "lanczos")), "method")
    call = lambda: spectra.top_eigenpairs(model, x, k=k, method=method)
    if not ok or not 1 <= k <= d:
        raises_named(call, "x", "k")
        return
    vals, vecs = call()
    alpha = np.asarray(model.alpha)
    H = closed_forms.rbf_krr_hessian(X, alpha, f64(x)[None])[0]
    ref = np.sort(np.linalg.eigvalsh(H))[::-1][:k]
    dt = compute_dtype(x)
    scale = max(np.abs(ref).max(), 1e-12)
    tol = (1e-3 if dt == np.float32 else 1e-7) * scale
    np.testing.assert_allclose(np.asarray(vals, np.float64), ref, atol=tol, rtol=0)
    V = f64(vecs)
    assert V.shape == (k, d)
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-3 if dt == np.float32
                               else 1e-8)
    assert np.linalg.norm(V @ H - f64(vals)[:, None] * V) <= 10 * tol * k


# --------------------------------------------------------------------------- theory

SCALARS = (0.0, 1.0, 2.5, -1.0, float("nan"), float("inf"), 1j, np.array([1.0, 3.0]))


@fuzz(60)
@given(m=st.sampled_from(SCALARS + (3, 0)), n=st.sampled_from(SCALARS + (10,)),
       ridge=st.sampled_from(SCALARS), k0=st.sampled_from(SCALARS),
       k_zz=st.sampled_from(SCALARS), y_t=st.sampled_from(SCALARS))
def test_efficacy_law(m, n, ridge, k0, k_zz, y_t):
    def good(v, positive=False):
        a = np.asarray(v)
        return (not np.iscomplexobj(a) and bool(np.all(np.isfinite(a)))
                and bool(np.all(a > 0) if positive else np.all(a >= 0)))
    real = lambda v: not np.iscomplexobj(v) and bool(np.all(np.isfinite(v)))
    call = lambda: theory.efficacy_law(m, n, ridge, k0, k_zz, y_t)
    if not (good(m) and good(n, True) and good(ridge) and good(k_zz, True)
            and real(k0) and real(y_t)):
        raises_named(call, "m", "n", "ridge", "k0", "k_zz", "y_target")
        return
    out = np.asarray(call(), np.float64)
    mm = np.asarray(m, float)
    with np.errstate(all="ignore"):
        gain = np.where(mm == 0, 0.0, mm / (np.asarray(n) * ridge + mm * np.asarray(k_zz)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, y_t * np.asarray(k0) * gain, rtol=1e-12, atol=0)


def _refit_delta(X, y, ridge, zeta, y_t, m, x0, ls):
    """Refit with m clones of (zeta, y_t) at absolute ridge (N+m) ridge, minus the clean
    fit at the same absolute ridge, evaluated at x0 (numpy, float64)."""
    N = X.shape[0]
    lam = (N + m) * ridge
    # At ridge 0 the m identical clones are one interpolation constraint (the ridge -> 0
    # limit, the min-norm solution): fit through one copy.
    mm = min(m, 1) if lam == 0 else m
    Xp = np.concatenate([X, np.repeat(zeta[None], mm, 0)])
    yp = np.concatenate([y, np.full(mm, y_t)])
    Ap = rbf(Xp, Xp, ls) + lam * np.eye(N + mm)
    Ac = rbf(X, X, ls) + lam * np.eye(N)
    fp = rbf(x0[None], Xp, ls) @ np.linalg.solve(Ap, yp)
    fc = rbf(x0[None], X, ls) @ np.linalg.solve(Ac, y)
    return float(fp[0] - fc[0]), np.linalg.cond(Ap), np.linalg.cond(Ac)


@fuzz(20)
@given(data=st.data())
def test_clone_law(data):
    N = data.draw(st.sampled_from((0, 1, 3)), "N")
    d = data.draw(st.sampled_from((1, 2)), "d")
    rng = np.random.default_rng(N + 10 * d)
    X, y = rng.normal(size=(N, d)), rng.normal(size=N)
    ridge = data.draw(st.sampled_from((1e-2, 0.0, -1.0)), "ridge")
    zeta_kind = data.draw(st.sampled_from(("new", "in_X", "nan", "complex", "batch0")),
                          "zeta")
    zeta = {"new": rng.normal(size=d), "in_X": X[0] if N else rng.normal(size=d),
            "nan": np.full(d, np.nan), "complex": rng.normal(size=d) + 1j,
            "batch0": np.zeros((0, d))}[zeta_kind]
    y_t = data.draw(st.sampled_from((1.0, -2.0, float("nan"), 1j)), "y_target")
    ms = data.draw(st.sampled_from(([0, 1, 3], [2], [], [-1], [1.5])), "ms")
    x0 = rng.normal(size=d)
    call = lambda: theory.clone_law(kernels.get("rbf"), X, y, ridge, zeta, y_t, ms, x0)
    valid = (N >= 1 and ridge >= 0 and zeta_kind in ("new", "in_X")
             and isinstance(y_t, float) and math.isfinite(y_t)
             and len(ms) and all(float(v).is_integer() and v >= 0 for v in ms))
    if not valid:
        raises_named(call)
        return
    refs = [_refit_delta(X, y, ridge, zeta, y_t, int(m), x0, 1.0) for m in ms]
    singular = any(max(cp if m else 1.0, cc) * EPS[np.dtype(np.float64)] > 1e-6
                   for m, (_, cp, cc) in zip(ms, refs))
    if ridge == 0.0 and zeta_kind == "in_X" and any(ms):
        raises_named(call, "ridge")           # a clone duplicating a training point
        return
    if singular:
        try:
            law = call()
        except ValueError as e:
            assert "`ridge`" in str(e)
            return
        assert np.all(np.isfinite(np.asarray(law.delta_f)))
        return
    law = call()
    got = np.asarray(law.delta_f, np.float64).reshape(len(ms))
    want = np.array([r[0] for r in refs])
    np.testing.assert_allclose(got, want, atol=1e-8 * (1 + np.abs(want).max()), rtol=0)


# --------------------------------------------------------------------------- certify

def _enumerated_bounds(W, y, budget):
    """min/max of W y' over every y' within ``budget`` sign flips of y, by enumeration."""
    n = len(y)
    lo, hi = W @ y, W @ y
    for r in range(1, min(budget, n) + 1):
        for S in itertools.combinations(range(n), r):
            yy = y.copy()
            yy[list(S)] *= -1
            f = W @ yy
            lo, hi = np.minimum(lo, f), np.maximum(hi, f)
    return lo, hi


def _enumerated_radius(W, y):
    f = W @ y
    out = np.zeros(len(f), int)
    for j in range(len(f)):
        if f[j] == 0:
            continue
        r = 0
        while r < len(y):
            lo, hi = _enumerated_bounds(W[j:j + 1], y, r + 1)
            if (lo[0] if f[j] > 0 else -hi[0]) <= 0:
                break
            r += 1
        out[j] = r
    return out


@fuzz(30)
@given(data=st.data())
def test_label_flip_bounds_and_radius(data):
    n = data.draw(st.sampled_from((0, 1, 3, 4)), "n")
    d = data.draw(st.sampled_from((1, 2)), "d")
    rng = np.random.default_rng(n + 10 * d)
    X = rng.normal(size=(n, d))
    y_kind = data.draw(st.sampled_from(("pm1", "pm1", "zero_one", "int", "nan")), "y")
    y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    y = {"pm1": y, "zero_one": (y > 0).astype(float), "int": y.astype(int),
         "nan": np.where(np.arange(n) == 0, np.nan, y)}[y_kind]
    ridge = data.draw(st.sampled_from((1e-2, 0.3, -1.0, float("nan"))), "ridge")
    xt, okt = data.draw(batch(data.draw(st.sampled_from((0, 1, 2)), "m"), d, scale=1.0),
                        "x_test")
    flips = data.draw(st.sampled_from((0, 1, 2, 10, -1, 1.5, True)), "n_flips")
    k = kernels.get("rbf")
    ok_flips = isinstance(flips, int) and not isinstance(flips, bool) and flips >= 0
    ok_model = n >= 1 and (y_kind == "pm1" or (y_kind == "nan" and n == 0)) and ridge >= 0
    ok = ok_model and okt and xt.shape[0] >= 1
    if not (ok and ok_flips):
        raises_named(lambda: certify.label_flip_bounds(k, X, y, ridge, xt, flips))
    if not ok:
        raises_named(lambda: certify.certified_radius(k, X, y, ridge, xt))
        return
    A = rbf(X, X) + n * ridge * np.eye(n)
    W = rbf(f64(xt), X) @ np.linalg.inv(A)
    r = np.asarray(certify.certified_radius(k, X, y, ridge, xt))
    margins = np.abs(W @ y)
    if np.all(margins > 1e-8):       # ties within round-off decide nothing
        np.testing.assert_array_equal(r, _enumerated_radius(W, y))
    if not ok_flips:
        return
    lo, hi = certify.label_flip_bounds(k, X, y, ridge, xt, flips)
    elo, ehi = _enumerated_bounds(W, y, flips)
    dt = compute_dtype(xt)
    tol = (1e-4 if dt == np.float32 else 1e-10) * (1 + np.abs(W).sum())
    np.testing.assert_allclose(f64(lo), elo, atol=tol, rtol=0)
    np.testing.assert_allclose(f64(hi), ehi, atol=tol, rtol=0)


# --------------------------------------------------------------------------- detectors

def _labels(draw, n):
    kind = draw(st.sampled_from(("pm1", "int", "onehot", "nan", "rows", "empty_cols")))
    rng = np.random.default_rng(n)
    c = rng.integers(0, 2, size=n)
    lab = {"pm1": np.where(c == 1, 1.0, -1.0), "int": c, "onehot": np.eye(2)[c],
           "nan": np.where(np.arange(n) == 0, np.nan, c.astype(float)),
           "rows": c[:-1] if n else np.ones(1, int), "empty_cols": np.zeros((n, 0))}[kind]
    ok = kind in ("pm1", "int", "onehot") or (kind == "nan" and n == 0)
    return lab, c, ok


def _oracle_spectral(H, c):
    """((h - mu_c) . v_c)^2 with v_c the top eigenvector of the class scatter (eigh)."""
    out = np.zeros(len(c))
    for g in np.unique(c):
        rows = np.flatnonzero(c == g)
        C = H[rows] - H[rows].mean(0)
        if rows.size < 2:
            continue
        _, V = np.linalg.eigh(C.T @ C)
        out[rows] = (C @ V[:, -1]) ** 2
    return out


@fuzz(30)
@given(data=st.data())
def test_detectors(data):
    n = data.draw(st.sampled_from((0, 1, 2, 6)), "n")
    p = data.draw(st.sampled_from((1, 3)), "p")
    feats, okf = data.draw(batch(n, p), "features")
    labels, c, okl = _labels(data.draw, n)
    which = data.draw(st.sampled_from(("spectral", "clustering", "epic")), "detector")
    det = {"spectral": SpectralSignatures(eps=0.2),
           "clustering": ActivationClustering(n_components=2, n_init=1),
           "epic": EPIC(subset_size=0.5)}[which]
    if not (okf and okl and n >= 1):
        raises_named(lambda: det.detect(feats, labels))
        return
    scores, flagged = det.detect(feats, labels)
    assert scores.shape == flagged.shape == (n,) and flagged.dtype == bool
    assert np.all(np.isfinite(scores))
    H = f64(feats)
    if which == "spectral":
        ref = _oracle_spectral(H, c)
        np.testing.assert_allclose(scores, ref, atol=1e-8 * (1 + ref.max()), rtol=0)
        for g in np.unique(c):
            rows = c == g
            assert flagged[rows].sum() == min(rows.sum(), math.floor(0.3 * rows.sum() + 0.5))
    elif which == "clustering":
        sizes = 1.0 - scores                      # relative size of each point's cluster
        for g in np.unique(c):
            rows = np.flatnonzero(c == g)
            counts = sizes[rows] * rows.size
            np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
            for s in np.unique(np.round(counts)):
                members = np.sum(np.round(counts) == s)
                assert members in (s, 2 * s)      # a cluster of s points, or two of them
        np.testing.assert_array_equal(flagged, sizes < det.size_threshold)
    else:
        assert np.all((scores > 0) & (scores <= 2.0))
