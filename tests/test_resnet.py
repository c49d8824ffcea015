"""PreActResNet (ntk_poison.resnet) against independent references: parameter counts
from the architecture written out layer by layer, a numpy convolution, a numpy
BatchNorm, the published PreActResNet-18 count, and one tiny training run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_poison import nets
from ntk_poison import resnet as R
from ntk_poison import train as T

KEY = jax.random.PRNGKey(0)


def _count(model, kind=nnx.Param):
    return sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(nnx.state(model, kind)))


def _formula(depth, width, classes, c_in=3, bn=True):
    """Parameters of a pre-activation ResNet written out by hand: 3x3 stem, basic
    blocks (BN(c_in), conv3x3 c_in->c, BN(c), conv3x3 c->c, 1x1 projection where
    the shape changes), final BN, dense with bias; a BN has 2c parameters."""
    stages = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}.get(depth, [(depth - 2) // 6] * 3)
    widths = [64, 128, 256, 512] if depth in (18, 34) else [16, 32, 64]
    widths = [int(w * width) for w in widths]
    bnp = (lambda c: 2 * c) if bn else (lambda c: 0)
    total = 3 * 3 * c_in * widths[0]
    prev = widths[0]
    for s, (nb, c) in enumerate(zip(stages, widths)):
        for i in range(nb):
            total += bnp(prev) + 9 * prev * c + bnp(c) + 9 * c * c
            if i == 0 and (s > 0 or prev != c):
                total += prev * c
            prev = c
    return total + bnp(prev) + prev * classes + classes


def test_preactresnet18_parameter_count():
    m = R.resnet(KEY)                                  # depth 18, width 1, 10 classes
    n = _count(m)
    assert n == _formula(18, 1, 10) == 11_172_170
    # the published CIFAR PreActResNet-18 (kuangliu/pytorch-cifar) has 11,171,146: the
    # same net without the final BN-ReLU of He et al. 2016 (2 x 512 affine parameters)
    assert n - 2 * 512 == 11_171_146
    # running mean and variance: as many as the BN affine parameters
    assert _count(m, nnx.BatchStat) == _formula(18, 1, 10) - _formula(18, 1, 10, bn=False)
    # no-norm and ntk variants: the conv and dense weights only
    assert _count(R.resnet(KEY, 34, 1 / 16, parameterization="ntk")) == _formula(34, 1 / 16, 10,
                                                                                 bn=False)


def test_preresnet110_builds_with_the_formula_count():
    m = R.resnet(KEY, 110)
    assert len(m.blocks) == 54
    assert _count(m) == _formula(110, 1, 10) == 1_730_522    # the paper's "1.7M"
    assert _count(m, nnx.BatchStat) == _formula(110, 1, 10) - _formula(110, 1, 10, bn=False)


@pytest.mark.parametrize("depth, width, H, C, outs", [
    (18, 1 / 16, 8, 3, 10), (20, 0.25, 7, 2, 100)])
def test_shapes_and_features(rng, depth, width, H, C, outs):
    m = R.resnet(KEY, depth, width, outs, in_channels=C)
    x = jnp.asarray(rng.normal(size=(3, H, H, C)))
    out, feats = jax.jit(lambda m, x: (m(x), m.features(x)))(m, x)
    last = (512 if depth == 18 else 64) * width
    assert out.shape == ((3,) if outs == 1 else (3, outs))
    assert feats.shape == (3, last) and bool(jnp.all(feats >= 0))   # after a ReLU
    np.testing.assert_allclose(m.readout(feats)[:, 0] if outs == 1 else m.readout(feats), out,
                               rtol=1e-12)


def _np_conv(x, W, stride):
    """numpy cross-correlation, zero padding (k-1)/2 each side, NHWC x HWIO."""
    k = W.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    Ho = (x.shape[1] + 2 * p - k) // stride + 1
    Wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], Ho, Wo, W.shape[3]))
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("nhwc,hwcd->nd", patch, W)
    return out


@pytest.mark.parametrize("k, stride, H", [(3, 1, 5), (3, 2, 6), (3, 2, 5), (1, 2, 6)])
def test_conv_against_numpy(rng, k, stride, H):
    x, W = rng.normal(size=(2, H, H, 3)), rng.normal(size=(k, k, 3, 4))
    got = R.Conv(W, stride, 0.7)(jnp.asarray(x))
    assert got.shape[1] == math.ceil(H / stride)           # PyTorch's padding 1
    np.testing.assert_allclose(got, 0.7 * _np_conv(x, W, stride), rtol=0, atol=1e-12)


def test_batchnorm_layer_train_and_eval_against_numpy(rng):
    m = R.resnet(KEY, 8, 0.25, in_channels=2)
    x = jnp.asarray(rng.normal(size=(5, 6, 6, 2)))
    h = np.asarray(m.stem(x))
    bn = nnx.clone(m.blocks[0].norm1)
    assert bn.use_running_average                          # built in evaluation mode
    s, b = np.linspace(0.5, 2, 4), np.linspace(-1, 1, 4)
    bn.scale, bn.bias = nnx.Param(jnp.asarray(s)), nnx.Param(jnp.asarray(b))
    rm0, rv0 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    np.testing.assert_allclose(bn(h), (h - rm0) / np.sqrt(rv0 + 1e-5) * s + b, atol=1e-12)
    trn = nnx.view(bn, use_running_average=False)
    mu, var = h.mean((0, 1, 2)), h.var((0, 1, 2))             # biased batch variance
    np.testing.assert_allclose(trn(h), (h - mu) / np.sqrt(var + 1e-5) * s + b, atol=1e-12)
    rm, rv = 0.9 * rm0 + 0.1 * mu, 0.9 * rv0 + 0.1 * var
    np.testing.assert_allclose(trn.mean[...], rm, atol=1e-12)
    np.testing.assert_allclose(trn.var[...], rv, atol=1e-12)
    ev = nnx.view(trn, use_running_average=True)
    np.testing.assert_allclose(ev(h[:1]), (h[:1] - rm) / np.sqrt(rv + 1e-5) * s + b, atol=1e-12)


def test_ntk_has_no_batchnorm_and_equals_standard_without_norm_at_init(rng):
    ntk = R.resnet(KEY, 8, 0.5, 1, parameterization="ntk")     # scalar outputs (n,)
    std = R.resnet(KEY, 8, 0.5, 1, norm="none")
    bn = R.resnet(KEY, 8, 0.5)
    assert _count(ntk, nnx.BatchStat) == _count(std, nnx.BatchStat) == 0
    assert _count(bn, nnx.BatchStat) == 2 * (8 + 8 + 8 + 16 + 16 + 32 + 32)   # 7 BNs
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)))
    assert ntk(x).shape == (4,)
    np.testing.assert_allclose(ntk(x), std(x), rtol=1e-10)      # same draws, scale moved
    w = [v for v in jax.tree_util.tree_leaves(nnx.state(ntk, nnx.Param))]
    assert abs(float(np.std(np.concatenate([np.ravel(v) for v in w]))) - 1) < 0.05  # N(0, 1)


@pytest.mark.parametrize("index", [0, 3])         # an identity and a projection block
def test_ntk_residual_scaling_keeps_the_second_moment(rng, index):
    """Without BatchNorm a block maps i.i.d. N(0, 1) inputs to second moment ~1 away from
    the zero padding: branch and shortcut carry 1 each (a ReLU halves, W_std^2 = 2
    doubles), and the 1/sqrt(2) sum brings 2 back to 1 (unscaled it would be 2)."""
    block = R.resnet(KEY, 20, 2, parameterization="ntk").blocks[index]
    c_in = block.conv1.W.shape[2]
    out = block(jnp.asarray(rng.normal(size=(4, 16, 16, c_in))))
    q = float(jnp.mean(out[:, 2:-2, 2:-2] ** 2))           # receptive fields off the border
    assert 0.8 < q < 1.25, q


@pytest.mark.slow    # compiling a ResNet training step costs ~10 s of CPU; the engine's
def test_tiny_batchnorm_resnet_training_decreases_the_loss(rng):   # BN path: test_train.py
    X = rng.normal(size=(16, 6, 6, 1))
    Y = (X.mean((1, 2, 3)) > 0).astype(np.int32)
    m = R.resnet(KEY, 8, 0.125, 2, in_channels=1)
    cfg = T.TrainConfig(optimizer="momentum", lr=0.05, batch_size=16, epochs=6)
    out, hist = T.train(m, nets.apply_fn, X, Y, cfg, progress=False)
    assert np.all(np.diff(hist["loss"]) < 0), hist["loss"]
    assert isinstance(out, R.PreActResNet) and out.final_norm.use_running_average
    # eval mode is per-example: a batch of one gives the same outputs as the batch
    np.testing.assert_allclose(out(X[:1]), out(X)[:1], rtol=1e-12)


@pytest.mark.parametrize("kw, field", [
    (dict(depth=19), "`depth`"), (dict(depth=2), "`depth`"), (dict(depth="18"), "`depth`"),
    (dict(width=0.3), "`width`"), (dict(width=0), "`width`"), (dict(width=True), "`width`"),
    (dict(num_outputs=0), "`num_outputs`"), (dict(in_channels=0), "`in_channels`"),
    (dict(parameterization="mup"), "`parameterization`"), (dict(norm="layer"), "`norm`"),
    (dict(parameterization="ntk", norm="batch"), "`norm`"), (dict(W_std=0.0), "`W_std`"),
    (dict(b_std=-1.0), "`b_std`"),
])
def test_bad_inputs_name_the_argument(kw, field):
    import re
    with pytest.raises(ValueError, match=re.escape(field)):
        R.resnet(KEY, **kw)


def test_bad_key():
    with pytest.raises(ValueError, match="`key`"):
        R.resnet(np.zeros(3), 8, 0.125)
    assert nets.resnet is R.resnet and nets.PreActResNet is R.PreActResNet
