"""The ReLU FC NTK of ``kernels.nt_fc``: its own fused arc-cosine recursion (fast atan2)
and the symmetric block Gram ``k(X, X)``, against neural-tangents' ``stax`` kernel_fn
and exact values at the ill-conditioned angles t = 0 and t = pi (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import kernels
from oracles import arccos

TOL = 1e-12          # relative to max |K|, the brief's agreement with neural-tangents


def _stax(depth, W_std, b_std, parameterization):
    from neural_tangents import stax
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=W_std, b_std=b_std,
                              parameterization=parameterization), stax.Relu()]
    layers += [stax.Dense(1, W_std=W_std, b_std=b_std, parameterization=parameterization)]
    return stax.serial(*layers)[2]


def _inputs(rng, d=6):
    """Rows of different norms, a near-parallel pair (angle ~1e-3) and a
    near-antiparallel one: all well-conditioned enough for 1e-12."""
    x = rng.standard_normal((7, d))
    x[1] *= 3.0
    x[2] *= 0.2
    v = rng.standard_normal(d)
    x[4] = 1.7 * (x[3] + 1e-3 * np.linalg.norm(x[3]) * v / np.linalg.norm(v))
    x[6] = -0.6 * (x[5] + 1e-3 * np.linalg.norm(x[5]) * v / np.linalg.norm(v))
    x2 = rng.standard_normal((4, d)) * 0.7
    x2[0] = 2.0 * (x[0] + 1e-3 * np.linalg.norm(x[0]) * v / np.linalg.norm(v))
    return x, x2


SLOW = pytest.mark.slow
GRID = [(1, "ntk", 1.0, 0.0), (3, "standard", 1.2, 0.3),
        pytest.param(3, "ntk", 0.8, 0.6, marks=SLOW),
        pytest.param(2, "ntk", 1.5, 0.1, marks=SLOW),
        pytest.param(4, "ntk", 1.3, 0.0, marks=SLOW),
        pytest.param(1, "standard", 1.0, 0.0, marks=SLOW)]


@pytest.mark.parametrize("depth,param,W_std,b_std", GRID)
def test_relu_fc_equals_neural_tangents(depth, param, W_std, b_std, rng):
    """Cross Gram k(x1, x2) and the off-diagonal of the symmetric Gram k(X, X) equal
    neural-tangents' to 1e-12 (NTK and NNGP, both parameterisations)."""
    x, x2 = _inputs(rng)
    X, X2 = jnp.asarray(x), jnp.asarray(x2)
    ref = _stax(depth, W_std, b_std, param)
    off = ~np.eye(len(x), dtype=bool)
    refs = {"cross": ref(X, X2, ("nngp", "ntk")), "gram": ref(X, X, ("nngp", "ntk"))}
    for i, kind in enumerate(("nngp", "ntk")):
        k = kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind,
                          parameterization=param)
        cross, cross_ref = np.asarray(k(X, X2)), np.asarray(refs["cross"][i])
        scale = np.abs(cross_ref).max()
        np.testing.assert_allclose(cross, cross_ref, rtol=0, atol=TOL * scale)
        gram, gram_ref = np.asarray(k(X, X)), np.asarray(refs["gram"][i])
        np.testing.assert_allclose(gram[off], gram_ref[off], rtol=0,
                                   atol=TOL * np.abs(gram_ref).max())
        assert gram.dtype == cross.dtype == np.float64


@pytest.mark.parametrize("depth,W_std,b_std", [(1, 1.0, 0.0), (3, 1.5, 0.1)])
def test_gram_diagonal_and_clones_are_consistent(depth, W_std, b_std, rng):
    """k(X, X) with duplicated rows (clones): every copy of a pair gets the same value,
    the diagonal included (the clone law needs a constant clone block), and that
    value is the exact t = 0 recursion (numpy oracle, identical rows exact) up to the
    O(sqrt eps) error of an angle from rounded covariances (1e-6; the NNGP, quadratic
    in t, to 1e-12). Off the duplicates it equals the numpy recursion to 1e-12."""
    x = rng.standard_normal((6, 4))
    x[2] *= 4.0
    x[3] = x[4] = x[5] = x[0]                         # three clones of x[0]
    X = jnp.asarray(x)
    nngp, ntk = arccos.relu_kernels(x, x, depth, W_std, b_std)
    for kind, ref, tol in (("ntk", ntk, 1e-6), ("nngp", nngp, 1e-12)):
        K = np.asarray(kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind)(X, X))
        assert np.array_equal(K, K.T)
        clones = K[np.ix_([0, 3, 4, 5], [0, 3, 4, 5])]
        np.testing.assert_allclose(clones, clones[0, 0], rtol=1e-15, atol=0)
        np.testing.assert_allclose(np.diag(K), np.diag(ref), rtol=tol, atol=0)
        pairs = ([0, 0, 1], [1, 2, 2])                 # distinct, non-clone pairs
        np.testing.assert_allclose(K[pairs], ref[pairs], rtol=1e-12, atol=0)


def _ntk_from_first_angle(q, cos0, sin0, depth, W_std):
    """b_std = 0, a pair of equal-norm inputs (q = W^2 |x|^2 / d) at the first angle t0
    given exactly by (cos t0, sin t0); later angles from the cosine (well-conditioned
    after t0 = pi, which gives q12 = 0, t = pi/2). The ReLU NTK recursion of
    tests/oracles/arccos.py."""
    w2 = W_std ** 2
    q12, theta, s = q * cos0, q * cos0, q
    for layer in range(depth):
        if layer == 0:
            c, sn, t = cos0, sin0, np.arctan2(sin0, cos0)
        else:
            c = np.clip(q12 / s, -1.0, 1.0)
            t = np.arccos(c)
            sn = np.sin(t)
        new = w2 * s * (sn + (np.pi - t) * c) / (2 * np.pi)
        theta = new + w2 * (np.pi - t) / (2 * np.pi) * theta
        q12, s = new, w2 * s / 2
    return theta


@pytest.mark.parametrize("depth", [pytest.param(1, marks=SLOW), 3])
def test_exactly_parallel_and_antiparallel_pairs(depth, rng):
    """b_std = 0: for x' = 2.5 x the angle is t = 0 at every layer, so (homogeneity)
    k(x, 2.5 x) = 2.5 k(x, x); for x' = -x it is t = pi at the first ReLU, then pi/2.
    Both angles come from a cosine rounded near +-1, the ill-conditioned case, in any
    recursion on covariances: ours and neural-tangents carry the same O(sqrt eps)
    error; both are held to 1e-6 relative of the exact values."""
    W = 1.4
    x = rng.standard_normal((3, 5))
    x[1] *= 5.0
    y = np.concatenate([2.5 * x, -x])
    ours = np.asarray(kernels.nt_fc(depth=depth, W_std=W)(jnp.asarray(x), jnp.asarray(y)))
    nt = np.asarray(_stax(depth, W, 0.0, "ntk")(jnp.asarray(x), jnp.asarray(y), "ntk"))
    q = W ** 2 * np.sum(x * x, axis=1) / x.shape[1]
    exact_par = 2.5 * np.diag(arccos.relu_ntk(x, x, depth, W, 0.0))   # identical rows exact
    exact_anti = _ntk_from_first_angle(q, -1.0, 0.0, depth, W)
    scale = exact_par.max()
    for K in (ours, nt):
        np.testing.assert_allclose(np.diag(K[:, :3]), exact_par, rtol=1e-6)
        np.testing.assert_allclose(np.diag(K[:, 3:]), exact_anti, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("b_std", [0.0, 0.4])
def test_zero_inputs(b_std, rng):
    """A zero input: q = b^2 (0 without bias, then the kernel row is 0 and the angle
    atan2(0, 0) is pi/2 as in neural-tangents). Values equal neural-tangents' (and the
    numpy recursion where it is defined, b > 0); without bias the gradients are finite."""
    x = rng.standard_normal((4, 3))
    x[0] = 0.0
    x2 = rng.standard_normal((3, 3))
    X, X2 = jnp.asarray(x), jnp.asarray(x2)
    k = kernels.nt_fc(depth=2, W_std=1.2, b_std=b_std)
    ref = np.asarray(_stax(2, 1.2, b_std, "ntk")(X, X2, "ntk"))
    K = np.asarray(k(X, X2))
    np.testing.assert_allclose(K, ref, rtol=0, atol=TOL * np.abs(ref).max())
    if b_std > 0:
        np.testing.assert_allclose(K, arccos.relu_ntk(x, x2, 2, 1.2, b_std), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(k(X, X))[0, 0],
                                   arccos.relu_ntk(x[:1], x[:1], 2, 1.2, b_std)[0, 0],
                                   rtol=1e-13)
    else:
        assert np.all(K[0] == 0.0) and np.all(np.asarray(k(X, X))[0] == 0.0)
    if b_std == 0:              # the degenerate case: q = 0 at the zero input
        g = jax.jit(jax.grad(lambda a: jnp.sum(k.fn(a, X2) ** 2)))(X)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_blocked_gram_equals_cross_path(monkeypatch, rng):
    """n = 10 in blocks of 3 rows would be 4 blocks; capped at 3 they are 4, 4, 2 rows:
    k(X, X) is exactly symmetric and equals the full cross computation off the
    diagonal to 1e-14."""
    monkeypatch.setattr(kernels, "_GRAM_BLOCK_ROWS", 3)
    monkeypatch.setattr(kernels, "_GRAM_MAX_BLOCKS", 3)
    n = 10
    x = jnp.asarray(rng.standard_normal((n, 4)))
    kernels._relu_fc_fn.cache_clear()            # trace the Gram with the blocks above
    k = kernels.nt_fc(depth=2, W_std=1.3, b_std=0.2)
    K = np.asarray(k(x, x))
    full = np.asarray(k.fn.cross(x, x))
    off = ~np.eye(n, dtype=bool)
    assert np.array_equal(K, K.T)
    np.testing.assert_allclose(K[off], full[off], rtol=0, atol=1e-14 * np.abs(full).max())
    kernels._relu_fc_fn.cache_clear()            # no later kernel keeps these blocks


def test_gradients_equal_neural_tangents(rng):
    """Input gradients through both paths: the cross path's equal neural-tangents' (its
    derivative rules are neural-tangents'), to 1e-10; the Gram path's (upper blocks,
    mirrored) equal the full cross computation's off the diagonal (on it, the angle's
    derivative at t ~ 1e-8 is rounding noise, in neural-tangents as here)."""
    depth, W, b = 1, 1.3, 0.2
    x, x2 = _inputs(rng)
    X, X2 = jnp.asarray(x), jnp.asarray(x2)
    k = kernels.nt_fc(depth=depth, W_std=W, b_std=b)
    ref = _stax(depth, W, b, "ntk")
    A2 = jnp.asarray(rng.standard_normal((len(x), len(x2))))
    g = jax.jit(jax.grad(lambda a: jnp.sum(A2 * k.fn(a, X2))))(X)
    g_ref = jax.jit(jax.grad(lambda a: jnp.sum(A2 * ref(a, X2, "ntk"))))(X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0,
                               atol=1e-10 * np.abs(g_ref).max())

    A = jnp.asarray(rng.standard_normal((len(x), len(x)))) * (1.0 - jnp.eye(len(x)))
    g = jax.jit(jax.grad(lambda a: jnp.sum(A * k.fn(a, a))))(X)
    g_ref = jax.jit(jax.grad(lambda a: jnp.sum(A * k.fn.cross(a, a))))(X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0,
                               atol=1e-10 * np.abs(g_ref).max())


@SLOW
def test_input_hessian_equals_neural_tangents(rng):
    """Second derivatives go through the same custom derivative rules: the input Hessian
    of k(x, x2_j) at a well-conditioned pair equals neural-tangents' to 1e-9."""
    depth, W, b = 2, 1.2, 0.3
    x, x2 = _inputs(rng, d=4)
    k = kernels.nt_fc(depth=depth, W_std=W, b_std=b)
    ref = _stax(depth, W, b, "ntk")
    X2 = jnp.asarray(x2)
    h = jax.jit(jax.hessian(lambda a: jnp.sum(k.fn(a[None], X2))))(jnp.asarray(x[1]))
    h_ref = jax.jit(jax.hessian(lambda a: jnp.sum(ref(a[None], X2, "ntk"))))(jnp.asarray(x[1]))
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=0,
                               atol=1e-9 * np.abs(h_ref).max())
