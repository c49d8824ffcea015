"""Tests for ntk_poison.certify.agt (Abstract Gradient Training).

Oracles: corner enumeration (softmax, elementwise products), sampled points of the
boxes, a plain optax/jax training loop written here (zero-width intervals must
reproduce it), and attacks on that plain loop (random and greedy label flips,
multi-start PGD on features and regression labels) whose trained parameters and
outputs must land inside the certified boxes.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ntk_poison import x64_scope as enable_x64   # float64 for the theory checks

from ntk_poison.certify import agt

TOL = 1e-10   # float64: the interval arithmetic rounds to nearest, not outward


# --------------------------------------------------------------------------- oracles

@functools.partial(jax.jit, static_argnames=("lr", "n_steps", "loss", "batch_size", "l2",
                                             "clip", "clip_method"))
def plain_train(params, X, y, *, lr, n_steps, loss, batch_size=None, l2=0.0,
                clip=math.inf, clip_method="clamp"):
    """Plain (sub)gradient descent with optax.sgd: per-sample gradients, optional
    per-sample clipping, batch mean, plus l2 * theta; batches in order."""
    n = X.shape[0]
    B = n if batch_size is None else batch_size

    def per_sample(p, x, t):
        out = agt.apply(p, x[None])[0]
        if loss == "xent":
            return optax.softmax_cross_entropy_with_integer_labels(out, t)
        return jnp.sum((out - t) ** 2)

    opt = optax.sgd(lr)
    state = opt.init(params)
    for s in range(n_steps):
        i = (s % (n // B)) * B
        g = jax.vmap(jax.grad(per_sample), in_axes=(None, 0, 0))(params, X[i:i + B], y[i:i + B])
        if math.isfinite(clip):
            if clip_method == "clamp":
                g = jax.tree.map(lambda a: jnp.clip(a, -clip, clip), g)
            else:
                nrm = jnp.sqrt(sum(jnp.sum(a.reshape(B, -1) ** 2, 1) for a in jax.tree.leaves(g)))
                c = jnp.minimum(1.0, clip / nrm)
                g = jax.tree.map(lambda a: a * c.reshape((-1,) + (1,) * (a.ndim - 1)), g)
        g = jax.tree.map(lambda a, p: a.mean(0) + l2 * p, g, params)
        upd, state = opt.update(g, state)
        params = optax.apply_updates(params, upd)
    return params


def _assert_inside(box, p, Xt, f_l, f_u):
    """The attacked parameters ``p`` lie in the box, and their outputs at ``Xt`` in the
    box's output bounds ``[f_l, f_u]``."""
    assert inside(box, p)
    out = agt.apply(p, Xt)
    assert np.all(out >= f_l - TOL) and np.all(out <= f_u + TOL)


def inside(box, params, tol=TOL):
    """lower <= params <= upper up to tol (params may carry leading attack axes)."""
    viol = [max(np.max(np.asarray(lo) - np.asarray(p)), np.max(np.asarray(p) - np.asarray(up)))
            for lo, p, up in zip(jax.tree.leaves(box.lower), jax.tree.leaves(params),
                                 jax.tree.leaves(box.upper))]
    return max(viol) <= tol


def mlp(rng, sizes):
    """He-initialised (W, b) pairs from numpy (cheaper than eager jax.random)."""
    return [(jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a)),
             jnp.asarray(0.1 * rng.normal(size=b))) for a, b in zip(sizes[:-1], sizes[1:])]


def problem(seed=0, n=24, d=4, h=6, c=3):
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.normal(size=(n, d)))
    y = jnp.asarray(rng.integers(0, c, n))
    Xt = jnp.asarray(rng.normal(size=(10, d)))
    params = mlp(rng, (d, h, c))
    return X, y, Xt, params


# --------------------------------------------------------------------------- intervals

def test_interval_matmul_contains_sampled_products_and_is_exact_at_zero_width():
    with enable_x64():
        rng = np.random.default_rng(1)
        A_m, B_m = rng.normal(size=(4, 5)), rng.normal(size=(5, 3))
        A_r, B_r = rng.uniform(0, .5, (4, 5)), rng.uniform(0, .5, (5, 3))
        lo, hi = agt.interval_matmul(A_m - A_r, A_m + A_r, B_m - B_r, B_m + B_r)
        for _ in range(200):
            A = A_m + A_r * rng.uniform(-1, 1, A_m.shape)
            B = B_m + B_r * rng.uniform(-1, 1, B_m.shape)
            C = A @ B
            assert np.all(C >= lo - TOL) and np.all(C <= hi + TOL)
        # a point matrix times an interval matrix is exact: the bound is attained
        a = rng.normal(size=(1, 5))
        lo1, hi1 = agt.interval_matmul(a, a, B_m - B_r, B_m + B_r)
        np.testing.assert_allclose(lo1[0], [sum(min(a[0, i] * (B_m[i, j] - B_r[i, j]),
                                                     a[0, i] * (B_m[i, j] + B_r[i, j]))
                                                 for i in range(5)) for j in range(3)],
                                   rtol=1e-12)
        l0, h0 = agt.interval_matmul(A_m, A_m, B_m, B_m)
        np.testing.assert_allclose(l0, A_m @ B_m, rtol=1e-13)
        np.testing.assert_array_equal(l0, h0)


def test_interval_mul_and_softmax_match_corner_enumeration():
    with enable_x64():
        rng = np.random.default_rng(2)
        a_l, b_l = rng.normal(size=7), rng.normal(size=7)
        a_u, b_u = a_l + rng.uniform(0, 2, 7), b_l + rng.uniform(0, 2, 7)
        lo, hi = agt.interval_mul(a_l, a_u, b_l, b_u)
        corners = np.stack([a_l * b_l, a_l * b_u, a_u * b_l, a_u * b_u])
        np.testing.assert_allclose(lo, corners.min(0), rtol=1e-14)
        np.testing.assert_allclose(hi, corners.max(0), rtol=1e-14)
        # softmax_j is monotone in every coordinate: its extremes over a box are at corners
        z_l = rng.normal(size=4)
        z_u = z_l + rng.uniform(0, 1.5, 4)
        p_l, p_u = agt.interval_softmax(z_l, z_u)
        allc = np.array([jax.nn.softmax(np.where(m, z_u, z_l))
                         for m in itertools.product([0, 1], repeat=4)])
        np.testing.assert_allclose(p_l, allc.min(0), rtol=1e-12)
        np.testing.assert_allclose(p_u, allc.max(0), rtol=1e-12)


# (80, 3): k rounds of max extraction; (80, 70): top_k above 64; (1000, k): the block
# filter (1000 rows = 15 full blocks of 64 and 40 rows left over)
@pytest.mark.parametrize("B,k", [(80, 3), (80, 70), (1000, 3), (1000, 10)])
def test_sum_of_k_extremes_matches_sorting(B, k):
    d = np.random.default_rng(13).normal(size=(B, 2, 3))
    d[:5, 0, 0] = d[5, 0, 0]           # ties count with their multiplicity
    d[70:78, 1, 1] += 10.0             # the top k of one entry crowded into one block
    d[B - 3:, 1, 2] -= 10.0            # the bottom k of another in the rows left over
    s = np.sort(d, axis=0)
    np.testing.assert_allclose(agt._sum_extreme(jnp.asarray(d), k, True), s[-k:].sum(0),
                               rtol=1e-12)
    np.testing.assert_allclose(agt._sum_extreme(jnp.asarray(d), k, False), s[:k].sum(0),
                               rtol=1e-12)


@pytest.mark.parametrize("target", [None, 2])
def test_xent_grad_bounds_cover_every_allowed_label(target):
    with enable_x64():
        rng = np.random.default_rng(3)
        z_l = rng.normal(size=4)
        z_u = z_l + rng.uniform(0, 1, 4)
        y = 1
        g_l, g_u = agt.xent_grad_bounds(z_l, z_u, y, label_free=True, target=target)
        labels = jnp.array(range(4) if target is None else (y, target))
        zs = z_l + (z_u - z_l) * rng.uniform(size=(300, 4))
        grad = jax.grad(lambda v, t: -jax.nn.log_softmax(v)[t])
        g = jax.jit(jax.vmap(jax.vmap(grad, in_axes=(None, 0)), in_axes=(0, None)))(zs, labels)
        assert np.all(g >= g_l - TOL) and np.all(g <= g_u + TOL)
        hit_l, hit_u = g.min((0, 1)), g.max((0, 1))
        # not vacuous: the sampled range reaches most of the bound
        assert np.all(hit_u - hit_l > 0.5 * (g_u - g_l) - 0.2)
        # the clean label alone gives a sub-interval
        c_l, c_u = agt.xent_grad_bounds(z_l, z_u, y)
        assert np.all(c_l >= g_l) and np.all(c_u <= g_u)


# --------------------------------------------------------------------------- zero width

@pytest.mark.parametrize("loss,clip_method", [
    ("xent", "clamp"), pytest.param("mse", "norm", marks=pytest.mark.slow)])
def test_zero_width_reproduces_plain_training(loss, clip_method):
    with enable_x64():
        X, y, Xt, params = problem()
        if loss == "mse":
            params = mlp(np.random.default_rng(5), (4, 6, 2))
            y = jnp.asarray(np.random.default_rng(4).normal(size=(24, 2)))
        cfg = agt.AGTConfig(0.3, 4, batch_size=12, loss=loss, l2_reg=0.01,
                            clip_gamma=0.5, clip_method=clip_method)
        box = agt.train(params, X, y, cfg)
        ref = plain_train(params, X, y, lr=0.3, n_steps=4, loss=loss, batch_size=12,
                          l2=0.01, clip=0.5, clip_method=clip_method)
        for a, b, c, r in zip(*(jax.tree.leaves(t) for t in (*box, ref))):
            np.testing.assert_allclose(b, r, rtol=1e-12, atol=1e-14)   # nominal
            np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)   # lower
            np.testing.assert_allclose(c, r, rtol=1e-12, atol=1e-14)   # upper
        # per-sample gradients: the interval backward pass at zero width is jax.grad
        g_l, g_u = agt.gradient_bounds(params, params, X, y, cfg)
        g = jax.jit(jax.vmap(jax.grad(lambda p, x, t: agt.loss_per_sample(
            agt.apply(p, x[None])[0], t, loss)), in_axes=(None, 0, 0)))(params, X, y)
        for a, b, c in zip(*(jax.tree.leaves(t) for t in (g_l, g, g_u))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(c, b, rtol=1e-12, atol=1e-14)
        if loss == "xent":
            return   # the one-step check below compiles agt_step again: slow variant only
        # one step from the box at zero width: theta - lr (mean_i clip(g_i) + l2 theta)
        one = agt.agt_step(agt.ParamBox(params, params, params), X[:12], y[:12], cfg)
        g12 = jax.tree.map(lambda a: a[:12], g)
        if clip_method == "clamp":
            g12 = jax.tree.map(lambda a: jnp.clip(a, -0.5, 0.5), g12)
        else:
            nrm = jnp.sqrt(sum(jnp.sum(a.reshape(12, -1) ** 2, 1) for a in jax.tree.leaves(g12)))
            g12 = jax.tree.map(lambda a: a * jnp.minimum(1, 0.5 / nrm).reshape(
                (-1,) + (1,) * (a.ndim - 1)), g12)
        for lo, up, gi, p in zip(*(jax.tree.leaves(t) for t in (one.lower, one.upper, g12,
                                                                 params))):
            r = p - 0.3 * (gi.mean(0) + 0.01 * p)
            np.testing.assert_allclose(lo, r, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(up, r, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- soundness

@pytest.mark.parametrize("greedy", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_label_flips_random_and_greedy_land_inside_the_box(greedy):
    with enable_x64():
        X, y, Xt, params = problem(6)
        if not greedy:   # the fast variant: a logistic (one-layer) model, cheaper to compile
            params = mlp(np.random.default_rng(6), (4, 3))
        k, lr, T = 2, 0.5, 3
        cfg = agt.AGTConfig(lr, T, label_k_poison=k)
        box = agt.train(params, X, y, cfg)
        f_l, f_n, f_u = agt.output_bounds(box, Xt)
        train_y = jax.jit(jax.vmap(lambda yy: plain_train(params, X, yy, lr=lr, n_steps=T,
                                                          loss="xent")))
        rng = np.random.default_rng(7)
        ys = []
        for _ in range(16):   # random flips at k points
            yy = np.array(y)
            idx = rng.choice(len(yy), k, replace=False)
            yy[idx] = (yy[idx] + rng.integers(1, 3, k)) % 3
            ys.append(yy)
        # greedy: flip one label at a time to minimise the nominal margin of test point 0
        yy = np.array(y)
        for _ in range(k if greedy else 0):
            cands = []
            for i in range(len(yy)):
                for c in range(3):
                    if c != yy[i]:
                        z = yy.copy()
                        z[i] = c
                        cands.append(z)
            cands = np.array(cands)
            out = jax.vmap(lambda p: agt.apply(p, Xt[:1])[0])(train_y(jnp.asarray(cands)))
            c0 = int(jnp.argmax(f_n[0]))
            margin = out[:, c0] - jnp.max(jnp.where(jnp.arange(3) == c0, -jnp.inf, out), 1)
            yy = cands[int(jnp.argmin(margin))]
        if greedy:
            ys = [yy]
        attacked = train_y(jnp.asarray(np.array(ys)))
        assert inside(box, attacked)   # every attack (leading axis) inside the box
        out = jax.vmap(agt.apply, in_axes=(0, None))(attacked, Xt)
        assert np.all(out >= f_l - TOL) and np.all(out <= f_u + TOL)
        lo, nom, hi = agt.certified_accuracy(box, Xt, jnp.argmax(f_n, 1))
        assert lo <= nom == 1.0 and hi == 1.0


def _pgd_features(params, X, y, idx, eps, lr, T, objective, starts, steps, seed):
    """Multi-start PGD (sign steps, projected onto the l_inf ball) on the features of
    points ``idx``, maximising ``objective(trained params)`` through plain training."""
    def attacked(delta):
        return plain_train(params, X.at[idx].add(delta), y, lr=lr, n_steps=T, loss="xent")
    val_grad = jax.jit(jax.value_and_grad(lambda d: objective(attacked(d))))
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(starts):
        d = jnp.asarray(rng.uniform(-eps, eps, (len(idx), X.shape[1])))
        for _ in range(steps):
            _, g = val_grad(d)
            d = jnp.clip(d + 0.5 * eps * jnp.sign(g), -eps, eps)
        found.append(attacked(d))
    return found


@pytest.mark.slow
def test_pgd_feature_and_paired_poisoning_land_inside_the_box():
    with enable_x64():
        X, y, Xt, params = problem(8)
        k, eps, lr, T = 2, 0.1, 0.5, 3
        idx = jnp.array([0, 5])
        for paired in (False, True):
            cfg = agt.AGTConfig(lr, T, k_poison=k, epsilon=eps,
                                label_k_poison=k if paired else 0, paired=paired)
            box = agt.train(params, X, y, cfg)
            f_l, _, f_u = agt.output_bounds(box, Xt)
            for leaf in range(4):   # push each parameter leaf's sum up and down
                for sgn in (1.0, -1.0):
                    obj = lambda p: sgn * jnp.sum(jax.tree.leaves(p)[leaf])
                    for p in _pgd_features(params, X, y, idx, eps, lr, T, obj, 2, 5, leaf):
                        _assert_inside(box, p, Xt, f_l, f_u)


@pytest.mark.slow
def test_pgd_features_inside_box_and_box_grows_with_k():
    with enable_x64():
        X, y, Xt, params = problem(9)
        eps, lr, T = 0.1, 0.5, 2
        box1 = agt.train(params, X, y, agt.AGTConfig(lr, T, k_poison=1, epsilon=eps))
        box2 = agt.train(params, X, y, agt.AGTConfig(lr, T, k_poison=2, epsilon=eps))
        for a, b in zip(jax.tree.leaves(box2.lower), jax.tree.leaves(box1.lower)):
            assert np.all(a <= b + TOL)
        for a, b in zip(jax.tree.leaves(box2.upper), jax.tree.leaves(box1.upper)):
            assert np.all(a >= b - TOL)
        f_l, _, f_u = agt.output_bounds(box1, Xt)
        obj = lambda p: agt.apply(p, Xt[:1])[0, 0]
        for p in _pgd_features(params, X, y, jnp.array([3]), eps, lr, T, obj, 2, 4, 0):
            _assert_inside(box1, p, Xt, f_l, f_u)


@pytest.mark.slow
def test_regression_label_epsilon_attacks_inside_box_and_mse_bounds():
    with enable_x64():
        X, _, Xt, _ = problem(10)
        rng = np.random.default_rng(11)
        y = jnp.asarray(rng.normal(size=24))
        yt = jnp.asarray(rng.normal(size=10))
        params = mlp(rng, (4, 6, 1))
        k, le, lr, T = 3, 0.2, 0.05, 3
        box = agt.train(params, X, y, agt.AGTConfig(lr, T, loss="mse", label_k_poison=k,
                                                    label_epsilon=le))
        worst, nom, best = agt.certified_mse(box, Xt, yt)
        assert best <= nom <= worst
        # extreme label attacks (+-le at k points: the objective is linear in y, so the
        # extremes of any linear functional of one step are vertices) and random ones
        ys = []
        for _ in range(12):
            yy = np.array(y)
            idx = rng.choice(24, k, replace=False)
            yy[idx] += le * rng.choice([-1.0, 1.0], k)
            ys.append(yy)
        ys = jnp.asarray(np.array(ys))[:, :, None]
        tr = jax.jit(jax.vmap(lambda yy: plain_train(params, X, yy, lr=lr, n_steps=T,
                                                     loss="mse")))(ys)
        for j in range(ys.shape[0]):
            p = jax.tree.map(lambda a: a[j], tr)
            assert inside(box, p)
            mse = float(jnp.mean((agt.apply(p, Xt)[:, 0] - yt) ** 2))
            assert best - TOL <= mse <= worst + TOL


@pytest.mark.slow
def test_mnist_example_label_flips_inside_the_box():
    """The reference notebook's setting (PCA-32 MNIST, linear 32 -> 10, full batch, lr 5,
    2 steps, label_k_poison = 10) on 12000 training images: random flips and flips
    of the 10 largest-norm points to one class all train inside the box, and the
    attacked models' test accuracy lies within the certified (lower, upper)."""
    from sklearn.decomposition import PCA
    from ntk_poison import data
    Xtr, ytr, Xte, yte = data.load("mnist", dtype=np.float64)
    Xtr, ytr = Xtr.reshape(len(Xtr), -1)[:12000], np.asarray(ytr[:12000])
    pca = PCA(n_components=32, random_state=0).fit(Xtr)
    X = jnp.asarray(pca.transform(Xtr))
    Xt = jnp.asarray(pca.transform(Xte[:2000].reshape(2000, -1)))
    yt = np.asarray(yte[:2000])
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(32)
    params = [(jnp.asarray(rng.uniform(-s, s, (32, 10))), jnp.asarray(rng.uniform(-s, s, 10)))]
    k = 10
    box = agt.train(params, X, jnp.asarray(ytr), agt.AGTConfig(5.0, 2, label_k_poison=k))
    lo, nom, hi = agt.certified_accuracy(box, Xt, yt)
    assert lo < nom < hi
    ys = []
    for _ in range(6):
        yy = ytr.copy()
        idx = rng.choice(len(yy), k, replace=False)
        yy[idx] = (yy[idx] + rng.integers(1, 10, k)) % 10
        ys.append(yy)
    big = np.argsort(-np.linalg.norm(np.asarray(X), axis=1))[:k]
    for c in (0, 7):
        yy = ytr.copy()
        yy[big] = c
        ys.append(yy)
    tr = jax.jit(jax.vmap(lambda yy: plain_train(params, X, yy, lr=5.0, n_steps=2,
                                                 loss="xent")))(jnp.asarray(np.array(ys)))
    assert inside(box, tr)
    accs = np.mean(np.argmax(np.asarray(jax.vmap(agt.apply, in_axes=(0, None))(tr, Xt)), -1)
                   == yt, axis=1)
    assert np.all(accs >= lo) and np.all(accs <= hi)


# --------------------------------------------------------------------------- outputs

def test_output_metrics_match_numpy_on_a_linear_box():
    with enable_x64():
        rng = np.random.default_rng(12)
        W, b = rng.normal(size=(3, 4)), rng.normal(size=4)
        rW, rb = rng.uniform(0, .1, (3, 4)), rng.uniform(0, .1, 4)
        box = agt.ParamBox([(W - rW, b - rb)], [(W, b)], [(W + rW, b + rb)])
        x = rng.normal(size=(50, 3))
        y = rng.integers(0, 4, 50)
        f_l, f_n, f_u = agt.output_bounds(box, x)
        # exact bounds of a linear model: each term x_i W_ij over [W_l, W_u]
        ex_l = np.minimum(x[:, :, None] * (W - rW), x[:, :, None] * (W + rW)).sum(1) + b - rb
        ex_u = np.maximum(x[:, :, None] * (W - rW), x[:, :, None] * (W + rW)).sum(1) + b + rb
        np.testing.assert_allclose(f_l, ex_l, rtol=1e-12)
        np.testing.assert_allclose(f_u, ex_u, rtol=1e-12)
        must = [ex_l[i, y[i]] > np.delete(ex_u[i], y[i]).max() for i in range(50)]
        can = [ex_u[i, y[i]] >= np.delete(ex_l[i], y[i]).max() for i in range(50)]
        nom = np.argmax(x @ W + b, 1) == y
        assert agt.certified_accuracy(box, x, y) == pytest.approx(
            (np.mean(must), np.mean(nom), np.mean(can)))
        c = np.argmax(x @ W + b, 1)
        const = [ex_l[i, c[i]] > np.delete(ex_u[i], c[i]).max() for i in range(50)]
        assert agt.certified_constant_fraction(box, x) == pytest.approx(np.mean(const))
        t = int(np.argmax(np.bincount(c, minlength=4)))
        asr = agt.backdoor_asr_bound(box, x, t)
        assert asr == pytest.approx((np.mean([ex_l[i, t] > np.delete(ex_u[i], t).max()
                                              for i in range(50)]), np.mean(c == t),
                                     np.mean([ex_u[i, t] >= np.delete(ex_l[i], t).max()
                                              for i in range(50)])))
        assert 0 < asr[0] < asr[2] < 1   # the example is not degenerate
        # any sampled parameter in the box gives an ASR within [lower, upper]
        for _ in range(20):
            Ws = W + rW * rng.uniform(-1, 1, W.shape)
            bs = b + rb * rng.uniform(-1, 1, b.shape)
            a = np.mean(np.argmax(x @ Ws + bs, 1) == t)
            assert asr[0] <= a <= asr[2]


def test_bad_input_raises_clear_value_errors():
    with pytest.raises(ValueError, match="learning_rate"):
        agt.AGTConfig(0.0, 1)
    with pytest.raises(ValueError, match="loss"):
        agt.AGTConfig(0.1, 1, loss="hinge")
    with pytest.raises(ValueError, match="k_poison"):
        agt.AGTConfig(0.1, 1, k_poison=-1)
    with pytest.raises(ValueError, match="label_epsilon"):
        agt.AGTConfig(0.1, 1, label_epsilon=0.1)
    with pytest.raises(ValueError, match="poison_target"):
        agt.AGTConfig(0.1, 1, loss="mse", poison_target=1)
    assert hash(agt.AGTConfig(0.1, 2, k_poison=1)) == hash(agt.AGTConfig(0.1, 2, k_poison=1))
    assert agt.AGTConfig(0.1, 1, k_poison=2, label_k_poison=3).k == 5
    assert agt.AGTConfig(0.1, 1, k_poison=2, label_k_poison=3, paired=True).k == 3
    X, y, _, params = problem()
    with pytest.raises(ValueError, match="batch_size"):
        agt.train(params, X, y, agt.AGTConfig(0.1, 1, batch_size=5))
    with pytest.raises(ValueError, match="`y`"):
        agt.train(params, X, y + 5, agt.AGTConfig(0.1, 1))
    with pytest.raises(ValueError, match="features"):
        agt.train(params, X[:, :3], y, agt.AGTConfig(0.1, 1))
