"""Tests of ntk_poison.monitor against dense Hessians (jax.hessian + numpy eigh),
closed-form Gaussian distances (scipy's noncentral chi-square) and sklearn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from ntk_poison import monitor, nets, train, x64_scope

SHAPE = (6, 6, 1)
D = 36
C = 3


class TinyCNN(nnx.Module):
    """conv 3x3 (4 channels) -> act -> avgpool 2 -> dense to C logits, on 6x6x1.

    act(z) = mix tanh(z) + (1 - mix) relu(z) with ``mix`` a parameter (an array, not
    structure): the smooth and the ReLU net share one compiled program."""

    def __init__(self, mix=1.0, seed=0, dtype=jnp.float64):
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(1, 4, (3, 3), param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(36, C, param_dtype=dtype, rngs=rngs)
        self.mix = nnx.Param(jnp.asarray(mix, dtype))

    def __call__(self, x):
        z = self.conv(x)
        h = self.mix * jnp.tanh(z) + (1 - self.mix) * jax.nn.relu(z)
        h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
        return self.out(h.reshape(h.shape[0], -1))


@jax.jit
def _dense_hessians(model, x, y):
    """Oracle: jax.hessian of optax's cross-entropy at each point, flat (m, d, d)."""
    def loss(v, yi):
        logits = model(v.reshape((1,) + SHAPE))
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]
    return jax.vmap(jax.hessian(loss))(x.reshape(x.shape[0], -1), y)


def _dense(model, x, y):
    """Per point: ``(H, eigenvalues descending, eigenvectors as columns)`` (numpy eigh)."""
    out = []
    for H in np.asarray(_dense_hessians(model, jnp.asarray(x), jnp.asarray(y))):
        w, V = np.linalg.eigh(0.5 * (H + H.T))
        out.append((H, w[::-1], V[:, ::-1]))
    return out


def _points(m=4, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(m,) + SHAPE).astype(dtype)


# Fast tests share one compiled program where they can: k = 3, iters = D, m = 4 points,
# labels=None (the model's predictions).

def test_input_hessian_top_matches_dense_eigh_x64():
    with x64_scope():
        model = TinyCNN()
        x = _points()
        # labels=None: the model's own argmax predictions (computed here independently).
        y = np.argmax(np.asarray(model(x)), axis=1)
        vals, vecs, res = monitor.input_hessian_top(nets.apply_fn, model, x, None, k=3,
                                                    iters=D, return_residuals=True)
        assert vals.shape == (4, 3) and vecs.shape == (4, 3) + SHAPE
        assert vals.dtype == jnp.float64
        for i, (H, w, V) in enumerate(_dense(model, x, y)):
            np.testing.assert_allclose(vals[i], w[:3], rtol=1e-8, atol=1e-8 * w[0])
            v = np.asarray(vecs[i]).reshape(3, D)
            np.testing.assert_allclose(np.sum(v * V[:, :3].T, axis=1) ** 2, 1.0, atol=1e-8)
            assert np.all(np.asarray(res[i]) <= 1e-10 * abs(w[0]))


def test_relu_hessian_low_rank_deflates_cleanly():
    # A ReLU net is piecewise linear in x, so H = J^T (diag p - p p^T) J has rank <= C-1:
    # the Krylov space is exhausted after 2 steps and fresh directions must take over.
    with x64_scope():
        model = TinyCNN(mix=0.0, seed=2)
        x = _points(seed=3)
        y = np.argmax(np.asarray(model(x)), axis=1)
        vals, vecs = monitor.input_hessian_top(nets.apply_fn, model, x, k=3, iters=D)
        assert np.all(np.isfinite(np.asarray(vecs)))
        for i, (_, w, V) in enumerate(_dense(model, x, y)):
            np.testing.assert_allclose(vals[i, :2], w[:2], rtol=1e-8)
            assert abs(vals[i, 2]) <= 1e-10 * w[0] and abs(w[2]) <= 1e-10 * w[0]
            v = np.asarray(vecs[i, :2]).reshape(2, D)
            np.testing.assert_allclose(np.sum(v * V[:, :2].T, axis=1) ** 2, 1.0, atol=1e-8)


def test_fewer_steps_residuals_are_true_and_bound_the_error():
    # iters < d: the returned residual is ||H v - theta v|| (checked on the dense H),
    # and some eigenvalue lies within it of theta (the Kahan / Weyl residual bound).
    with x64_scope():
        model = TinyCNN(seed=3)
        x = _points(seed=4)
        y = np.array([0, 1, 2, 1])
        vals, vecs, res = monitor.input_hessian_top(nets.apply_fn, model, x, y, k=3,
                                                    iters=12, key=5, return_residuals=True)
        for i, (H, w, _) in enumerate(_dense(model, x, y)):
            v = np.asarray(vecs[i]).reshape(3, D)
            true_res = np.linalg.norm(v @ H - np.asarray(vals[i])[:, None] * v, axis=1)
            np.testing.assert_allclose(res[i], true_res, rtol=1e-6, atol=1e-14 * w[0])
            assert abs(vals[i, 0] - w[0]) <= res[i, 0] + 1e-12 * w[0]
            assert vals[i, 0] <= w[0] * (1 + 1e-12)          # Ritz values never exceed


@pytest.mark.slow
def test_float32_agrees_with_float64():
    m64 = TinyCNN()
    m32 = jax.tree.map(lambda a: a.astype(jnp.float32), m64)
    x = _points()
    v64, _ = monitor.input_hessian_top(nets.apply_fn, m64, x, k=3, iters=D)
    v32, _ = monitor.input_hessian_top(nets.apply_fn, m32, x.astype(np.float32), k=3,
                                       iters=D)
    assert v32.dtype == jnp.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-4, atol=1e-5 * float(np.max(v64)))


def test_bad_arguments_raise():
    model = TinyCNN()
    x = _points(m=2)
    f = monitor.input_hessian_top
    with pytest.raises(ValueError, match="iters"):
        f(nets.apply_fn, model, x, iters=D + 1)
    with pytest.raises(ValueError, match="`k`"):
        f(nets.apply_fn, model, x, k=5, iters=4)
    with pytest.raises(ValueError, match="labels"):
        f(nets.apply_fn, model, x, np.array([0, C]))
    with pytest.raises(ValueError, match="labels"):
        f(nets.apply_fn, model, x, np.array([0]))
    with pytest.raises(ValueError, match="logits"):
        f(lambda p, xb: p(xb)[:, 0], model, x)
    with pytest.raises(ValueError, match="batch"):
        f(nets.apply_fn, model, x[0, 0, 0])


def test_overlap_known_vectors():
    t = np.array([0.0, 0.3, 1.1, np.pi / 2])
    V = np.zeros((4, 2, 3, 2))
    V[:, 0, 0, 0], V[:, 0, 1, 1] = np.cos(t), np.sin(t)
    V[:, 1, 2, 0] = 1.0                                      # second vectors are ignored
    e1 = np.zeros((3, 2))
    e1[0, 0] = 2.5
    np.testing.assert_allclose(monitor.overlap(V, e1), np.cos(t) ** 2, atol=1e-15)
    U = np.zeros((4, 3, 2))
    U[:, 1, 1] = -np.arange(1, 5)                            # per point, sign-blind
    np.testing.assert_allclose(monitor.overlap(V.reshape(4, 2, 6), U), np.sin(t) ** 2,
                               atol=1e-15)
    with pytest.raises(ValueError, match="zero vector"):
        monitor.overlap(V, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="directions"):
        monitor.overlap(V, np.ones((4, 5)))
    with pytest.raises(ValueError, match="vectors"):
        monitor.overlap(V[:, 0], e1)


def test_curvature_hook_in_training_no_recompile_and_dense_oracle():
    """train.train with the hook for 3 epochs: no compilation after the first epoch's;
    the last epoch's numbers against the dense oracle, numpy and sklearn."""
    with x64_scope():
        rs = np.random.default_rng(0)
        n, m = 64, 2
        X = rs.normal(size=(n,) + SHAPE)
        Y = rs.integers(0, C, n)
        pattern = np.zeros(SHAPE)
        pattern[4:, 4:] = 2.0
        X[:16] += pattern                                    # an additive backdoor
        Y[:16] = 0
        x_clean = rs.normal(size=(m,) + SHAPE)
        x_trig = x_clean + pattern
        hook = monitor.curvature_hook(nets.apply_fn, x_clean, None, x_trig, None, pattern,
                                      k=3, iters=D, prefix="cv_")
        sizes = []

        def counted(params, epoch):
            out = hook(params, epoch)
            sizes.append(monitor._hessian_top._cache_size())
            return out

        before = monitor._hessian_top._cache_size()
        cfg = train.TrainConfig(optimizer="adam", lr=0.01, batch_size=32, epochs=3)
        params, hist = train.train(TinyCNN(seed=5), nets.apply_fn, X, Y, cfg,
                                   hooks=[counted], progress=False)
        assert sizes[0] - before <= 1 and sizes == [sizes[0]] * 3
        assert len(hist["cv_auroc"]) == 3
        assert hist["cv_lam_clean"][0] != hist["cv_lam_clean"][-1]   # params did change

        x = np.concatenate([x_clean, x_trig])
        pred = np.argmax(np.asarray(params(jnp.asarray(x))), axis=1)
        dense = _dense(params, x, pred)
        lam = np.array([w[0] for _, w, _ in dense])
        top = np.array([V[:, 0] for _, _, V in dense])
        got = {k[3:]: v[-1] for k, v in hist.items() if k.startswith("cv_")}
        np.testing.assert_allclose(got["lam_clean"], lam[:m], rtol=1e-8)
        np.testing.assert_allclose(got["lam_trig"], lam[m:], rtol=1e-8)
        cos2 = (top[m:] @ pattern.reshape(-1)) ** 2 / np.sum(pattern ** 2)
        np.testing.assert_allclose(got["overlap"], cos2, atol=1e-8)
        np.testing.assert_allclose(got["overlap_mean"], cos2.mean(), atol=1e-8)
        np.testing.assert_allclose(got["lam_ratio_median"], np.median(lam[m:] / lam[:m]),
                                   rtol=1e-8)
        np.testing.assert_allclose(got["lam_ratio_mean"], lam[m:].mean() / lam[:m].mean(),
                                   rtol=1e-8)
        assert got["auroc"] == roc_auc_score(np.arange(2 * m) >= m, lam)
        assert got["lanczos_residual"] < 1e-10


def test_curvature_hook_bad_arguments():
    x = np.zeros((3,) + SHAPE)
    with pytest.raises(ValueError, match="x_trig"):
        monitor.curvature_hook(nets.apply_fn, x, None, x[:2], None, np.ones(SHAPE))
    with pytest.raises(ValueError, match="both"):
        monitor.curvature_hook(nets.apply_fn, x, np.zeros(3, int), x, None, np.ones(SHAPE))
    with pytest.raises(ValueError, match="directions"):
        monitor.curvature_hook(nets.apply_fn, x, None, x, None, np.ones((3, 5)))


def _gauss(rs, centre, sigma, n):
    return centre + sigma * rs.normal(size=(n, centre.size))


def _median_dist(centre, sigma, point, p):
    """Median of |N(centre, sigma^2 I_p) - point|: sigma sqrt(ncx2 median)."""
    nc = np.sum((centre - point) ** 2) / sigma ** 2
    return sigma * np.sqrt(stats.ncx2.median(p, nc))


def test_feature_collapse_gaussian_clusters_closed_form():
    rs = np.random.default_rng(7)
    p, n, s = 12, 3000, 1.0
    a = [np.zeros(p), np.r_[6.0, np.zeros(p - 1)], np.r_[0.0, 9.0, np.zeros(p - 2)]]
    target = 1
    b = a[target] + np.r_[0, 0, 4.0, np.zeros(p - 3)]            # the poison cluster
    t = b + np.r_[0, 0, 0, 1.5, np.zeros(p - 4)]                 # triggered inputs
    sp, st = 0.5, 0.8
    Fc = np.concatenate([_gauss(rs, c, s, n) for c in a])
    yc = np.repeat(np.arange(3), n)
    Fp, Ft = _gauss(rs, b, sp, n), _gauss(rs, t, st, n)
    r = monitor.feature_collapse(Fc, yc, Fp, Ft, target)

    spread = s * np.sqrt(p)                                      # E|x - mu_c|^2 = p s^2
    np.testing.assert_allclose(r["spread"], spread, rtol=0.01)
    np.testing.assert_allclose(r["trig_to_poison"], _median_dist(t, st, b, p) / spread,
                               rtol=0.02)
    np.testing.assert_allclose(r["trig_to_target"],
                               _median_dist(t, st, a[target], p) / spread, rtol=0.02)
    np.testing.assert_allclose(r["clean_target_to_poison"],
                               _median_dist(a[target], s, b, p) / spread, rtol=0.02)
    # The non-target rows are a mixture of two clusters: the median solves
    # sum_c P(|x_c - b| <= r) = 1 (each cluster has half the rows).
    ncs = [np.sum((a[c] - b) ** 2) / s ** 2 for c in (0, 2)]
    cdf = lambda r2: sum(stats.ncx2.cdf(r2 / s ** 2, p, nc) for nc in ncs) - 1.0  # noqa
    from scipy.optimize import brentq
    med = np.sqrt(brentq(cdf, 1e-6, 1e4))
    np.testing.assert_allclose(r["clean_other_to_poison"], med / spread, rtol=0.02)

    # PCA against sklearn (each axis up to sign).
    pca = PCA(2).fit(np.concatenate([Fc, Fp, Ft]))
    for key, F in (("clean", Fc), ("poison", Fp), ("trig", Ft)):
        ref = pca.transform(F)
        got = r["pca"][key]
        sign = np.sign(np.sum(got * ref, axis=0))
        np.testing.assert_allclose(got, ref * sign, atol=1e-9)
    np.testing.assert_allclose(r["pca"]["explained"], pca.explained_variance_ratio_,
                               rtol=1e-10)
    np.testing.assert_array_equal(r["pca"]["clean_labels"], yc)


def test_feature_collapse_exact_symmetric_clusters():
    # Each cluster is centre +- e_j (j = 1..p): centroid exact, mean squared distance 1.
    p = 4
    E = np.concatenate([np.eye(p), -np.eye(p)])
    a0, a1 = np.zeros(p), np.r_[10.0, 0, 0, 0]
    Fc = np.concatenate([a0 + E, a1 + E])
    yc = np.repeat([0, 1], 2 * p)
    b = a1 + np.r_[0, 3.0, 0, 0]
    Fp = b + E
    Ft = b + np.r_[0, 0, 4.0, 0] + np.zeros((5, p))              # all at distance 4
    r = monitor.feature_collapse(Fc, yc, Fp, Ft, 1)
    assert r["spread"] == pytest.approx(1.0, rel=1e-14)
    assert r["trig_to_poison"] == pytest.approx(4.0, rel=1e-14)
    assert r["trig_to_target"] == pytest.approx(5.0, rel=1e-14)
    # |a1 +- e_j - b|: sqrt(9+1) for j = 1, 3, 4 (6 rows), 2 and 4 for j = 2.
    assert r["clean_target_to_poison"] == pytest.approx(np.sqrt(10.0), rel=1e-14)
    assert r["clean_other_to_poison"] == pytest.approx(
        np.median(np.linalg.norm(a0 + E - b, axis=1)), rel=1e-14)


def test_feature_collapse_bad_arguments():
    F = np.ones((4, 3)) + np.arange(4)[:, None]
    y = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="target"):
        monitor.feature_collapse(F, y, F, F, 2)
    with pytest.raises(ValueError, match="features_trig"):
        monitor.feature_collapse(F, y, F, F[:, :2], 1)
    with pytest.raises(ValueError, match="y_clean"):
        monitor.feature_collapse(F, y[:3], F, F, 1)
    with pytest.raises(ValueError, match="other classes"):
        monitor.feature_collapse(F, np.ones(4, int), F, F, 1)


def test_feature_pca_figure_writes_png_atomically(tmp_path):
    rs = np.random.default_rng(0)
    r = monitor.feature_collapse(rs.normal(size=(20, 5)), np.repeat([0, 1], 10),
                                 rs.normal(size=(6, 5)) + 3, rs.normal(size=(6, 5)) + 3, 1)
    out = monitor.feature_pca_figure(r, tmp_path / "sub" / "pca.png")
    assert out == tmp_path / "sub" / "pca.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["pca.png"]     # no temp left
    with pytest.raises(ValueError, match="result"):
        monitor.feature_pca_figure({"spread": 1.0}, tmp_path / "x.png")
