"""Tests for ntk_poison.convnets: the small CNN, its stax twin and its NTK.

Oracles: neural-tangents ``stax`` networks written out here, layer by layer, from the
architecture's definition (their ``apply_fn`` with the same weights); the numpy
NNGP / NTK recursion of the conv net with pooling (``oracles.cnn_kernels``); the
empirical NTK of wide nets (convergence at width^-1/2); sklearn's digits for a
training run.
"""

from __future__ import annotations

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from neural_tangents import stax  # noqa: E402

import ntk_poison  # noqa: E402,F401  (patches neural-tangents)
from ntk_poison import convnets, kernels, nets, train  # noqa: E402
from oracles.cnn_kernels import cnn_kernels  # noqa: E402
from oracles.util import rel_err  # noqa: E402


def oracle_stax(channels, depth, filter_size, pool, hidden, num_outputs, W_std, b_std,
                parameterization="ntk"):
    """The architecture of the contract, written directly in stax (not via the library).

    Standard parameterisation: He scale sqrt(2) W_std before each ReLU, LeCun W_std at
    the readout."""
    gain = math.sqrt(2.0) if parameterization == "standard" else 1.0
    kw = dict(b_std=b_std, parameterization=parameterization)
    layers = []
    for _ in range(depth):
        layers += [stax.Conv(channels, (filter_size, filter_size), padding="SAME",
                             W_std=gain * W_std, **kw), stax.Relu()]
        if pool > 1:
            layers.append(stax.AvgPool((pool, pool), strides=(pool, pool)))
    layers.append(stax.Flatten())
    if hidden:
        layers += [stax.Dense(hidden, W_std=gain * W_std, **kw), stax.Relu()]
    layers.append(stax.Dense(num_outputs, W_std=W_std, **kw))
    return stax.serial(*layers)


#: The models' forward pass, compiled (an eager first call compiles op by op: 7x slower).
apply = jax.jit(nets.apply_fn)
features = jax.jit(lambda model, x: model.features(x))


def _images(rng, n, shape=(8, 8, 1)):
    return jnp.asarray(rng.standard_normal((n,) + shape))


ARCHS = [
    dict(input_shape=(8, 8, 2), channels=6, depth=2, filter_size=3, pool=2, hidden=0,
         num_outputs=3, W_std=1.3, b_std=0.2),
    dict(input_shape=(8, 8, 1), channels=5, depth=2, filter_size=2, pool=2, hidden=7,
         num_outputs=1, W_std=0.9, b_std=0.1),
    dict(input_shape=(6, 6, 3), channels=4, depth=3, filter_size=3, pool=1, hidden=0,
         num_outputs=10, W_std=1.0, b_std=0.0),
]


# --------------------------------------------------------------------------- the stax twin

@pytest.mark.parametrize("arch,parameterization", [
    (ARCHS[0], "ntk"),
    pytest.param(ARCHS[1], "standard", marks=pytest.mark.slow),
    pytest.param(ARCHS[2], "ntk", marks=pytest.mark.slow)],
    ids=["pool2-ntk", "hidden_even_filter-standard", "no_pool-ntk"])
def test_cnn_equals_stax_apply_with_the_same_weights(arch, parameterization, rng):
    """The CNN equals (to 1e-10, float64) a stax network written here and the library's
    stax_twin, both with the CNN's weights in stax's layout."""
    model = nets.cnn(jax.random.key(3), parameterization=parameterization, **arch)
    x = _images(rng, 5, arch["input_shape"])
    arch_ = {k: v for k, v in arch.items() if k != "input_shape"}
    _, apply_oracle, _ = oracle_stax(parameterization=parameterization, **arch_)
    _, apply_twin, _ = convnets.stax_twin(**model.arch)
    params = convnets.stax_params(model)
    f = np.asarray(apply(model, x))
    assert f.dtype == np.float64
    assert f.shape == ((5,) if arch["num_outputs"] == 1 else (5, arch["num_outputs"]))
    for stax_apply in (apply_oracle, apply_twin):
        ref = np.asarray(jax.jit(stax_apply)(params, x)).reshape(f.shape)
        assert rel_err(f, ref) < 1e-10
    assert np.std(f) > 1e-3                              # not a trivially zero output


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_patch_convolution_equals_lax_convolution(k, rng):
    """The CPU path (im2col matmul) against lax.conv_general_dilated, SAME, odd and even
    filters (asymmetric padding)."""
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
    W = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
    ref = jax.lax.conv_general_dilated(x, W, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_err(convnets._conv_patches(x, W), ref) < 1e-13
    assert rel_err(convnets._conv_lax(x, W), ref) == 0.0


# --------------------------------------------------------------------------- the kernel

def test_empirical_ntk_converges_to_the_kernel_at_width_power_minus_half(rng):
    """Relative Frobenius error of the empirical NTK (num_outputs = 1, mean of 3 seeds)
    against model.kernel() at 16, 64, 256 channels, depth 2, pool 2: it falls with a
    log-log slope near -1/2 (measured 0.42, 0.19, 0.087: slope -0.57)."""
    x = _images(rng, 4)
    widths = (16, 64, 256)
    errs = []
    K = None
    for c in widths:
        e = []
        for seed in range(3):
            model = nets.cnn(jax.random.key(seed), (8, 8, 1), channels=c, depth=2, pool=2,
                             num_outputs=1, b_std=0.1)
            if K is None:
                K = np.asarray(model.kernel()(x, x))
            e.append(rel_err(nets.empirical_ntk(nets.apply_fn, model, x), K))
        errs.append(np.mean(e))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 2.5, errs
    assert -0.9 < slope < -0.3, (errs, slope)
    assert errs[2] < 0.15, errs


@pytest.mark.slow
@pytest.mark.parametrize("pool,hidden", [(1, 0), (2, 1)])
def test_empirical_ntk_converges_depth2_pool_hidden(pool, hidden, rng):
    """Depth 2 without pooling, and with a hidden dense layer as wide as the conv
    layers (hidden = 1 below means hidden = channels): the error falls like
    width^-1/2 (measured 0.22, 0.15, 0.096 and 0.36, 0.22, 0.068 on 3 seeds)."""
    x = _images(rng, 4)
    widths = (16, 64, 256)
    errs, K = [], None
    for c in widths:
        e = []
        for seed in range(3):
            model = nets.cnn(jax.random.key(seed), (8, 8, 1), channels=c, depth=2,
                             pool=pool, hidden=hidden * c, num_outputs=1, b_std=0.1)
            if K is None:
                K = np.asarray(model.kernel()(x, x))
            e.append(rel_err(nets.empirical_ntk(nets.apply_fn, model, x), K))
        errs.append(np.mean(e))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert errs[2] < errs[0] / 1.8 and errs[2] < 0.15, errs
    assert -1.0 < slope < -0.2, slope


@pytest.mark.slow
def test_ntk_of_several_logits_is_k_times_identity(rng):
    """With 3 logits the empirical NTK block (i, c; j, c') tends to k(x_i, x_j) delta_cc'."""
    import neural_tangents as nt
    x = _images(rng, 3)
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=256, num_outputs=3)
    K = np.asarray(model.kernel()(x, x))
    ntk = nt.empirical_ntk_fn(nets.apply_fn, trace_axes=(), vmap_axes=0)
    T = np.asarray(ntk(x, None, model))                    # (3, 3, C, C)
    assert T.shape == (3, 3, 3, 3)
    for c in range(3):
        assert rel_err(T[:, :, c, c], K) < 0.15
    off = T[:, :, 0, 1]
    assert np.linalg.norm(off) < 0.15 * np.linalg.norm(K)


def test_nt_cnn_with_pool_and_hidden_equals_the_numpy_recursion(rng):
    """model.kernel() (nt_cnn with pool 2 and a hidden layer) against the numpy
    NNGP / NTK recursion with pooling (measured: NTK 5e-10; its arccos near t = 0
    limits it)."""
    x = _images(rng, 3, (8, 8, 2))
    model = nets.cnn(jax.random.key(0), (8, 8, 2), channels=8, pool=2, hidden=7,
                     num_outputs=1, W_std=1.3, b_std=0.2)
    k = model.kernel("ntk")
    assert k == kernels.nt_cnn(2, 8, 3, 1.3, 0.2, "ntk", pool=2, hidden=7)
    ref = cnn_kernels(x, depth=2, pool=2, hidden=True, W_std=1.3, b_std=0.2)[1]
    assert rel_err(k(x, x), ref) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(pool=2), dict(depth=3, W_std=1.3, b_std=0.2),
                                dict(depth=1, pool=4, hidden=3, b_std=0.1)])
def test_nt_cnn_options_equal_the_numpy_recursion(kw, rng):
    """nt_cnn's NNGP (1e-13) and NTK (1e-8) against the numpy recursion; the default
    (no pool, no hidden layer) keeps the old kernel's identity (repr)."""
    x = _images(rng, 3, (8, 8, 2))
    okw = {k: v for k, v in kw.items() if k != "hidden"}
    nngp, ntk = cnn_kernels(x, hidden=bool(kw.get("hidden")), **okw)
    assert rel_err(kernels.nt_cnn(kind="nngp", **kw)(x, x), nngp) < 1e-13
    assert rel_err(kernels.nt_cnn(kind="ntk", **kw)(x, x), ntk) < 1e-8
    if not kw:
        assert repr(kernels.nt_cnn()) == (
            "kernels.nt_cnn(depth=2, channels=64, filter_size=3, W_std=1.0, b_std=0.0, "
            "kind='ntk')")


# --------------------------------------------------------------------------- the model

@pytest.mark.parametrize("num_outputs", [10, 100, 1])
def test_shapes_features_and_apply_fn(num_outputs, rng):
    x = jnp.asarray(rng.uniform(size=(3, 12, 12, 1)), jnp.float32)
    model = nets.CNN(input_shape=(12, 12, 1), channels=8, depth=2, filter_size=3, pool=2,
                     hidden=0, num_outputs=num_outputs, parameterization="standard",
                     rngs=nnx.Rngs(params=jax.random.key(0)), dtype=jnp.float32)
    out = apply(model, x)
    assert out.shape == ((3,) if num_outputs == 1 else (3, num_outputs))
    assert out.dtype == jnp.float32
    feats = features(model, x)
    assert feats.shape == (3, 3 * 3 * 8)
    # the readout is an affine map of the features
    W, b = np.asarray(model.readout.W[...]), np.asarray(model.readout.b[...])
    ref = np.asarray(feats) @ W + b
    np.testing.assert_allclose(np.asarray(out).reshape(ref.shape), ref, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("pool,hidden,F", [(1, 0, 8 * 8 * 4), (2, 0, 2 * 2 * 4),
                                           (4, 0, 0), (2, 9, 9)])
def test_pool_and_hidden_options(pool, hidden, F, rng):
    x = _images(rng, 2)
    if F == 0:                                             # 8 / 4 / 4 is not an integer
        with pytest.raises(ValueError, match="`pool`"):
            nets.cnn(jax.random.key(0), (8, 8, 1), channels=4, pool=pool)
        return
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=4, pool=pool, hidden=hidden)
    assert features(model, x).shape == (2, F)
    assert model.readout.W[...].shape == (F, 10)
    n_leaves = len(jax.tree_util.tree_leaves(model))
    assert n_leaves == 2 * (2 + 1 + (hidden > 0))            # (W, b) per layer
    assert model.kernel().param_dict.get("pool", 1) == pool


def test_init_is_deterministic_in_the_key_and_ntk_draws_are_standard_normal():
    a = nets.cnn(jax.random.key(1), (8, 8, 1), channels=64)
    b = nets.cnn(jax.random.key(1), (8, 8, 1), channels=64)
    c = nets.cnn(jax.random.key(2), (8, 8, 1), channels=64)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert not np.array_equal(np.asarray(a.convs[1].W[...]), np.asarray(c.convs[1].W[...]))
    W = np.asarray(a.convs[1].W[...]).ravel()               # 36864 N(0, 1) draws
    assert abs(W.mean()) < 0.03 and abs(W.std() - 1) < 0.02


def test_standard_parameterization_output_variance_matches_the_nngp():
    """Standard param at init: E_c f_c(x)^2 over 100 logits (independent readout rows)
    equals the NNGP k(x, x) of the He/LeCun net (the numpy recursion with weight scale
    sqrt(2) before each ReLU, 1 at the readout), within 25% (a LeCun-only init would
    be 4x smaller); and it is O(1): comparable to the pixels' second moment (measured
    ratio 0.9)."""
    from sklearn.datasets import load_digits
    x = load_digits().images[:6, :, :, None] / 16.0
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=128, num_outputs=100,
                     parameterization="standard")
    second = np.mean(np.asarray(apply(model, x)) ** 2, axis=1)     # (6,)
    k = np.diag(cnn_kernels(x, depth=2, pool=2, W_std=math.sqrt(2.0), W_out=1.0)[0])
    ratio = second.sum() / k.sum()
    assert 0.75 < ratio < 1.25, ratio
    pixels = float(np.mean(x ** 2))
    assert 0.1 < second.mean() / pixels < 10, (second.mean(), pixels)


# --------------------------------------------------------------------------- bad input

BAD = [
    (dict(input_shape=(8, 8)), "input_shape"),
    (dict(input_shape=(8, 0, 1)), "input_shape"),
    (dict(input_shape=784), "input_shape"),
    (dict(channels=0), "channels"),
    (dict(channels=2.5), "channels"),
    (dict(depth=0), "depth"),
    (dict(filter_size=0), "filter_size"),
    (dict(pool=0), "pool"),
    (dict(pool=3), "pool"),                    # 8 is not divisible by 3
    (dict(depth=4), "pool"),                   # 8 / 2^4 is not an integer
    (dict(hidden=-1), "hidden"),
    (dict(num_outputs=0), "num_outputs"),
    (dict(parameterization="mup"), "parameterization"),
    (dict(W_std=0.0), "W_std"),
    (dict(b_std=-0.1), "b_std"),
    (dict(dtype=jnp.int32), "dtype"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    kw = dict(input_shape=(8, 8, 1), channels=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        nets.cnn(jax.random.key(0), **kw)


def test_bad_key_images_and_kernel_requests(rng):
    with pytest.raises(ValueError, match="`key`"):
        nets.cnn(3, (8, 8, 1))
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=4)
    with pytest.raises(ValueError, match="`x`"):
        model(_images(rng, 2, (8, 8, 3)))
    with pytest.raises(ValueError, match="`x`"):
        model(jnp.zeros((2, 64)))
    with pytest.raises(ValueError, match="`kind`"):
        model.kernel("foo")
    std = nets.cnn(jax.random.key(0), (8, 8, 1), channels=4, parameterization="standard")
    with pytest.raises(ValueError, match="parameterization='ntk'"):
        std.kernel()
    with pytest.raises(ValueError, match="`model`"):
        convnets.stax_params(nets.init(jax.random.key(0), 4, 8))
    with pytest.raises(ValueError, match="`pool`"):
        kernels.nt_cnn(pool=0)
    with pytest.raises(ValueError, match="`hidden`"):
        kernels.nt_cnn(hidden=-2)


def test_train_rejects_images_of_the_wrong_shape(rng):
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=4, parameterization="standard")
    X = rng.uniform(size=(16, 28, 28, 1))
    with pytest.raises(ValueError, match="`X` has examples of shape"):
        train.train(model, nets.apply_fn, X, np.zeros(16, int),
                    train.TrainConfig(batch_size=8), progress=False)


# --------------------------------------------------------------------------- training

def test_standard_cnn_learns_256_digits():
    """6 epochs of SGD with momentum (lr 0.05, batch 16) on 256 sklearn digits: chance
    is 0.1; measured training accuracy 0.79 in the last epoch, 0.86 after it."""
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (d.images[:256, :, :, None] / 16.0).astype(np.float32)
    y = d.target[:256]
    model = nets.cnn(jax.random.key(0), (8, 8, 1), channels=8, depth=2, pool=2,
                     num_outputs=10, parameterization="standard", dtype=jnp.float32)
    cfg = train.TrainConfig(optimizer="momentum", lr=0.05, batch_size=16, epochs=6)
    trained, hist = train.train(model, nets.apply_fn, X, y, cfg, progress=False)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["accuracy"][-1] > 0.5, hist["accuracy"]
    acc = float(np.mean(np.argmax(np.asarray(apply(trained, X)), 1) == y))
    assert acc > 0.5, acc
    assert isinstance(trained, nets.CNN)
