"""Tests for ntk_poison.kernels against closed forms, the arc-cosine recursion in numpy
and Monte-Carlo kernels of sampled finite networks (neural-tangents)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import kernels
from oracles import arccos
from oracles import closed_forms as cf
from oracles import finite_diff as fd
from oracles.util import eps, rel_err

# --------------------------------------------------------------------------- closed forms

CLOSED_FORMS = [
    ("rbf", {"length_scale": 0.7, "variance": 1.0}, cf.rbf_gram),
    ("rbf", {"length_scale": 2.5, "variance": 0.3}, cf.rbf_gram),
    ("matern52", {"length_scale": 0.8, "variance": 1.0}, cf.matern52_gram),
    ("matern52", {"length_scale": 3.0, "variance": 2.0}, cf.matern52_gram),
    ("linear", {"bias": 0.0, "scale": 1.0}, cf.linear_gram),
    ("linear", {"bias": 0.7, "scale": 2.5}, cf.linear_gram),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,params,oracle", CLOSED_FORMS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CLOSED_FORMS)])
def test_closed_form_kernels_match_numpy(name, params, oracle, dtype, rng):
    x1 = rng.standard_normal((7, 3))
    x2 = rng.standard_normal((5, 3))
    x2[0] = x1[2]                                   # an exact coincidence (r = 0)
    k = getattr(kernels, name)(**params)
    K = np.asarray(k(jnp.asarray(x1, dtype), jnp.asarray(x2, dtype)))
    ref = oracle(x1.astype(dtype), x2.astype(dtype), **params)
    assert K.shape == (7, 5)
    assert K.dtype == dtype
    # Gram entries are O(1..10); the GEMM form of ||x - x'||^2 loses ~eps |x|^2.
    scale = max(1.0, np.max(np.abs(ref)))
    np.testing.assert_allclose(K, ref, rtol=0, atol=200 * eps(dtype) * scale)


@pytest.mark.parametrize("name,params", [("rbf", {"length_scale": 1.3, "variance": 0.4}),
                                         ("matern52", {"length_scale": 0.9, "variance": 2.0})])
def test_stationary_kernels_diagonal_is_variance_and_gram_symmetric(name, params, rng):
    x = jnp.asarray(rng.standard_normal((6, 4)))
    k = kernels.get(name, **params)
    K = np.asarray(k(x, x))
    np.testing.assert_allclose(np.diag(K), params["variance"], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(k.diag(x)), params["variance"], rtol=1e-14)
    np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-15)
    assert np.linalg.eigvalsh(K).min() > -1e-12


def test_kernel_pair_is_a_scalar_entry(rng):
    a, b = rng.standard_normal(3), rng.standard_normal(3)
    k = kernels.rbf(1.7)
    val = k.pair(jnp.asarray(a), jnp.asarray(b))
    assert np.ndim(val) == 0
    np.testing.assert_allclose(float(val), cf.rbf_gram(a[None], b[None], 1.7)[0, 0],
                               rtol=1e-14)


# --------------------------------------------------------------------------- registry

REGISTERED = [
    ("rbf", {"length_scale": 2.0, "variance": 0.5}),
    ("linear", {"bias": 0.3, "scale": 1.5}),
    ("matern52", {"length_scale": 0.6}),
    ("nt_fc", {"depth": 2, "W_std": 1.5, "b_std": 0.1}),
    ("nt_fc", {"depth": 1, "kind": "nngp"}),
    ("nt_cnn", {"depth": 1, "W_std": 1.2, "b_std": 0.05}),
    ("normalized", {"base": "nt_fc", "depth": 1, "activation": "erf"}),
    ("on_sphere", {"base": "rbf", "radius": 2.0, "length_scale": 0.8}),
]


@pytest.mark.parametrize("name,params", REGISTERED,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(REGISTERED)])
def test_get_by_name_equals_direct_construction(name, params, rng):
    by_name = kernels.get(name, **params)
    direct = getattr(kernels, name)(**params)
    assert by_name == direct and hash(by_name) == hash(direct)
    assert by_name.name == name
    shape = (3, 6, 6, 1) if name == "nt_cnn" else (3, 4)
    x1, x2 = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(shape))
    np.testing.assert_array_equal(np.asarray(by_name(x1, x2)), np.asarray(direct(x1, x2)))


def test_available_lists_the_builtin_kernels():
    assert {"rbf", "linear", "matern52", "nt_fc", "nt_cnn", "normalized",
            "on_sphere"} <= set(kernels.available())


def test_unknown_name_is_value_error_listing_known_names():
    with pytest.raises(ValueError) as info:
        kernels.get("no_such_kernel")
    msg = str(info.value)
    assert "no_such_kernel" in msg
    for name in kernels.available():
        assert name in msg


BAD_PARAMS = [
    ("rbf", {"length_scale": -1.0}),
    ("rbf", {"length_scale": 0.0}),
    ("rbf", {"variance": -2.0}),
    ("rbf", {"length_scale": float("nan")}),
    ("rbf", {"no_such_param": 1.0}),
    ("matern52", {"length_scale": -0.5}),
    ("linear", {"scale": 0.0}),
    ("linear", {"bias": -1.0}),
    ("nt_fc", {"depth": 0}),
    ("nt_fc", {"depth": 1.5}),
    ("nt_fc", {"kind": "foo"}),
    ("nt_fc", {"W_std": -1.0}),
    ("nt_fc", {"b_std": -0.1}),
    ("nt_fc", {"parameterization": "bogus"}),
    ("nt_cnn", {"depth": 0}),
    ("nt_cnn", {"kind": "foo"}),
    ("nt_cnn", {"filter_size": 0}),
    ("nt_cnn", {"channels": 2.5}),
    ("normalized", {"base": "no_such_kernel"}),
    ("normalized", {"base": 3.0}),
    ("normalized", {"base": "nt_fc", "depth": 0}),
    ("on_sphere", {"radius": -1.0}),
    ("on_sphere", {"radius": 0.0}),
]


@pytest.mark.parametrize("name,params", BAD_PARAMS,
                         ids=[f"{n}-{list(p)[0]}-{list(p.values())[0]}" for n, p in BAD_PARAMS])
def test_bad_parameters_are_value_errors(name, params):
    with pytest.raises(ValueError):
        kernels.get(name, **params)
    if "no_such_param" not in params:
        with pytest.raises(ValueError):
            getattr(kernels, name)(**params)


# the wrappers walk the same checks over a cheap non-stationary base
WALK_PARAMS = {"normalized": {"base": "linear", "bias": 0.5}, "on_sphere": {"base": "linear"}}


@pytest.mark.parametrize("name", ["rbf", "linear", "matern52", "nt_fc", "normalized",
                                  "on_sphere"])
def test_input_shape_mismatch_is_value_error(name, rng):
    k = kernels.get(name, **WALK_PARAMS.get(name, {}))
    x3 = jnp.asarray(rng.standard_normal((4, 3)))
    x4 = jnp.asarray(rng.standard_normal((4, 4)))
    with pytest.raises(ValueError, match="same input space"):
        k(x3, x4)
    with pytest.raises(ValueError, match="batch"):
        k(x3[0], x3)                                # no batch axis
    with pytest.raises(ValueError, match="batch"):
        k(jnp.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1)))   # images to a vector kernel


def test_nt_cnn_rejects_flat_inputs_and_mismatched_images(rng):
    k = kernels.nt_cnn(depth=1)
    with pytest.raises(ValueError, match="images"):
        k(jnp.zeros((2, 64)), jnp.zeros((2, 64)))
    with pytest.raises(ValueError, match="same input space"):
        k(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 6, 1)))


# --------------------------------------------------------------------------- equality / jit

def test_registered_kernels_equal_by_name_and_params():
    a, b = kernels.rbf(1.0), kernels.rbf(1.0)
    assert a is not b and a == b and hash(a) == hash(b)
    assert kernels.rbf(1) == kernels.rbf(1.0)                 # params normalised to float
    assert kernels.rbf(1.0) != kernels.rbf(2.0)
    assert kernels.rbf(1.0) != kernels.matern52(1.0)
    assert kernels.nt_fc(kind="ntk") != kernels.nt_fc(kind="nngp")
    assert len({kernels.rbf(1.0), kernels.rbf(1.0), kernels.rbf(3.0)}) == 2


def test_custom_kernels_equal_only_to_themselves():
    fn = lambda x1, x2: x1 @ x2.T  # noqa: E731
    a, b = kernels.Kernel(fn), kernels.Kernel(fn)
    assert a == a and hash(a) == hash(a)
    assert a != b
    assert a != kernels.linear()


def test_kernel_is_usable_as_static_jit_argument_and_reuses_cache(rng):
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def gram_sum(k, x):
        traces.append(k)
        return jnp.sum(k.fn(x, x))

    x = jnp.asarray(rng.standard_normal((5, 3)))
    v1 = gram_sum(kernels.rbf(1.5), x)
    v2 = gram_sum(kernels.rbf(1.5), x)             # a new but equal kernel: cache hit
    assert len(traces) == 1
    v3 = gram_sum(kernels.rbf(0.5), x)             # different params: retrace
    assert len(traces) == 2
    xn = np.asarray(x)
    np.testing.assert_allclose(float(v1), cf.rbf_gram(xn, xn, 1.5).sum(), rtol=1e-13)
    assert float(v2) == float(v1)
    np.testing.assert_allclose(float(v3), cf.rbf_gram(xn, xn, 0.5).sum(), rtol=1e-13)


@pytest.mark.parametrize("name", ["rbf", "matern52", "nt_fc", "normalized", "on_sphere"])
def test_kernel_call_works_on_tracers(name, rng):
    k = kernels.get(name, **WALK_PARAMS.get(name, {}))
    x1 = jnp.asarray(rng.standard_normal((4, 3)))
    x2 = jnp.asarray(rng.standard_normal((2, 3)))
    jitted = jax.jit(lambda a, b: k(a, b))(x1, x2)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(k(x1, x2)), rtol=1e-14)
    # and under grad: d/dx sum k(x, x2) is finite and has the input's shape
    g = jax.grad(lambda a: jnp.sum(k(a, x2)))(x1)
    assert g.shape == x1.shape and bool(jnp.all(jnp.isfinite(g)))


# --------------------------------------------------------------------------- nt_fc vs arc-cosine

ARCCOS_GRID = [(1, 1.5, 0.1), (2, 1.5, 0.1), (3, 1.5, 0.1), (2, 0.8, 0.6)]


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("depth,W_std,b_std", ARCCOS_GRID)
def test_nt_fc_matches_arccos_recursion(depth, W_std, b_std, kind, rng):
    x1 = rng.standard_normal((6, 5))
    x1[1] *= 3.0                                     # different norms matter (1/d, b_std)
    x2 = rng.standard_normal((4, 5)) * 0.5
    k = kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind)
    nngp, ntk = arccos.relu_kernels(x1, x2, depth, W_std, b_std)
    ref = ntk if kind == "ntk" else nngp
    K = np.asarray(k(jnp.asarray(x1), jnp.asarray(x2)))
    np.testing.assert_allclose(K, ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("depth,W_std,b_std", [(1, 1.0, 0.0), (2, 1.5, 0.1), (3, 0.8, 0.3)])
def test_nt_fc_erf_matches_arcsine_recursion(depth, W_std, b_std, kind, rng):
    """activation="erf" against Williams' (1997) arcsine recursion, diagonal included."""
    x1 = rng.standard_normal((6, 5))
    x1[1] *= 3.0
    x2 = np.concatenate([rng.standard_normal((3, 5)) * 0.5, x1[:1]])
    k = kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind, activation="erf")
    nngp, ntk = arccos.erf_kernels(x1, x2, depth, W_std, b_std)
    K = np.asarray(k(jnp.asarray(x1), jnp.asarray(x2)))
    np.testing.assert_allclose(K, ntk if kind == "ntk" else nngp, rtol=1e-10, atol=0)
    assert k != kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind)


def test_nt_fc_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="activation"):
        kernels.nt_fc(activation="tanh")


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("depth", [3])
def test_nt_fc_diagonal_matches_exact_t0_recursion(depth, kind, rng):
    """k(x, x): the arc-cosine angle is ill-conditioned at t = 0 (cos rounded to 1 - eps
    gives t ~ sqrt(2 eps) ~ 2e-8) and the NTK is linear in t there, so neural-tangents'
    diagonal carries an O(sqrt(eps)) error; the tolerance is 1e-6 accordingly. The NNGP
    is quadratic in t and is held to 1e-12."""
    x = rng.standard_normal((5, 4))
    k = kernels.nt_fc(depth=depth, W_std=1.5, b_std=0.1, kind=kind)
    nngp, ntk = arccos.relu_kernels(x, x, depth, 1.5, 0.1)
    ref = np.diag(ntk if kind == "ntk" else nngp)
    np.testing.assert_allclose(np.asarray(k.diag(jnp.asarray(x))), ref,
                               rtol=1e-6 if kind == "ntk" else 1e-12)


# --------------------------------------------------------------------------- Monte Carlo

def _fc_net(depth, width, out, W_std, b_std):
    from neural_tangents import stax

    layers = []
    for _ in range(depth):
        layers += [stax.Dense(width, W_std=W_std, b_std=b_std), stax.Relu()]
    return stax.serial(*layers, stax.Dense(out, W_std=W_std, b_std=b_std))


# (depth, kind, width, readout width, samples, tolerance)
MC_FC = [
    (1, "ntk", 2048, 1, 100, 0.03),
    (2, "ntk", 512, 1, 64, 0.05),
    (2, "nngp", 512, 256, 64, 0.06),
]


@pytest.mark.parametrize("depth,kind,width,out,samples,tol", MC_FC,
                         ids=[f"depth{d}-{k}-w{w}-S{s}" for d, k, w, _, s, _ in MC_FC])
def test_nt_fc_matches_monte_carlo_of_finite_networks(depth, kind, width, out, samples, tol,
                                                      rng):
    """The infinite-width kernel against the average empirical kernel of ``samples``
    networks of the same architecture at finite ``width`` (nt.monte_carlo_kernel_fn).

    Tolerance: the empirical kernel of one width-w network fluctuates by O(1/sqrt(w))
    relative (a few times 1/sqrt(w) for depth 2), so the mean of S samples has a
    relative error O(1/sqrt(w S)) (observed 0.1-2% over seeds), and the finite-width
    bias is O(1/w) ~ 0.2%.
    The NNGP is estimated from ``out`` i.i.d. readout channels (NT averages over the
    traced output axis). The tolerances (3-6%) are several times that spread, and far
    below the error of any convention slip, which the test checks as well: a wrong
    W_std (1.0 for 1.5) moves the kernel by > 3 x tol.
    """
    import neural_tangents as nt

    W_std, b_std = 1.5, 0.1
    x = rng.standard_normal((4, 5))
    x[1] *= 2.0
    init_fn, apply_fn, _ = _fc_net(depth, width, out, W_std, b_std)
    mc = nt.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), samples,
                                  device_count=0)
    K_mc = np.asarray(mc(jnp.asarray(x), None, kind))
    K = np.asarray(kernels.nt_fc(depth=depth, W_std=W_std, b_std=b_std, kind=kind)(
        jnp.asarray(x), jnp.asarray(x)))
    assert rel_err(K, K_mc) < tol
    wrong = arccos.relu_kernels(x, x, depth, 1.0, b_std)[0 if kind == "nngp" else 1]
    assert rel_err(wrong, K_mc) > 3 * tol


# --------------------------------------------------------------------------- nt_cnn

@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_nt_cnn_shape_symmetry_psd(kind, rng):
    x1 = jnp.asarray(rng.standard_normal((5, 8, 8, 1)))
    x2 = jnp.asarray(rng.standard_normal((3, 8, 8, 1)))
    k = kernels.nt_cnn(depth=2, W_std=1.5, b_std=0.1, kind=kind)
    assert k.input_rank == 3
    K12 = np.asarray(k(x1, x2))
    assert K12.shape == (5, 3)
    K21 = np.asarray(k(x2, x1))
    np.testing.assert_allclose(K12, K21.T, rtol=1e-12)
    K = np.asarray(k(x1, x1))
    np.testing.assert_allclose(K, K.T, rtol=1e-12)
    w = np.linalg.eigvalsh(K)
    assert w.min() > -1e-10 * w.max()
    assert np.all(np.diag(K) > 0)


def test_nt_cnn_with_1x1_filters_and_one_pixel_is_the_fc_kernel(rng):
    """On 1x1 single-channel "images", a 1x1 conv is a Dense layer on a scalar, so the
    kernel is the arc-cosine recursion with d = 1 (an independent closed form)."""
    x1 = rng.standard_normal((4, 1, 1, 1))
    x2 = rng.standard_normal((3, 1, 1, 1))
    for kind, which in (("ntk", 1), ("nngp", 0)):
        k = kernels.nt_cnn(depth=2, filter_size=1, W_std=1.5, b_std=0.1, kind=kind)
        ref = arccos.relu_kernels(x1.reshape(4, 1), x2.reshape(3, 1), 2, 1.5, 0.1)[which]
        np.testing.assert_allclose(np.asarray(k(jnp.asarray(x1), jnp.asarray(x2))), ref,
                                   rtol=1e-10)


def test_nt_cnn_matches_monte_carlo_loosely(rng):
    """NTK of the conv net against 50 sampled networks with 64 channels.

    Same reasoning as the fully connected case with width ~ channels x pixels seen by
    the readout; observed error ~1%, tolerance 10% (loose), and a wrong W_std is
    rejected.
    """
    import neural_tangents as nt
    from neural_tangents import stax

    W_std, b_std = 1.5, 0.1
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)))
    layers = []
    for _ in range(2):
        layers += [stax.Conv(64, (3, 3), padding="SAME", W_std=W_std, b_std=b_std),
                   stax.Relu()]
    init_fn, apply_fn, _ = stax.serial(*layers, stax.Flatten(),
                                       stax.Dense(1, W_std=W_std, b_std=b_std))
    mc = nt.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 50,
                                  device_count=0)
    K_mc = np.asarray(mc(x, None, "ntk"))
    K = np.asarray(kernels.nt_cnn(depth=2, W_std=W_std, b_std=b_std)(x, x))
    assert rel_err(K, K_mc) < 0.10
    K_wrong = np.asarray(kernels.nt_cnn(depth=2, W_std=1.0, b_std=b_std)(x, x))
    assert rel_err(K_wrong, K_mc) > 0.30


def test_matern52_hessian_at_the_diagonal_is_exact():
    """Regression: sqrt(d2 + tiny) made the autodiff Hessian at x = x' zero.

    Closed form: k = 1 - 5 r^2 / (6 l^2) + O(r^4) so hess_x k(x, x) = -5/(3 l^2) I,
    and near the diagonal the Hessian must match finite differences of the gradient.
    """
    import jax
    import jax.numpy as jnp
    from ntk_poison import kernels
    ell = 1.7
    k = kernels.matern52(ell)
    x = jnp.array([0.3, -0.2, 1.0])
    H = jax.hessian(lambda a: k.pair(a, x))(x)
    np.testing.assert_allclose(np.asarray(H), -5.0 / (3 * ell ** 2) * np.eye(3), atol=1e-12)
    for eps in (1e-9, 1e-4, 1e-2):
        z = x + eps * jnp.array([1.0, 0.5, 0.0])
        H = np.asarray(jax.hessian(lambda a: k.pair(a, z))(x))
        g = lambda a: jax.grad(lambda b: k.pair(b, z))(a)
        h = 1e-6
        fd = np.array([(g(x + h * e) - g(x - h * e)) / (2 * h) for e in np.eye(3)])
        np.testing.assert_allclose(H, fd, atol=1e-8)


# --------------------------------------------------------------------------- wrappers

def _np_normalized(K12, d1, d2):
    return K12 / np.sqrt(np.outer(d1, d2))


def _np_sphere(x, radius):
    return radius * x / np.linalg.norm(x, axis=1, keepdims=True)


# base kernel, its numpy oracle (x1, x2) -> Gram, tolerance of k(x, x) = 1
NORMALIZED_BASES = [
    ("relu", lambda: kernels.nt_fc(depth=2, W_std=1.5, b_std=0.1),
     lambda a, b: arccos.relu_kernels(a, b, 2, 1.5, 0.1)[1], 1e-6),
    ("erf", lambda: kernels.nt_fc(depth=1, W_std=1.5, b_std=0.1, activation="erf"),
     lambda a, b: arccos.erf_kernels(a, b, 1, 1.5, 0.1)[1], 1e-13),
    ("rbf", lambda: kernels.rbf(0.9, variance=0.3),
     lambda a, b: cf.rbf_gram(a, b, 0.9, 0.3), 1e-14),
]


@pytest.mark.parametrize("label,base,oracle,tol", NORMALIZED_BASES,
                         ids=[b[0] for b in NORMALIZED_BASES])
def test_normalized_kernel_against_numpy_normalisation(label, base, oracle, tol, rng):
    """k_n = k / sqrt(k(x,x) k(x',x')) against the numpy kernel normalised in numpy;
    k_n(x, x) = 1, symmetric, PSD."""
    x1 = rng.standard_normal((6, 5))
    x1[1] *= 3.0                                   # norms matter for the NTKs
    x2 = rng.standard_normal((4, 5)) * 0.5
    k = kernels.normalized(base())
    ref = _np_normalized(oracle(x1, x2), np.diag(oracle(x1, x1)), np.diag(oracle(x2, x2)))
    np.testing.assert_allclose(np.asarray(k(jnp.asarray(x1), jnp.asarray(x2))), ref,
                               rtol=max(tol, 1e-10), atol=0)
    K = np.asarray(k(jnp.asarray(x1), jnp.asarray(x1)))
    np.testing.assert_allclose(np.diag(K), 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(k.diag(jnp.asarray(x1))), 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-14)
    assert np.linalg.eigvalsh(K).min() > -1e-12
    assert np.max(np.abs(K)) <= 1.0 + tol           # Cauchy-Schwarz
    assert k == kernels.get("normalized", base=base()) and k != base()


def test_on_sphere_against_numpy_projection(rng):
    x1, x2 = rng.standard_normal((5, 4)) * 2.0, rng.standard_normal((3, 4))
    k = kernels.on_sphere(kernels.nt_fc(depth=1, activation="erf"), radius=1.7)
    ref = arccos.erf_kernels(_np_sphere(x1, 1.7), _np_sphere(x2, 1.7), 1)[1]
    np.testing.assert_allclose(np.asarray(k(jnp.asarray(x1), jnp.asarray(x2))), ref,
                               rtol=1e-10, atol=0)
    # scaling an input does not change it
    np.testing.assert_allclose(np.asarray(k(jnp.asarray(3.0 * x1), jnp.asarray(x2))), ref,
                               rtol=1e-10, atol=0)
    assert k == kernels.get("on_sphere", base="nt_fc", depth=1, activation="erf", radius=1.7)
    assert k != kernels.on_sphere(kernels.nt_fc(depth=1, activation="erf"), radius=1.0)


@pytest.mark.parametrize("which", ["normalized", "on_sphere"])
def test_wrapper_input_gradients_match_finite_differences(which, rng):
    """grad_x k(x, x') of the smooth wrappers (erf NTK base) by autodiff against
    Richardson central differences of the numpy oracle."""
    x, x2 = rng.standard_normal(5), rng.standard_normal(5)
    if which == "normalized":
        k = kernels.normalized(kernels.nt_fc(depth=1, b_std=0.2, activation="erf"))

        def f(a):
            num = arccos.erf_kernels(a[None], x2[None], 1, 1.0, 0.2)[1][0, 0]
            d1 = arccos.erf_kernels(a[None], a[None], 1, 1.0, 0.2)[1][0, 0]
            d2 = arccos.erf_kernels(x2[None], x2[None], 1, 1.0, 0.2)[1][0, 0]
            return num / np.sqrt(d1 * d2)
    else:
        k = kernels.on_sphere(kernels.nt_fc(depth=1, activation="erf"), radius=1.3)

        def f(a):
            return arccos.erf_kernels(_np_sphere(a[None], 1.3), _np_sphere(x2[None], 1.3),
                                      1)[1][0, 0]
    g = np.asarray(jax.grad(lambda a: k.pair(a, jnp.asarray(x2)))(jnp.asarray(x)))
    np.testing.assert_allclose(g, fd.gradient(f, x), rtol=1e-7, atol=1e-10)
    if which == "on_sphere":                         # no radial part: g . x = 0
        assert abs(float(g @ x)) <= 1e-12 * np.linalg.norm(g) * np.linalg.norm(x)


def test_wrappers_reject_params_with_a_kernel_base():
    with pytest.raises(ValueError, match="base"):
        kernels.normalized(kernels.rbf(1.0), length_scale=2.0)
