"""The training engine (ntk_poison.train) against independent oracles: numpy gradient
steps, hand-written optimiser updates, finite differences, a numpy crop/flip, and a
subprocess killed mid-run for resume."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_poison import train as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lin_apply(p, x):
    """A linear classifier on flattened inputs: (n, C) logits."""
    return x.reshape(x.shape[0], -1) @ p["W"] + p["b"]


def tanh_apply(p, x):
    """A smooth one-hidden-layer net, (n, C) logits (smooth: finite differences apply)."""
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["W1"] + p["b1"])
    return h @ p["W2"] + p["b2"]


def _lin_problem(rng, n=16, d=5, C=3):
    X = rng.normal(size=(n, d))
    Y = rng.integers(0, C, size=n)
    p = {"W": jnp.asarray(rng.normal(size=(d, C)) * 0.3), "b": jnp.asarray(rng.normal(size=C) * 0.1)}
    return X, Y, p


def _softmax_grad(W, b, X, Y):
    """numpy gradient of the mean softmax cross-entropy of a linear model."""
    Z = X @ W + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[np.arange(len(Y)), Y] -= 1
    return X.T @ P / len(Y), P.mean(0)


def _cfg(**kw):
    base = dict(optimizer="sgd", lr=0.3, batch_size=16, epochs=1, loss="xent")
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_sgd_step_is_the_numpy_gradient_step(rng, wd):
    X, Y, p = _lin_problem(rng)
    out, hist = T.train(p, lin_apply, X, Y, _cfg(weight_decay=wd), progress=False)
    W, b = np.asarray(p["W"]), np.asarray(p["b"])
    gW, gb = _softmax_grad(W, b, X, Y)
    np.testing.assert_allclose(out["W"], W - 0.3 * (gW + wd * W), rtol=0, atol=1e-13)
    np.testing.assert_allclose(out["b"], b - 0.3 * (gb + wd * b), rtol=0, atol=1e-13)
    assert hist["epoch"] == [1] and len(hist["loss"]) == len(hist["accuracy"]) == 1


def _hand_two_steps(kind, p, grad, lr=0.3, m=0.9):
    """Two full-batch steps of each optimiser, written out (no optax)."""
    tm = jax.tree_util.tree_map
    v = tm(jnp.zeros_like, p)
    s = tm(jnp.zeros_like, p)
    for t in (1, 2):
        g = grad(p)
        if kind == "momentum":
            v = tm(lambda v, g: m * v + g, v, g)
            p = tm(lambda p, v: p - lr * v, p, v)
        elif kind == "nesterov":
            v = tm(lambda v, g: m * v + g, v, g)
            p = tm(lambda p, v, g: p - lr * (g + m * v), p, v, g)
        elif kind == "adam":
            v = tm(lambda v, g: 0.9 * v + 0.1 * g, v, g)
            s = tm(lambda s, g: 0.999 * s + 0.001 * g ** 2, s, g)
            p = tm(lambda p, v, s: p - lr * (v / (1 - 0.9 ** t))
                   / (jnp.sqrt(s / (1 - 0.999 ** t)) + 1e-8), p, v, s)
        elif kind == "step":                        # lr x 0.1 from epoch 1 on
            p = tm(lambda p, g: p - (lr if t == 1 else 0.1 * lr) * g, p, g)
        else:                                       # cosine over 2 steps: lr, lr/2
            p = tm(lambda p, g: p - (lr if t == 1 else 0.5 * lr) * g, p, g)
    return p


@pytest.mark.parametrize("kind", ["momentum", "nesterov", "adam", "step", "cosine"])
def test_two_steps_match_hand_written_updates(rng, kind):
    X, Y, p = _lin_problem(rng)
    opt = kind if kind in ("momentum", "nesterov", "adam") else "sgd"
    sched = {"step": "step", "cosine": "cosine"}.get(kind, "constant")
    cfg = _cfg(optimizer=opt, schedule=sched, boundaries=(1,) if kind == "step" else (),
               epochs=2)
    out, _ = T.train(p, lin_apply, X, Y, cfg, progress=False)
    ref = _hand_two_steps(kind, p, jax.jit(jax.grad(lambda q: T.objective(q, lin_apply, X, Y,
                                                                           cfg))))
    for k in p:
        np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=1e-12)


def _tanh_problem(rng, n=5, d=4, h=6, C=3):
    X = rng.normal(size=(n, d))
    Y = rng.integers(0, C, size=n)
    p = {"W1": jnp.asarray(rng.normal(size=(d, h))), "b1": jnp.asarray(rng.normal(size=h) * .1),
         "W2": jnp.asarray(rng.normal(size=(h, C))), "b2": jnp.asarray(rng.normal(size=C) * .1)}
    return X, Y, p


@pytest.mark.parametrize("penalty", ["loss", "output"])
def test_penalty_value_and_gradient_against_finite_differences(rng, penalty):
    X, Y, p = _tanh_problem(rng)
    kappa = 0.7
    cfg = _cfg(penalty=penalty, kappa=kappa, batch_size=5)
    # the penalty's value: input gradients by central differences (independent of autodiff)
    eps = 1e-6

    P = {k: np.asarray(v) for k, v in p.items()}

    def per_ex(x, y):                              # numpy forward pass
        z = np.tanh(x @ P["W1"] + P["b1"]) @ P["W2"] + P["b2"]
        if penalty == "output":
            return z
        return np.log(np.sum(np.exp(z))) - z[y]

    pen = 0.0
    for x, y in zip(X, Y):
        J = np.stack([(per_ex(x + eps * e, y) - per_ex(x - eps * e, y)) / (2 * eps)
                      for e in np.eye(X.shape[1])])
        pen += np.sum(J ** 2) / len(X)
    obj = jax.jit(lambda q: T.objective(q, tanh_apply, X, Y, cfg))
    no_pen = jax.jit(lambda q: T.objective(q, tanh_apply, X, Y, _cfg(batch_size=5)))(p)
    np.testing.assert_allclose(obj(p) - no_pen, kappa * pen, rtol=1e-7)
    # the parameter gradient of the penalised objective (double backprop): directional FD
    g = jax.jit(jax.grad(obj))(p)
    dirn = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in p.items()}
    h = 1e-5
    shift = lambda s: {k: p[k] + s * dirn[k] for k in p}  # noqa: E731
    fd = (obj(shift(h)) - obj(shift(-h))) / (2 * h)
    ad = sum(jnp.vdot(g[k], dirn[k]) for k in p)
    np.testing.assert_allclose(ad, fd, rtol=1e-7)
    # and a training step with the penalty is that gradient's SGD step
    out, _ = T.train(p, tanh_apply, X, Y, cfg, progress=False)
    for k in p:
        np.testing.assert_allclose(out[k], p[k] - 0.3 * g[k], rtol=0, atol=1e-13)


def test_kappa_zero_is_the_plain_path_exactly(rng):
    X, Y, p = _tanh_problem(rng, n=12)
    cfg0 = _cfg(batch_size=4, epochs=2, optimizer="momentum")
    cfgk = _cfg(batch_size=4, epochs=2, optimizer="momentum", penalty="loss", kappa=0.0)
    assert not cfgk.penalised
    a, _ = T.train(p, tanh_apply, X, Y, cfg0, progress=False)
    b, _ = T.train(p, tanh_apply, X, Y, cfgk, progress=False)
    for k in p:
        assert np.array_equal(a[k], b[k])


def _np_augment(images, oy, ox, flips, pad):
    out = []
    for img, dy, dx, fl in zip(images, oy, ox, flips):
        P = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        c = P[dy:dy + img.shape[0], dx:dx + img.shape[1]]
        out.append(c[:, ::-1] if fl else c)
    return np.stack(out)


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_against_numpy(rng, flip):
    imgs = rng.normal(size=(64, 7, 6, 2))
    oy, ox, fl = (np.asarray(a) for a in T.augment_draws(jax.random.PRNGKey(3), 64, 2, flip))
    assert oy.min() >= 0 and oy.max() <= 4 and ox.min() >= 0 and ox.max() <= 4
    assert fl.any() == flip and (not flip or not fl.all())
    got = T.apply_augment(jnp.asarray(imgs), oy, ox, fl, 2)
    np.testing.assert_array_equal(got, _np_augment(imgs, oy, ox, fl, 2))


def test_training_step_uses_the_exposed_draws(rng):
    n = 8
    X = rng.normal(size=(n, 5, 5, 1))
    Y = rng.integers(0, 3, size=n)
    p = {"W": jnp.asarray(rng.normal(size=(25, 3)) * .3), "b": jnp.zeros(3)}
    cfg = _cfg(batch_size=n, augment="crop_flip", pad=1, seed=11)
    out, _ = T.train(p, lin_apply, X, Y, cfg, progress=False)
    perm = np.asarray(T.epoch_permutation(11, 0, n))
    oy, ox, fl = (np.asarray(a) for a in T.augment_draws(T.step_key(11, 0, 0), n, 1, True))
    Xa = _np_augment(X[perm], oy, ox, fl, 1).reshape(n, -1)
    gW, gb = _softmax_grad(np.asarray(p["W"]), np.asarray(p["b"]), Xa, Y[perm])
    np.testing.assert_allclose(out["W"], p["W"] - 0.3 * gW, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out["b"], p["b"] - 0.3 * gb, rtol=0, atol=1e-13)


SETUP = """
import numpy as np, jax
from ntk_poison import nets, train as T
r = np.random.default_rng(5)
X = r.normal(size=(24, 6, 6, 1)); Y = np.sign(r.normal(size=24))
p0 = nets.init(jax.random.PRNGKey(0), 36, 8, depth=1)
cfg = T.TrainConfig(optimizer="nesterov", lr=0.05, schedule="cosine", batch_size=8, epochs=4,
                    loss="mse", augment="crop_flip", pad=1, seed=2)
def norm(params, epoch):
    return {"norm": float(sum((v ** 2).sum() for v in jax.tree_util.tree_leaves(params)))}
"""


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def test_determinism_and_resume_after_a_kill(tmp_path):
    ns = {}
    exec(SETUP, ns)
    X, Y, p0, cfg = ns["X"], ns["Y"], ns["p0"], ns["cfg"]
    full, hist = T.train(p0, ns["nets"].apply_fn, X, Y, cfg, hooks=[ns["norm"]],
                         progress=False)
    again, _ = T.train(p0, ns["nets"].apply_fn, X, Y, cfg, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(full), _leaves(again)))
    ck = tmp_path / "ck"
    script = "import jax; jax.config.update('jax_enable_x64', True)\n" + SETUP + f"""
import os, signal
def kill(params, epoch):
    if epoch == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {{}}
T.train(p0, nets.apply_fn, X, Y, cfg, hooks=[norm, kill], checkpoint_dir={str(ck)!r})
"""
    env = dict(os.environ, NTK_POISON_NO_PROGRESS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    _, _, epoch, _, _ = T.load_checkpoint(ck, p0, T.make_optimizer(cfg, 3).init(p0))
    assert epoch == 2                      # killed in epoch 3's hook, before its checkpoint
    resumed, rhist = T.train(p0, ns["nets"].apply_fn, X, Y, cfg, hooks=[ns["norm"]],
                             checkpoint_dir=ck, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(full), _leaves(resumed)))
    assert rhist["epoch"] == [1, 2, 3, 4] and rhist == hist    # hook values kept too
    assert len(hist["norm"]) == 4 and hist["norm"][-1] == ns["norm"](full, 4)["norm"]
    other = T.TrainConfig(**{**cfg.__dict__, "lr": 0.06})
    with pytest.raises(ValueError, match="checkpoint_dir"):
        T.train(p0, ns["nets"].apply_fn, X, Y, other, checkpoint_dir=ck, progress=False)


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(rng, tmp_path):
    X = rng.normal(size=(16, 5))
    Y = rng.normal(size=(16, 3))
    p = {"W": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.zeros(3)}
    cfg = _cfg(loss="mse", lr=1e25, batch_size=4, epochs=50)
    with pytest.raises(ValueError, match=r"epoch (\d+), step (\d+)") as ei:
        T.train(p, lin_apply, X, Y, cfg, checkpoint_dir=tmp_path, progress=False)
    bad_epoch = int(re.search(r"epoch (\d+)", str(ei.value)).group(1))
    assert bad_epoch >= 2
    q, _, epoch, hist, _ = T.load_checkpoint(tmp_path, p, T.make_optimizer(cfg, 4).init(p))
    assert epoch == bad_epoch - 1 and len(hist["loss"]) == epoch
    assert all(np.isfinite(v).all() for v in _leaves(q))


@pytest.mark.parametrize("kw, field", [
    (dict(batch_size=17), "batch_size"), (dict(lr=0.0), "`lr`"), (dict(lr=-1.0), "`lr`"),
    (dict(lr=float("nan")), "`lr`"), (dict(optimizer="rmsprop"), "optimizer"),
    (dict(momentum=1.0), "momentum"), (dict(schedule="step", boundaries=(2, 1)), "boundaries"),
    (dict(loss="hinge"), "loss"), (dict(augment="crop"), "augment"),
    (dict(penalty="loss", kappa=-1.0), "kappa"), (dict(epochs=0), "epochs"),
])
def test_bad_inputs_name_the_field(rng, kw, field):
    X, Y, p = _lin_problem(rng)
    with pytest.raises(ValueError, match=re.escape(field)):
        T.train(p, lin_apply, X, Y, _cfg(**kw), progress=False)


def test_bad_data_names_the_argument(rng):
    X, Y, p = _lin_problem(rng)
    with pytest.raises(ValueError, match="`X` has examples of shape"):
        T.train(p, lin_apply, rng.normal(size=(16, 6)), Y, _cfg(), progress=False)
    with pytest.raises(ValueError, match="`Y` labels"):
        T.train(p, lin_apply, X, Y + 3, _cfg(), progress=False)
    with pytest.raises(ValueError, match="loss"):
        T.train(p, lambda q, x: lin_apply(q, x)[:, 0], X, Y, _cfg(), progress=False)
    with pytest.raises(ValueError, match="`Y` rows"):
        T.train(p, lin_apply, X, np.ones(16), _cfg(loss="mse"), progress=False)


def test_nnx_split_state_trains_like_the_module(rng):
    """The State half of nnx.split with a merging apply gives the module's parameters."""
    from flax import nnx
    from ntk_poison import nets
    X = rng.normal(size=(12, 4))
    Y = np.sign(rng.normal(size=12))
    model = nets.init(jax.random.PRNGKey(1), 4, 6, depth=1)
    gdef, state = nnx.split(model)
    cfg = _cfg(loss="mse", batch_size=4, epochs=2, optimizer="adam", lr=0.01)
    a, ha = T.train(model, nets.apply_fn, X, Y, cfg, progress=True)
    b, hb = T.train(state, lambda s, x: nnx.merge(gdef, s)(x), X, Y, cfg, progress=False)
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) == 4
    assert all(np.array_equal(u, v) for u, v in zip(la, lb))
    assert ha == hb


def test_config_is_frozen_hashable_and_kappa_zero_traces_no_input_gradient(rng):
    a, b = _cfg(), _cfg()
    assert hash(a) == hash(b) and a.digest() == b.digest() != _cfg(lr=0.2).digest()
    with pytest.raises(Exception):
        a.lr = 1.0
    X, Y, p = _tanh_problem(rng)
    jaxpr = lambda c: str(jax.make_jaxpr(lambda q: T.objective(q, tanh_apply, X, Y, c))(p))  # noqa: E731
    assert jaxpr(_cfg(penalty="loss", kappa=0.0)) == jaxpr(_cfg())
    assert len(jaxpr(_cfg(penalty="loss", kappa=1.0))) > len(jaxpr(_cfg()))


# --------------------------------------------------------------------------- model state (BatchNorm)

def _call(model, x):
    return model(x)


class TinyBN(nnx.Module):
    """Linear(d, h) -> BatchNorm(h) -> tanh -> Linear(h, C): smooth, with state."""

    def __init__(self, seed=0, d=3, h=4, C=3):
        r = nnx.Rngs(seed)
        self.l1 = nnx.Linear(d, h, rngs=r, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(h, momentum=0.9, epsilon=1e-5, use_running_average=True,
                                param_dtype=jnp.float64, rngs=r)
        self.bn.mean = nnx.BatchStat(jnp.linspace(-0.3, 0.2, h))      # not the defaults,
        self.bn.var = nnx.BatchStat(jnp.full((h,), 1.3, jnp.float64))  # so updates show
        self.bn.scale = nnx.Param(jnp.linspace(0.5, 1.5, h))
        self.bn.bias = nnx.Param(jnp.linspace(-0.2, 0.3, h))
        self.l2 = nnx.Linear(h, C, rngs=r, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x.reshape(x.shape[0], -1)))))


_tiny_bn = TinyBN


def _np_tiny(P, X, mean=None, var=None):
    """numpy forward of TinyBN: batch statistics when mean is None; also (mu, var_b)."""
    z = X.reshape(len(X), -1) @ P["l1.kernel"] + P["l1.bias"]
    mu, vb = z.mean(0), z.var(0)
    m, v = (mu, vb) if mean is None else (mean, var)
    a = np.tanh((z - m) / np.sqrt(v + 1e-5) * P["bn.scale"] + P["bn.bias"])
    return a @ P["l2.kernel"] + P["l2.bias"], mu, vb


def _flat_params(model):
    st = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in st}


def _np_xent(Z, Y):
    Z = Z - Z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(Z).sum(1)) - Z[np.arange(len(Y)), Y])


def test_batchnorm_step_and_running_averages_against_numpy(rng):
    """One SGD step with weight decay: parameters by numpy finite differences of the
    batch-statistics objective, running averages by the numpy BN update (no decay),
    and the returned model evaluates with the running averages."""
    X, Y = rng.normal(size=(8, 3)), rng.integers(0, 3, size=8)
    model = _tiny_bn()
    P = _flat_params(model)
    lr, wd = 0.3, 0.05
    out, _ = T.train(model, _call, X, Y, _cfg(batch_size=8, weight_decay=wd),
                     progress=False)
    Xp, Yp = X[np.asarray(T.epoch_permutation(0, 0, 8))], Y[np.asarray(T.epoch_permutation(0, 0, 8))]
    Q = _flat_params(out)
    eps = 1e-6
    for k, v in P.items():
        grad = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            Pp = {**P, k: v.copy()}
            Pm = {**P, k: v.copy()}
            Pp[k][i] += eps
            Pm[k][i] -= eps
            grad[i] = (_np_xent(_np_tiny(Pp, Xp)[0], Yp) - _np_xent(_np_tiny(Pm, Xp)[0], Yp)) / (2 * eps)
        np.testing.assert_allclose(Q[k], v - lr * (grad + wd * v), rtol=0, atol=1e-8)
    _, mu, vb = _np_tiny(P, Xp)
    rm = 0.9 * np.asarray(model.bn.mean[...]) + 0.1 * mu
    rv = 0.9 * np.asarray(model.bn.var[...]) + 0.1 * vb
    np.testing.assert_allclose(out.bn.mean[...], rm, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.bn.var[...], rv, rtol=0, atol=1e-12)
    assert out.bn.use_running_average and model.bn.use_running_average
    np.testing.assert_allclose(out(X[:3]), _np_tiny(Q, X[:3], rm, rv)[0], rtol=0, atol=1e-12)
    # the input model is untouched
    assert all(np.array_equal(P[k], v) for k, v in _flat_params(model).items())


@pytest.mark.parametrize("penalty", ["loss", "output"])
def test_batchnorm_penalty_is_the_summed_loss_input_gradient(rng, penalty):
    """With BatchNorm the penalty is mean_i ||d/dx_i sum_j P_j(X)||^2: checked by
    numpy central differences of the batch-statistics forward pass in X."""
    X, Y = rng.normal(size=(5, 3)), rng.integers(0, 3, size=5)
    model = _tiny_bn(seed=1)
    P = _flat_params(model)
    cfg = _cfg(penalty=penalty, kappa=0.7, batch_size=5)

    def summed(Xb):                                 # numpy: sum_j P_j (per class for output)
        Z = _np_tiny(P, Xb)[0]
        if penalty == "output":
            return Z.sum(0)
        Zs = Z - Z.max(1, keepdims=True)
        return np.array([np.sum(np.log(np.exp(Zs).sum(1)) - Zs[np.arange(5), Y])])

    eps = 1e-6
    G = np.zeros((len(summed(X)),) + X.shape)
    for i in np.ndindex(X.shape):
        E = np.zeros_like(X)
        E[i] = eps
        G[(slice(None),) + i] = (summed(X + E) - summed(X - E)) / (2 * eps)
    pen = np.mean(np.sum(G ** 2, axis=(0, 2)))
    data = _np_xent(_np_tiny(P, X)[0], Y)
    np.testing.assert_allclose(jax.jit(lambda m: T.objective(m, _call, X, Y, cfg))(model),
                               data + 0.7 * pen, rtol=1e-7)


@pytest.mark.parametrize("penalty", ["loss", "output"])
def test_batch_penalty_equals_the_per_example_penalty_without_coupling(rng, penalty):
    """A stateful model whose examples do not interact (a BatchStat it never reads)
    takes the batch-gradient path; its objective equals the per-example one."""
    X, Y, p = _tanh_problem(rng)

    class Stateful(nnx.Module):
        def __init__(self):
            self.w = nnx.Dict({k: nnx.Param(v) for k, v in p.items()})
            self.unused = nnx.BatchStat(jnp.zeros(2))

        def __call__(self, x):
            return tanh_apply({k: v[...] for k, v in self.w.items()}, x)

    cfg = _cfg(penalty=penalty, kappa=0.7, batch_size=5)
    a = jax.jit(lambda m: T.objective(m, _call, X, Y, cfg))(Stateful())
    b = jax.jit(lambda q: T.objective(q, tanh_apply, X, Y, cfg))(p)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_batchnorm_determinism_and_exact_resume(rng, tmp_path):
    """Same seed: identical parameters and state; a run interrupted after epoch 2
    resumes from its checkpoint (parameters, optimiser and BatchNorm state) exactly."""
    X, Y = rng.normal(size=(12, 3)), rng.integers(0, 3, size=12)
    cfg = _cfg(batch_size=4, epochs=4, optimizer="momentum", lr=0.1, penalty="loss",
               kappa=0.1, weight_decay=0.01)
    apply = _call
    full, hist = T.train(_tiny_bn(), apply, X, Y, cfg, progress=False)
    again, _ = T.train(_tiny_bn(), apply, X, Y, cfg, progress=False)
    la, lb = _leaves(nnx.state(full)), _leaves(nnx.state(again))
    assert len(la) == 8 and all(np.array_equal(a, b) for a, b in zip(la, lb))
    assert not np.array_equal(full.bn.mean[...], _tiny_bn().bn.mean[...])

    class Stop(Exception):
        pass

    def stop(model, epoch):
        if epoch == 3:
            raise Stop
        return {}

    ck = tmp_path / "bn"
    with pytest.raises(Stop):
        T.train(_tiny_bn(), apply, X, Y, cfg, hooks=[stop], checkpoint_dir=ck, progress=False)
    m0 = _tiny_bn()
    opt0 = T.make_optimizer(cfg, 3).init(nnx.state(m0, nnx.Param))
    mid, _, epoch, _, _ = T.load_checkpoint(ck, m0, opt0)
    assert epoch == 2 and mid.bn.use_running_average
    assert not np.array_equal(mid.bn.var[...], m0.bn.var[...])     # the state is stored
    resumed, rhist = T.train(_tiny_bn(), apply, X, Y, cfg, checkpoint_dir=ck, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(la, _leaves(nnx.state(resumed))))
    assert rhist == hist


def test_unrolled_epoch_equals_the_scanned_one(rng):
    """``unroll`` changes how XLA runs the epoch, not the maths: 4 steps an epoch, 2 epochs
    of momentum SGD with the penalty, scanned (1) and fully unrolled (True)."""
    X, Y, p = _lin_problem(rng)
    cfg = _cfg(optimizer="momentum", batch_size=4, epochs=2, penalty="loss", kappa=0.3)
    outs = [T.train(p, lin_apply, X, Y, cfg, progress=False,
                    unroll=u)[0] for u in (1, True)]
    for o in outs[1:]:
        for k in p:
            np.testing.assert_allclose(o[k], outs[0][k], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "auto", False])
def test_bad_unroll_raises(rng, bad):
    X, Y, p = _lin_problem(rng)
    with pytest.raises(ValueError, match="unroll"):
        T.train(p, lin_apply, X, Y, _cfg(), progress=False, unroll=bad)


def test_evaluations_within_an_epoch_change_no_step(rng):
    """3 evaluations an epoch cut each epoch's 4 steps into chunks 0-1, 1-3, 3-4
    (rounded thirds): the final parameters equal one scan an epoch, the hooks see the
    model at fractional epochs, and at whole epochs the history equals the plain run."""
    X, Y, p = _lin_problem(rng)
    cfg = _cfg(optimizer="momentum", batch_size=4, epochs=2, schedule="cosine")
    seen = []

    def hook(q, epoch):
        seen.append(epoch)
        return {"w00": float(q["W"][0, 0])}

    a, ha = T.train(p, lin_apply, X, Y, cfg, progress=False, hooks=[hook])
    b, hb = T.train(p, lin_apply, X, Y, cfg, progress=False, hooks=[hook], evals_per_epoch=3)
    for k in p:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=1e-13)
    want = [0.25, 0.75, 1.0, 1.25, 1.75, 2.0]
    assert seen == [1, 2] + want and hb["epoch"] == want
    np.testing.assert_allclose([hb["w00"][2], hb["w00"][5]], ha["w00"], rtol=1e-12)
    # the chunks' mean losses, weighted by their steps, give the epoch's mean loss
    np.testing.assert_allclose(np.dot(hb["loss"][:3], [1, 2, 1]) / 4, ha["loss"][0],
                               rtol=1e-12)


@pytest.mark.parametrize("bad", [0, 5, 1.5])
def test_bad_evals_per_epoch_raises(rng, bad):
    X, Y, p = _lin_problem(rng)
    with pytest.raises(ValueError, match="evals_per_epoch"):
        T.train(p, lin_apply, X, Y, _cfg(batch_size=4), progress=False, evals_per_epoch=bad)


# --------------------------------------------------------------------------- data filters

def _lin_x(p, x):
    return x @ p["W"] + p["b"]


def test_data_filter_keeping_everything_is_bit_identical(rng):
    X, Y, p = _lin_problem(rng)
    cfg = _cfg(batch_size=4, epochs=2, lr=0.3)
    base, hist = T.train(p, _lin_x, X, Y, cfg, progress=False)
    calls = []

    def keep_all(params, epoch, keep):
        calls.append(epoch)
        return keep

    out, fhist = T.train(p, _lin_x, X, Y, cfg, progress=False, data_filter=keep_all)
    assert calls == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(base), _leaves(out)))
    assert fhist.pop("n_kept") == [16, 16] and fhist == hist


def test_data_filter_trains_later_epochs_on_the_kept_rows_in_permutation_order(rng):
    """A filter keeping 10 of 16 rows after epoch 1: epoch 2 takes the kept rows in the
    order of its permutation, 10 // 4 = 2 steps of 4, here replayed as hand-written SGD
    steps with the numpy softmax gradient from the epoch-1 parameters."""
    X, Y, p = _lin_problem(rng)
    mask = np.zeros(16, bool)
    mask[rng.choice(16, size=10, replace=False)] = True
    cfg = _cfg(batch_size=4, epochs=2, lr=0.3)
    seen = {}

    def after_epoch(params, epoch):              # hooks run before the filter
        seen[epoch] = params
        return {}

    out, hist = T.train(p, _lin_x, X, Y, cfg, progress=False, hooks=[after_epoch],
                        data_filter=lambda params, e, keep: keep & mask)
    assert hist["n_kept"] == [10, 10]
    W, b = np.asarray(seen[1]["W"]), np.asarray(seen[1]["b"])
    perm = np.asarray(T.epoch_permutation(cfg.seed, 1, 16))
    order = [i for i in perm if mask[i]]
    for s in range(2):
        idx = order[4 * s:4 * s + 4]
        gW, gb = _softmax_grad(W, b, X[idx], Y[idx])
        W, b = W - 0.3 * gW, b - 0.3 * gb
    np.testing.assert_allclose(out["W"], W, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out["b"], b, rtol=0, atol=1e-13)


def test_data_filter_checkpoint_resume_is_exact(rng, tmp_path):
    """Drops after epochs 1 and 3 (a pure function of the epoch and the mask); a run
    stopped in epoch 3's hook resumes from epoch 2's checkpoint, mask included, and ends
    equal to the straight 4-epoch run."""
    X, Y, p = _lin_problem(rng, n=24)
    cfg = _cfg(batch_size=4, epochs=4, optimizer="momentum", lr=0.1)

    def filt(params, epoch, keep):
        keep = keep.copy()
        if epoch in (1, 3):
            keep[np.flatnonzero(keep)[:3]] = False
        return keep

    full, hist = T.train(p, _lin_x, X, Y, cfg, progress=False, data_filter=filt)
    assert hist["n_kept"] == [21, 21, 18, 18]

    class Stop(Exception):
        pass

    def stop(params, epoch):
        if epoch == 3:
            raise Stop
        return {}

    ck = tmp_path / "filt"
    with pytest.raises(Stop):
        T.train(p, _lin_x, X, Y, cfg, hooks=[stop], checkpoint_dir=ck, progress=False,
                data_filter=filt)
    resumed, rhist = T.train(p, _lin_x, X, Y, cfg, checkpoint_dir=ck, progress=False,
                             data_filter=filt)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(full), _leaves(resumed)))
    assert rhist == hist


@pytest.mark.parametrize("bad, match", [
    (lambda params, e, keep: keep.astype(int), "data_filter"),
    (lambda params, e, keep: keep[:-1], "data_filter"),
    (lambda params, e, keep: np.zeros_like(keep), "batch_size")])
def test_bad_data_filter_output_raises(rng, bad, match):
    X, Y, p = _lin_problem(rng)
    with pytest.raises(ValueError, match=match):
        T.train(p, _lin_x, X, Y, _cfg(batch_size=4, epochs=2), progress=False,
                data_filter=bad)
