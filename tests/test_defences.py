"""Tests for ntk_poison.defences: the evaluator, spectral signatures, the feature
maps and the input-curvature detector."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.flatten_util import ravel_pytree
import pytest
from sklearn.metrics import roc_auc_score

from ntk_poison import attacks, kernels, krr, triggers
from ntk_poison.defences import (CurvatureDetector, Detector, SpectralSignatures, auroc,
                                 class_ids, confusion, empirical_ntk_features, evaluate,
                                 evaluate_artefact, kernel_pca_features, tpr_at_fpr)
from ntk_poison.defences.base import top_fraction_count
from ntk_poison.defences.evaluate import average_ranks


# =========================================================================== evaluator

def test_auroc_hand_computed():
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, .) two wins: 3 / 4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.1, 0.4, 0.35, 0.8], np.array([False, False, True, True])) == 0.75


def test_auroc_ties_count_one_half():
    # (2 vs 1) win, (2 vs 2) tie = 1/2, (3 vs 1), (3 vs 2) wins: 3.5 / 4.
    assert auroc([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1]) == 0.875
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auroc([1.0, 1.0, 0.0], [1, 0, 0]) == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_random_data_with_ties(seed):
    r = np.random.default_rng(seed)
    n = 200
    truth = r.random(n) < 0.2
    scores = np.round(r.standard_normal(n) + 1.0 * truth, 1)  # rounding makes ties
    assert auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_average_ranks_match_scipy(rng):
    from scipy.stats import rankdata
    x = np.round(rng.standard_normal(100), 1)
    np.testing.assert_allclose(average_ranks(x), rankdata(x, method="average"))


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="same points"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])


def test_tpr_at_fpr_constructed_case():
    clean = np.arange(20.0)                 # 20 clean: floor(0.05 * 20) = 1 may pass
    poisons = np.array([18.5, 25.0, 5.0, 17.0])
    scores = np.r_[clean, poisons]
    truth = np.r_[np.zeros(20, bool), np.ones(4, bool)]
    out = tpr_at_fpr(scores, truth, 0.05)
    assert out["threshold"] == 18.0         # the 2nd largest clean score
    assert out["fpr"] == 0.05               # only 19 passes among the clean
    assert out["tpr"] == 0.5                # 18.5 and 25 pass
    # A tie at the threshold never lets the FPR exceed the target.
    tied = np.r_[np.full(20, 1.0), [2.0, 1.0]]
    out = tpr_at_fpr(tied, np.r_[np.zeros(20, bool), [True, True]], 0.05)
    assert out["fpr"] == 0.0 and out["tpr"] == 0.5


def test_confusion_counts():
    flagged = np.array([True, True, False, False, True, False])
    truth = np.array([True, False, True, False, True, False])
    c = confusion(flagged, truth)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 2, 1)
    assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == pytest.approx(2 / 3)
    assert c["flag_fpr"] == pytest.approx(1 / 3)
    assert np.isnan(confusion(np.zeros(3, bool), np.array([1, 0, 0]))["precision"])


def test_evaluate_dict_and_one_class_truth():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    flagged = scores > 0.3
    out = evaluate(scores, flagged, np.array([0, 0, 1, 1]))
    assert out["auroc"] == 0.75 and out["tp"] == 2 and out["fp"] == 1
    assert out["n"] == 4 and out["n_poison"] == 2
    none = evaluate(scores, flagged, np.zeros(4, bool))
    assert np.isnan(none["auroc"]) and none["fp"] == 3
    with pytest.raises(ValueError, match="boolean"):
        evaluate(scores, scores, np.array([0, 0, 1, 1]))


def test_evaluate_artefact_uses_is_poison(rng):
    X = rng.standard_normal((10, 4))
    a = attacks.clone_attack(X, np.ones(10), np.zeros(4), -1.0, 3)
    scores = a.is_poison.astype(float) + 0.01 * rng.random(13)
    out = evaluate_artefact((scores, a.is_poison, {"extra": 1}), a)
    assert out["auroc"] == 1.0 and out["tp"] == 3 and out["fp"] == 0
    with pytest.raises(ValueError, match="training rows"):
        evaluate_artefact((scores[:5], a.is_poison[:5]), a)


def test_class_ids_from_every_encoding():
    ints = np.array([2, 0, 2, 1])
    np.testing.assert_array_equal(class_ids(ints), ints)
    np.testing.assert_array_equal(class_ids(np.eye(3)[ints]), ints)
    np.testing.assert_array_equal(class_ids(np.array([1.0, -1.0, 1.0])), [1, 0, 1])
    assert top_fraction_count(150, 0.075) == 11 and top_fraction_count(10, 0.05) == 1
    assert top_fraction_count(4, 2.0) == 4 and top_fraction_count(7, 0.0) == 0


# =========================================================================== spectral

def _offset_poisons(rng, n_per_class=(200, 150), p=30, n_poison=12, offset=6.0):
    """Two Gaussian classes; poisons in class 1 share an offset direction."""
    feats, labels = [], []
    for c, n in enumerate(n_per_class):
        feats.append(rng.standard_normal((n, p)) + 3.0 * c)
        labels.append(np.full(n, c))
    H, lab = np.concatenate(feats), np.concatenate(labels)
    v = rng.standard_normal(p)
    v /= np.linalg.norm(v)
    poison = np.zeros(H.shape[0], bool)
    poison[rng.choice(np.flatnonzero(lab == 1), n_poison, replace=False)] = True
    H[poison] += offset * v
    return H, lab, poison


def _numpy_spectral_scores(H, lab):
    """An independent reference: the top eigenvector of each class covariance."""
    out = np.zeros(H.shape[0])
    for c in np.unique(lab):
        C = H[lab == c] - H[lab == c].mean(axis=0)
        w, V = np.linalg.eigh(C.T @ C)
        out[lab == c] = (C @ V[:, -1]) ** 2
    return out


def test_spectral_signatures_find_offset_poisons(rng):
    H, lab, poison = _offset_poisons(rng)
    det = SpectralSignatures(eps=0.05)
    assert isinstance(det, Detector)
    scores, flagged = det.detect(H, lab)
    out = evaluate(scores, flagged, poison)
    assert out["auroc"] > 0.95
    assert out["recall"] > 0.9


def test_spectral_signatures_flag_exactly_the_rounded_fraction(rng):
    H, lab, _ = _offset_poisons(rng, n_per_class=(200, 150, 10))
    for eps in (0.05, 0.1):
        _, flagged = SpectralSignatures(eps=eps, multiplier=1.5).detect(H, lab)
        for c, n in enumerate((200, 150, 10)):
            assert flagged[lab == c].sum() == int(np.floor(1.5 * eps * n + 0.5))
    _, none = SpectralSignatures(eps=0.0).detect(H, lab)
    assert not none.any()


def test_spectral_scores_match_an_independent_numpy_computation(rng):
    H, lab, _ = _offset_poisons(rng)
    scores, flagged = SpectralSignatures().detect(H, lab)
    ref = _numpy_spectral_scores(H, lab)
    np.testing.assert_allclose(scores, ref, rtol=1e-9, atol=1e-12)
    for c in (0, 1):  # the flagged rows are the top scores of each class
        rows = np.flatnonzero(lab == c)
        top = rows[np.argsort(-ref[rows])[:flagged[rows].sum()]]
        assert set(top) == set(np.flatnonzero(flagged & (lab == c)))


def test_spectral_signatures_accept_float_and_one_hot_labels(rng):
    H, lab, _ = _offset_poisons(rng)
    want = SpectralSignatures().detect(H, lab)
    for labels in (np.where(lab == 1, 1.0, -1.0), np.eye(2)[lab]):
        got = SpectralSignatures().detect(H, labels)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_spectral_signatures_on_a_backdoor_artefact(rng):
    """End to end: a cross-trigger backdoor on 8x8 'images', raw pixels as features."""
    n, d = 300, 64
    y = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    X = rng.standard_normal((n, d)) + 0.5 * y[:, None]
    trig = triggers.CrossTrigger(strength=8.0)
    a = attacks.backdoor_attack(X, y, trig, 1.0, n_poison=10, seed=0)
    out = evaluate_artefact(SpectralSignatures(eps=0.1).detect(a.x, a.y), a)
    assert out["auroc"] > 0.95


@pytest.mark.parametrize("bad", [dict(eps=-0.1), dict(eps=1.5), dict(multiplier=-1.0)])
def test_spectral_signatures_bad_parameters(bad):
    with pytest.raises(ValueError):
        SpectralSignatures(**bad)


def test_spectral_signatures_bad_inputs(rng):
    with pytest.raises(ValueError, match="rows"):
        SpectralSignatures().detect(rng.standard_normal((5, 3)), np.zeros(4, int))
    with pytest.raises(ValueError, match="NaN"):
        SpectralSignatures().detect(np.full((5, 3), np.nan), np.zeros(5, int))


# =========================================================================== features

def _centred(K):
    n = K.shape[0]
    C = np.eye(n) - np.ones((n, n)) / n
    return C @ K @ C


def test_kernel_pca_features_reproduce_the_centred_gram(rng):
    X = rng.standard_normal((25, 3))
    k = kernels.get("rbf", length_scale=1.3)
    Kc = _centred(np.asarray(k(X, X)))
    full = kernel_pca_features(k, X, 24)
    assert full.shape == (25, 24)
    np.testing.assert_allclose(full @ full.T, Kc, atol=1e-10)
    w, V = np.linalg.eigh(Kc)
    top = V[:, -4:] * w[-4:] @ V[:, -4:].T
    phi = kernel_pca_features(k, X, 4)
    np.testing.assert_allclose(phi @ phi.T, top, atol=1e-10)
    np.testing.assert_allclose(phi.mean(axis=0), 0.0, atol=1e-10)  # centred
    np.testing.assert_allclose(np.sum(phi ** 2, axis=0), w[::-1][:4], rtol=1e-10)


def test_kernel_pca_features_bad_inputs(rng):
    X = rng.standard_normal((5, 2))
    k = kernels.get("rbf")
    for nc in (0, 6, 2.0):
        with pytest.raises(ValueError, match="n_components"):
            kernel_pca_features(k, X, nc)
    with pytest.raises(ValueError, match="kernel"):
        kernel_pca_features("rbf", X, 2)


def _tiny_net(out_dim=1):
    from neural_tangents import stax
    init_fn, apply_fn, _ = stax.serial(stax.Dense(6, b_std=0.1), stax.Relu(),
                                       stax.Dense(out_dim, b_std=0.1))
    _, params = init_fn(jax.random.PRNGKey(0), (-1, 3))
    return apply_fn, params


def test_empirical_ntk_features_are_per_example_gradients(rng):
    apply_fn, params = _tiny_net()
    X = rng.standard_normal((7, 3))
    F = empirical_ntk_features(apply_fn, params, X, batch_size=3)
    flat, unravel = ravel_pytree(params)
    assert F.shape == (7, flat.size)
    grad_one = jax.jit(jax.grad(lambda p, x: apply_fn(unravel(p), x[None])[0, 0]))
    for i in range(7):  # an explicit loop as the reference
        np.testing.assert_allclose(F[i], grad_one(flat, X[i]), rtol=1e-12, atol=1e-14)
    # Their Gram is the empirical NTK of neural-tangents.
    import neural_tangents as nt
    K = nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0)(X, None, params)
    np.testing.assert_allclose(F @ F.T, np.squeeze(np.asarray(K)), rtol=1e-10, atol=1e-12)


def test_empirical_ntk_features_vector_outputs(rng):
    apply_fn, params = _tiny_net(out_dim=2)
    X = rng.standard_normal((4, 3))
    P = ravel_pytree(params)[0].size
    both = empirical_ntk_features(apply_fn, params, X)
    second = empirical_ntk_features(apply_fn, params, X, output=1)
    assert both.shape == (4, 2 * P) and second.shape == (4, P)
    np.testing.assert_allclose(both[:, P:], second, rtol=1e-12)
    with pytest.raises(ValueError, match="output"):
        empirical_ntk_features(apply_fn, params, X, output=2)


# =========================================================================== curvature

def _spike_setting(seed, l=1.0):
    """Two tight clusters (+-1) and a strong clone cluster far from both (the spike
    regime of THEORY.md section 2: triggered inputs at r = l from zeta)."""
    r = np.random.default_rng(seed)
    d = 4

    def clean(n):
        c = r.choice([-1.0, 1.0], n)
        X = 0.4 * r.standard_normal((n, d))
        X[:, 0] += 3.0 * c
        return X, c

    X, y = clean(120)
    zeta = np.zeros(d)
    zeta[1] = 6.0
    art = attacks.clone_attack(X, y, zeta, 1.0, 60, meta={"r": l})
    model = krr.fit(kernels.get("rbf", length_scale=l), art.x, art.y, 1e-3)
    u = r.standard_normal((100, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return model, clean, zeta, zeta + l * u


@pytest.fixture(scope="module")
def spike():
    pytest.importorskip("ntk_poison.spectra")
    return _spike_setting(0)


def test_curvature_detector_separates_triggered_inputs(spike):
    model, clean, zeta, x_trig = spike
    det = CurvatureDetector(fpr=0.05).fit(model, clean(100)[0])
    assert det.threshold is not None and det.clean_scores.shape == (100,)
    x_held = clean(100)[0]
    s_clean, f_clean = det.detect(model, x_held)
    s_trig, f_trig = det.detect(model, x_trig)
    truth = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    out = evaluate(np.r_[s_clean, s_trig], np.r_[f_clean, f_trig], truth)
    assert out["auroc"] > 0.9
    assert f_clean.mean() <= 0.15     # ~5% FPR on held-out clean inputs
    assert f_trig.mean() > 0.5


def test_curvature_top_eigenvector_aligns_with_the_radial_direction(spike):
    model, clean, zeta, _ = spike
    r = np.random.default_rng(1)
    e = np.array([0.0, 0.0, 1.0, 0.0])
    x_trig = zeta + e + 0.02 * r.standard_normal((8, 4))
    det = CurvatureDetector(k=2, trigger_direction=e).fit(model, clean(8)[0])
    scores, flagged, info = det.detect_with_vectors(model, x_trig)
    assert info["vectors"].shape == (8, 2, 4) and info["eigenvalues"].shape == (8, 2)
    np.testing.assert_allclose(info["eigenvalues"][:, 0], scores)
    assert info["alignment"].shape == (8, 2)
    assert np.all(info["alignment"][:, 0] > 0.9)   # top vector ~ x0 - zeta
    assert info["pseudo_labels"] and np.all(info["labels"] == 1.0)
    # Reported only: flags do not depend on the direction.
    plain = dataclasses.replace(det, trigger_direction=None)
    s2, f2, info2 = plain.detect_with_vectors(model, x_trig)
    np.testing.assert_array_equal(f2, flagged)
    np.testing.assert_array_equal(s2, scores)
    assert info2["alignment"] is None


def test_curvature_scores_are_the_top_eigenvalue_of_the_loss_hessian(spike):
    from ntk_poison import spectra
    model, clean, _, x_trig = spike
    x = np.r_[clean(4)[0], x_trig[:4]]
    y = np.sign(np.asarray(model.predict(x)))
    det = CurvatureDetector(batch_size=4).fit(model, clean(8)[0])  # two chunks of 4
    scores, _ = det.detect(model, x)
    ref = np.linalg.eigvalsh(np.asarray(spectra.loss_hessian(model, x, y)))[:, -1]
    np.testing.assert_allclose(scores, ref, rtol=1e-10)
    # Padding a chunk of 3 to 4 changes nothing.
    np.testing.assert_allclose(det.detect(model, x[:3])[0], ref[:3], rtol=1e-12)
    np.testing.assert_allclose(det.detect(model, x, y)[0], scores)  # y given = pseudo


def test_curvature_lanczos_agrees_with_dense(spike):
    model, clean, zeta, x_trig = spike
    x = np.r_[clean(4)[0], x_trig[:4]]
    dense = CurvatureDetector(k=2, trigger_direction=x_trig[0] - zeta).fit(model, x)
    lanc = dataclasses.replace(dense, method="lanczos", threshold=None,
                               clean_scores=None).fit(model, x)
    np.testing.assert_allclose(lanc.clean_scores, dense.clean_scores, rtol=1e-8)
    _, _, i_d = dense.detect_with_vectors(model, x)
    _, _, i_l = lanc.detect_with_vectors(model, x)
    np.testing.assert_allclose(i_l["eigenvalues"], i_d["eigenvalues"], rtol=1e-8,
                               atol=1e-12)
    np.testing.assert_allclose(i_l["alignment"][:, 0], i_d["alignment"][:, 0], atol=1e-6)
    assert i_l["converged"].all()


def test_curvature_batch_size_defaults_to_one_for_lanczos(spike):
    """Lanczos defaults to one input a chunk (a batched eigh inside its while_loop
    deadlocked XLA's CPU pool); dense keeps 256; an int overrides either."""
    assert CurvatureDetector().effective_batch_size == 256
    lanc = CurvatureDetector(method="lanczos")
    assert lanc.batch_size is None and lanc.effective_batch_size == 1
    assert CurvatureDetector(method="lanczos", batch_size=4).effective_batch_size == 4
    assert CurvatureDetector(batch_size=8).effective_batch_size == 8
    # the default follows the method through dataclasses.replace
    assert dataclasses.replace(CurvatureDetector(), method="lanczos").effective_batch_size == 1
    model, clean, _, x_trig = spike
    x = np.r_[clean(3)[0], x_trig[:2]]
    one = lanc.fit(model, x)                                 # 5 chunks of one input
    assert one.effective_batch_size == 1                     # fit keeps the default
    dense = CurvatureDetector().fit(model, x)
    np.testing.assert_allclose(one.clean_scores, dense.clean_scores, rtol=1e-8)


def test_curvature_detector_accepts_a_trigger_object(spike):
    model, clean, _, x_trig = spike
    trig = triggers.CrossTrigger(strength=1.0, image_shape=(2, 2))
    det = CurvatureDetector(trigger_direction=trig).fit(model, clean(8)[0])
    _, _, info = det.detect_with_vectors(model, x_trig[:8])
    assert info["alignment"].shape == (8, 1)
    u = trig.direction((4,))
    np.testing.assert_allclose(info["alignment"][:, 0],
                               (info["vectors"][:, 0] @ u) ** 2 / (u @ u), rtol=1e-10)


def test_curvature_detector_bad_use(spike):
    model, clean, _, _ = spike
    with pytest.raises(ValueError, match="not fitted"):
        CurvatureDetector().detect(model, clean(8)[0])
    for bad in (dict(method="power"), dict(fpr=0.0), dict(fpr=1.0), dict(k=0),
                dict(batch_size=0), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            CurvatureDetector(**bad)
    with pytest.raises(ValueError, match="shape"):
        CurvatureDetector().fit(model, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="exceeds"):
        CurvatureDetector(k=5).fit(model, clean(8)[0])
    det = CurvatureDetector(trigger_direction=np.zeros(4)).fit(model, clean(8)[0])
    with pytest.raises(ValueError, match="zero"):
        det.detect(model, clean(8)[0])


def test_curvature_detector_on_a_vector_output_model(rng):
    """C outputs: the pseudo-label is the (centred) one-hot row of argmax f, and the score
    the top eigenvalue of the summed loss's input Hessian (numpy eigh of jax.hessian of
    the explicit sum 1/2 sum_c (f_c - y_c)^2)."""
    C, d = 3, 4
    X = rng.standard_normal((25, d))
    Y = np.eye(C)[rng.integers(0, C, 25)] - 1.0 / C
    model = krr.fit(kernels.rbf(1.1), X, Y, ridge=1e-2)
    x = rng.standard_normal((3, d))
    F = np.asarray(model.predict(x))
    f = model.as_function()
    hess = jax.jit(jax.hessian(lambda v, t: 0.5 * ((f(v) - t) ** 2).sum()))
    for centred, method in ((True, "lanczos"), (False, "dense")):
        det = CurvatureDetector(method=method, centred=centred)
        info = det.spectrum(model, x)
        want = np.eye(C)[F.argmax(1)] - (1.0 / C if centred else 0.0)
        np.testing.assert_allclose(info["labels"], want, atol=1e-15)
        for i in range(3):
            assert info["eigenvalues"][i, 0] == pytest.approx(
                np.linalg.eigvalsh(np.asarray(hess(x[i], want[i])))[-1], rel=1e-8)
    scores, _ = det.fit(model, x).detect(model, x, y=np.eye(C)[[0, 1, 2]])
    assert scores.shape == (3,)
