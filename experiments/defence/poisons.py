"""Which poisons the penalty reaches, and the frontier's extra measures (THEORY.md
section 3, "which poisons the penalty suppresses first").

**Triggered clean opposite-label images.** A poison built from a clean non-target
training image x_c (label -1, relabelled y_t) and the trigger direction e (unit, in the
reduced coordinates: the cross pattern is the last reduced axis)::

    zeta(D) = x_c + t e,   t = the smallest t >= 0 with  min_i |x_c + t e - x_i| = D

(x_i: the clean training points; for small D the nearest is x_c itself, t = D). So
zeta is a triggered clean image at distance exactly D from the clean data.
:func:`distance_sweep` puts m clones of zeta(D) (label y_t) in the training set for
each D/l and each of a few base images, and measures the efficacy at zeta,
``Delta f(zeta) = f_poisoned(zeta) - f_clean(zeta)`` (clean fit at the same absolute
ridge and kappa), relative to kappa = 0; ``kappa_half`` is where it halves. What
controls the penalty's leverage is D, not the trigger point's distance r to zeta.

**Near-clean-image poisons** (:func:`near_clean_poisons`): m distinct clean
non-target training images, each plus the attack's own trigger vector (the reduced
``x0 - x0_clean``), label y_t: the paper's dirty-label backdoor, every poison a near
clone of a clean opposite-label image.

**Frontier extras** (:func:`frontier_extras`): the margin ratio
``Delta f / |f_clean|`` on triggered inputs (median over inputs), chance (the
majority class's share of the clean test labels) and ``collapsed`` (clean accuracy
within 5 points of chance).

**The r-sweep, kept** (:func:`near_clones`): the efficacy at trigger points
``zeta + r e`` (random unit e) relative to kappa = 0, for several r/l.
"""

from __future__ import annotations

import numpy as np

from ntk_poison import metrics, penalized
from ntk_poison.report import progress

#: clean accuracy within this of chance: the model has collapsed
COLLAPSE_POINTS = 0.05


def near_clones(sp, sc, prep, cfg, kappas) -> dict:
    """Efficacy ``Delta f(zeta + r e)`` (mean over random unit e) relative to kappa = 0."""
    rng = np.random.default_rng(cfg.seed + 3)
    E = rng.standard_normal((cfg.n_directions, cfg.dim))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    rs = np.asarray(cfg.r_over_l, float)
    pts = prep.zeta[None, None] + (rs[:, None, None] * prep.ell) * E[None]   # (R, D, d)
    flat = pts.reshape(-1, cfg.dim)
    df = (np.asarray(sp.predict(flat)) - np.asarray(sc.predict(flat))).reshape(
        len(kappas), len(rs), cfg.n_directions).mean(-1)
    rel = df / df[0]
    x = np.asarray(kappas) / prep.ell ** 2
    return dict(r_over_l=rs, efficacy=df, relative=rel,
                kappa_half=[metrics.first_crossing(x, rel[:, j], 0.5, direction="down",
                                                   zero_divisor=10.0)
                            for j in range(len(rs))])


def _nearest_distance(X, pts):
    return np.sqrt(((pts[:, None, :] - X[None]) ** 2).sum(-1)).min(1)


def triggered_at_distance(X, base, e, distance, grid: int = 2001):
    """``base + t e`` with t the smallest >= 0 where the distance to the nearest row
    of X equals ``distance`` (scan, then bisection to 1e-12 relative)."""
    e = np.asarray(e, np.float64) / np.linalg.norm(e)
    g = lambda t: _nearest_distance(X, (base + np.atleast_1d(t)[:, None] * e))  # noqa: E731
    hi = max(distance, 1e-12)
    while g(hi)[0] < distance:
        hi *= 2.0
    ts = np.linspace(0.0, hi, grid)
    i = int(np.argmax(g(ts) >= distance))
    lo, hi = ts[i - 1], ts[i]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid)[0] < distance else (lo, mid)
        if hi - lo <= 1e-12 * max(hi, 1.0):
            break
    return base + hi * e


def base_images(prep, cfg, count):
    """Indices of ``count`` clean non-target training images (seeded choice)."""
    idx = np.flatnonzero(prep.y != cfg.y_target)
    rng = np.random.default_rng(cfg.seed + 11)
    return rng.choice(idx, size=min(count, len(idx)), replace=False)


def distance_sweep(k, sc, prep, cfg, kappas) -> dict:
    """kappa_half against the poison's distance to the nearest clean point (module doc).

    ``sc``: the clean sweep at the poisoned set's absolute ridge (n = N + m)."""
    ell, m, tgt = prep.ell, cfg.m, cfg.y_target
    ds = np.asarray(cfg.distance_over_l, float)
    bases = base_images(prep, cfg, cfg.distance_bases)
    x = np.asarray(kappas) / ell ** 2
    eff = np.zeros((len(bases), len(ds), len(kappas)))
    zetas = np.zeros((len(bases), len(ds), prep.X.shape[1]))
    pairs = [(b, j) for b in range(len(bases)) for j in range(len(ds))]
    for bi, j in progress(pairs, "distance sweep"):
        d = ds[j]
        z = triggered_at_distance(prep.X, prep.X[bases[bi]], prep.trigger_direction, d * ell)
        zetas[bi, j] = z
        Xp = np.vstack([prep.X, np.repeat(z[None], m, 0)])
        yp = np.r_[prep.y, np.full(m, tgt)]
        sp = penalized.fit_penalized_sweep(k, Xp, yp, cfg.ridge, kappas)
        eff[bi, j] = np.asarray(sp.predict(z[None]))[:, 0] - np.asarray(sc.predict(z[None]))[:, 0]
    rel = eff / eff[..., :1]
    kh = [[metrics.first_crossing(x, rel[b, j], 0.5, direction="down", zero_divisor=10.0)
           for j in range(len(ds))] for b in range(len(bases))]
    dist = _nearest_distance(prep.X, zetas.reshape(-1, zetas.shape[-1])).reshape(len(bases),
                                                                                len(ds))
    trig = np.einsum("bjd,d->bj", zetas - prep.X[bases][:, None], prep.trigger_direction)
    return dict(distance_over_l=ds, measured_distance_over_l=dist / ell,
                trigger_norm_over_l=trig / ell, base_index=bases, efficacy=eff,
                relative=rel, kappa_half=kh, kappa_half_median=median_half(kh))


def median_half(kh):
    """Per distance, the median over base images of kappa_half (None: never, counted
    as above every kappa); None when the median is never."""
    out = []
    for col in zip(*kh):
        v = np.sort([np.inf if h is None else h for h in col])
        med = float(np.median(v))
        out.append(None if not np.isfinite(med) else med)
    return out


def near_clean_poisons(prep, cfg):
    """m distinct triggered clean non-target images, label y_t; and their distances to
    the nearest clean point in units of l."""
    trigger = prep.x0 - prep.sc.x0_clean
    idx = base_images(prep, cfg, cfg.m)
    P = prep.X[idx] + trigger[None]
    Xp = np.vstack([prep.X, P])
    yp = np.r_[prep.y, np.full(len(P), cfg.y_target)]
    return Xp, yp, dict(base_index=idx, trigger_norm_over_l=float(np.linalg.norm(trigger)
                                                                  / prep.ell),
                        poison_distance_over_l=_nearest_distance(prep.X, P) / prep.ell)


def frontier_extras(fp_t, fc_t, acc, yte) -> dict:
    """Margin ratio, chance and the collapse flag (module docstring)."""
    ratio = (fp_t - fc_t) / np.maximum(np.abs(fc_t), 1e-300)
    chance = float(max(np.mean(yte > 0), np.mean(yte <= 0)))
    acc = np.asarray(acc, float)
    return dict(margin_ratio=np.median(ratio, axis=-1),
                margin_ratio_of_means=(fp_t - fc_t).mean(-1) / np.abs(fc_t).mean(-1),
                chance=chance, collapsed=acc <= chance + COLLAPSE_POINTS)


def crop_flip_sets(sc_pixel, reduce, m, y_target, copies, pad, seed):
    """Real augmentation for the frontier's crop + flip arm: the poisoned set (clean
    images then m clones of the pixel-space zeta, label y_t) and the clean set, each
    followed by ``copies`` random crop (zero-pad ``pad``, crop back) + horizontal-flip
    copies (``nets.augment_flip_crop``) made in PIXEL space, then mapped by the same
    ``reduce`` (the PCA reduction fitted on the clean images). The trigger of an
    augmented poison is shifted and flipped with it. Returns ``(Xp, yp, X, y)``."""
    import jax
    from ntk_poison import nets
    X = np.asarray(sc_pixel.X, np.float64)
    side = int(round(np.sqrt(X.shape[1])))
    Xp = np.vstack([X, np.repeat(np.asarray(sc_pixel.zeta, np.float64)[None], m, 0)])
    yp = np.r_[sc_pixel.y, np.full(m, y_target)]
    keys = jax.random.split(jax.random.key(seed), 2 * copies)

    def augmented(A, ks):
        imgs = A.reshape(len(A), side, side, 1)
        return np.vstack([A] + [np.asarray(nets.augment_flip_crop(kk, imgs, pad),
                                           np.float64).reshape(len(A), -1) for kk in ks])

    return (reduce(augmented(Xp, keys[:copies])), np.tile(yp, copies + 1),
            reduce(augmented(X, keys[copies:])), np.tile(np.asarray(sc_pixel.y), copies + 1))
