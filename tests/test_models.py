"""Every model class through the same checks (the model protocol, ntk_poison.models).

In the manner of optax's ``float64_test.py``: one list of models, one set of checks.
Each model is fitted on flat inputs ``(n, 3)`` and, where its kernel or network takes
them, on images ``(n, 4, 4, 1)``; each check runs on every one:

* shapes of ``predict``, ``input_grad``, ``input_jacobian``, ``input_hessian`` (a path
  adds a leading member axis);
* gradients against central finite differences of ``predict``, Hessians against
  central differences of ``input_grad``;
* Hessian symmetry;
* dtype: the same model cast to float32 predicts in float32 and agrees with float64;
* a jit round trip: the model passes through ``jax.jit`` unchanged, and a jitted
  function of it gives the method's numbers; chunking (``batch_size``) changes nothing;
* a query of the wrong shape is a ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import flow, kernels, krr, models, nets, penalized

N, M, LAM = 8, 5, 0.05
H_GRAD, H_HESS = 1e-5, 1e-4


def _image_rbf(length_scale=2.0):
    """An RBF kernel of images (n, H, W, C): smooth, so the penalised models exist."""
    def fn(a, b):
        return jnp.exp(-kernels.sq_dists(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
                       / (2 * length_scale ** 2))
    return kernels.Kernel(fn, "rbf_images_test", input_rank=3)


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N,) + shape)
    y = np.tanh(X.reshape(N, -1).sum(1))
    x = rng.standard_normal((M,) + shape)
    return X, y, x


def _kernel(shape):
    return kernels.rbf(1.3) if len(shape) == 1 else _image_rbf()


def _net(shape):
    d = int(np.prod(shape))
    p0 = nets.init(jax.random.key(0), d, 64, depth=1, activation="erf")
    X, y, _ = _data(shape)
    p, _ = nets.train(p0, nets.apply_fn, X, y, lr=0.2, steps=5)
    return nets.NetModel(p, p0)


BUILDERS = {
    "krr": lambda s, X, y: krr.fit(_kernel(s), X, y, LAM),
    "penalized_output": lambda s, X, y: penalized.fit_penalized(_kernel(s), X, y, LAM, 0.3),
    "penalized_loss": lambda s, X, y: penalized.fit_penalized(_kernel(s), X, y, LAM, 0.3,
                                                              penalty="loss"),
    "penalized_restricted": lambda s, X, y: penalized.fit_restricted(_kernel(s), X, y, LAM,
                                                                     0.3),
    "sweep_path": lambda s, X, y: penalized.fit_penalized_sweep(_kernel(s), X, y, LAM,
                                                                [0.0, 0.1, 1.0]),
    "flow_path": lambda s, X, y: flow.kernel_flow(_kernel(s), X, y, LAM, 0.2, [0.5, 5.0]),
    "net": lambda s, X, y: _net(s),
    "stacked": lambda s, X, y: models.stack([krr.fit(_kernel(s), X, y, LAM),
                                             krr.fit(_kernel(s), X, -y, 2 * LAM)]),
}
SHAPES = {"flat": (3,), "image": (4, 4, 1)}
#: on images too: a kernel model, a penalised one and a network (the protocol's code is
#: the same for every class; the rest run on flat inputs, to keep the suite short)
ON_IMAGES = ("krr", "penalized_output", "net")
CASES = [(b, s) for b in BUILDERS for s in SHAPES if s == "flat" or b in ON_IMAGES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{s}" for b, s in CASES])
def case(request):
    name, kind = request.param
    shape = SHAPES[kind]
    X, y, x = _data(shape)
    model = BUILDERS[name](shape, X, y)
    return model, x, shape


def _members(model):
    return len(model) if model.leading_axes else None


def _lead(shape, model):
    T = _members(model)
    return shape if T is None else (T,) + shape


def test_is_a_model_of_the_protocol(case):
    model, x, shape = case
    assert isinstance(model, models.Model) and model.scalar_output
    assert isinstance(model.as_function(), models.Function)


def test_shapes(case):
    model, x, shape = case
    d = int(np.prod(shape))
    assert model.predict(x).shape == _lead((M,), model)
    assert model.input_grad(x).shape == _lead((M,) + shape, model)
    assert model.input_jacobian(x).shape == _lead((M,) + shape, model)
    assert model.input_hessian(x).shape == _lead((M, d, d), model)


def _fd(f, x, h):
    """Central differences of f (batch -> array) along every input coordinate of x:
    returns (..., m, *s) with the coordinate axes last."""
    shape = x.shape[1:]
    d = int(np.prod(shape))
    cols = []
    for a in range(d):
        e = np.zeros(d)
        e[a] = h
        e = e.reshape(shape)
        cols.append((np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * h))
    return np.stack(cols, -1)


def test_gradient_against_finite_differences(case):
    model, x, shape = case
    g = np.asarray(model.input_grad(x))
    fd = _fd(model.predict, x, H_GRAD).reshape(g.shape)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(model.input_jacobian(x)), g, rtol=1e-12, atol=1e-14)


def test_hessian_against_finite_differences_and_symmetric(case):
    model, x, shape = case
    Hs = np.asarray(model.input_hessian(x))
    d = int(np.prod(shape))
    fd = _fd(lambda z: np.asarray(model.input_grad(z)).reshape(_lead((M, d), model)),
             x, H_HESS)
    np.testing.assert_allclose(Hs, fd, rtol=1e-5, atol=1e-6)
    scale = np.max(np.abs(Hs))
    assert np.max(np.abs(Hs - np.swapaxes(Hs, -1, -2))) <= 1e-10 * scale


def _to32(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if hasattr(a, "dtype")
        and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def test_dtype_is_preserved(case):
    model, x, shape = case
    m32 = _to32(model)
    x32 = x.astype(np.float32)
    for method in ("predict", "input_grad", "input_hessian"):
        a64 = np.asarray(getattr(model, method)(x))
        a32 = getattr(m32, method)(x32)
        assert a32.dtype == jnp.float32 and a64.dtype == np.float64, method
        np.testing.assert_allclose(np.asarray(a32), a64, rtol=2e-3,
                                   atol=2e-3 * max(1.0, np.max(np.abs(a64))))


def test_jit_round_trip_and_batch_size(case):
    model, x, shape = case
    same = jax.jit(lambda m: m)(model)
    np.testing.assert_array_equal(np.asarray(same.predict(x)), np.asarray(model.predict(x)))
    f = jax.jit(lambda m, z: jax.vmap(m.as_function())(z))(model, jnp.asarray(x))
    want = np.asarray(model.predict(x))
    np.testing.assert_allclose(np.moveaxis(np.asarray(f), 0, -1) if model.leading_axes
                               else np.asarray(f), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(model.predict(x, batch_size=2)), want,
                               rtol=1e-13, atol=1e-15)


def test_bad_queries_are_value_errors(case):
    model, x, shape = case
    wrong = np.zeros((2, 5)) if len(shape) != 1 or shape[0] != 5 else np.zeros((2, 6))
    with pytest.raises(ValueError):
        model.predict(wrong)
    with pytest.raises(ValueError):
        model.input_grad(np.full((2,) + shape, np.nan))
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(x, batch_size=0)


def test_stack_checks_its_members():
    X, y, _ = _data((3,))
    with pytest.raises(ValueError, match="empty"):
        models.stack([])
    with pytest.raises(ValueError, match="not a model"):
        models.stack([object()])
    Xi, yi, _ = _data((4, 4, 1))
    with pytest.raises(ValueError, match="input shapes"):
        models.stack([krr.fit(kernels.rbf(1.0), X, y), krr.fit(_image_rbf(), Xi, yi)])
