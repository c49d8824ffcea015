"""The exact kernel regime of the matrix: KRR with an analytic kernel on flattened images.

The kernel is the NTK of a wide erf MLP (``nt_erf``: ``kernels.nt_fc`` with
``activation="erf"``, W_std 1.5, b_std 0.1), or the RBF / Matern kernel at the median
distance: smooth kernels, so that the loss input-Hessian exists at the training
points themselves (deferred poisoning needs it there; the ReLU NTK is not twice
differentiable at x = x').

Targets are centred one-hot rows (``scenario.centred_one_hot``; all-to-one, argmax
decisions). Models: ``krr.fit`` (plain); the output-penalty minimiser over the span of
``k(., x_j)`` (``penalized.fit_restricted``, kappa in units of l^2, l the median
pairwise distance; the exact minimiser's joint Gram has n(1 + d) rows, too many at
d = 784); the same on the training set plus one random-crop copy of every image
(penalty + augmentation); EPIC on the exact gradient distances
(``defences.epic.epic_krr``). Detectors read kernel-PCA features. The curvature is
the top eigenvalue of the dense loss input-Hessian at the model's own (centred
one-hot) label (``CurvatureDetector``'s score, by Lanczos: 0.15 s for 20 inputs
against 13 s for the dense 784 x 784 Hessians of 10 outputs, the same values).
"""

from __future__ import annotations

import numpy as np

from ntk_poison import attacks, io, kernels, krr, metrics, penalized, scenario, train
from ntk_poison.artefact import Artefact
from ntk_poison.defences import CurvatureDetector, kernel_pca_features

from experiments.matrix.cells import evaluation_inputs


def flat(A):
    A = np.asarray(A)
    return A.reshape(len(A), -1)


class KernelRegime:
    name = "kernel"

    def __init__(self, cfg, task):
        import jax
        self.cfg = cfg
        X, y, xte, yte = task                  # load_task: kernel_n_train images
        self.X_img, self.y = X.astype(np.float64), y
        self.C = 10
        self.Y = scenario.centred_one_hot(self.y, self.C)
        self.eye = scenario.centred_one_hot(np.arange(self.C), self.C)
        self.ell = metrics.median_distance(flat(self.X_img))
        self.k = kernels.get("nt_fc", depth=cfg.nt_depth, W_std=1.5, b_std=0.1,
                             activation="erf") if cfg.kernel == "nt_erf" \
            else kernels.get(cfg.kernel, length_scale=self.ell)
        self.key = jax.random.PRNGKey(cfg.seed)
        evaluation_inputs(self, cfg, xte, yte, flat)

    # ---------------------------------------------------------------- models
    def train_arrays(self, art):
        if art is None:
            return flat(self.X_img), self.Y
        return flat(art.x), np.asarray(art.y, np.float64)

    def classes(self, Y):
        return np.argmax(Y, 1)

    def fit(self, X, Y, arm):
        cfg = self.cfg
        if arm == "plain":
            return krr.fit(self.k, X, Y, ridge=cfg.ridge)
        if arm == "penalty+aug":
            imgs = X.reshape((-1,) + self.X_img.shape[1:])
            import jax
            oy, ox, fl = train.augment_draws(jax.random.fold_in(self.key, 7), len(imgs),
                                             cfg.pad, False)
            aug = np.asarray(train.apply_augment(imgs, oy, ox, fl, pad=cfg.pad))
            X, Y = np.concatenate([X, flat(aug)]), np.concatenate([Y, Y])
        return penalized.fit_restricted(self.k, X, Y, ridge=cfg.ridge,
                                        kappa=cfg.kernel_kappa * self.ell ** 2)

    def fit_epic(self, X, Y):
        from ntk_poison.defences import epic
        res = epic.epic_krr(self.k, X, Y, self.cfg.ridge, subset_size=self.cfg.epic_subset,
                            rounds=self.cfg.epic_rounds, num_classes=self.C)
        return res.model, np.asarray(res.keep, bool)

    def predict(self, model, x):
        return np.asarray(model.predict(flat(x)))

    def features(self, model, X):
        return kernel_pca_features(self.k, X, self.cfg.n_components)

    def curvature(self, model, x):
        det = CurvatureDetector(k=1, method="lanczos", tol=1e-6, max_iters=30,
                                key=self.cfg.seed)
        return det.spectrum(model, flat(x))["eigenvalues"][:, 0]

    def loss_fn(self, model):
        from ntk_poison.attacks import deferred
        return deferred.kernel_pgd_loss(model, "margin")

    # ---------------------------------------------------------------- attacks
    def attack(self, name, store_opt=None) -> Artefact:
        cfg, X, Y = self.cfg, self.X_img, self.Y
        t = self.eye[cfg.target_class]
        patch = dict(cfg.trigger_objects())["patch"]
        m = max(1, int(round(cfg.poison_rate * len(X))))
        if name in cfg.triggers:
            return attacks.backdoor_attack(X, Y, dict(cfg.trigger_objects())[name], t,
                                           rate=cfg.poison_rate, seed=cfg.seed,
                                           mode="replace")
        if name == "clone":
            zeta = attacks.prototype_poison(X, Y, patch, target=t)
            return attacks.clone_attack(X, Y, zeta, t, m, trigger=patch, seed=cfg.seed)
        if name == "near_clone":
            x0 = self.src_img[0]
            return attacks.near_clone_attack(X, Y, patch.apply(x0[None])[0],
                                             cfg.near_clone_r * self.ell, t, m,
                                             trigger=patch, seed=cfg.seed)
        if name == "optimal":
            return self._optimal(X, Y, t, m, patch)
        if name == "deferred":
            from ntk_poison.attacks import deferred
            res = deferred.deferred_kernel(self.k, flat(X), Y, cfg.ridge, eps=cfg.deferred_eps,
                                           beta=cfg.deferred_beta, steps=cfg.deferred_steps,
                                           seed=cfg.seed)
            xp = np.asarray(res.X_poisoned).reshape(X.shape)
            return Artefact(x=xp, y=Y, poison_idx=np.asarray(res.rows), target=t,
                            seed=cfg.seed, meta={"attack": "deferred",
                                                 "eps": cfg.deferred_eps,
                                                 "beta": cfg.deferred_beta})
        raise ValueError(f"unknown attack {name!r}")

    def _optimal(self, X, Y, t, m, patch):
        """The optimal invisible poison for ms = (m/2, m, 2m), and the attacker's frontier
        (efficacy, ASR, visibility by the rank-one law at the ``opt_points`` triggered
        inputs) of the clone at the triggered prototype, near clones of the prototype at
        ``frontier_r`` (units of l) and the optimised zetas; in the artefact's meta."""
        from ntk_poison.attacks import optimal
        cfg = self.cfg
        Xf = flat(X)
        xt = self.x_trig["patch"][:cfg.opt_points]
        solver = optimal.prepare(self.k, Xf, Y, cfg.ridge)
        thr = optimal.clean_threshold(self.k, Xf, Y, cfg.ridge, self.x_cal, method="lanczos")
        anchor = Xf[np.flatnonzero(self.y != cfg.target_class)[0]]
        ms = tuple(sorted({max(1, m // 2), m, 2 * m}))
        kw = dict(y_target=t, target_class=cfg.target_class, solver=solver)
        res = optimal.optimal_poison(self.k, Xf, Y, cfg.ridge, xt, anchor,
                                     radius=cfg.opt_radius, ms=ms, threshold=thr,
                                     steps=cfg.opt_steps, **kw)
        proto = flat(attacks.prototype_poison(X, Y, patch, target=t)[None])[0]
        zetas = {"clone": proto}
        for r in cfg.frontier_r:
            zetas[f"near_clone_{r:g}l"] = attacks.near_clone(proto, r * self.ell, seed=cfg.seed)
        for i, mi in enumerate(res.per_m["ms"]):
            zetas[f"optimal_m{int(mi)}"] = np.asarray(res.per_m["zeta"][i]).reshape(-1)
        front = optimal.frontier(self.k, Xf, Y, cfg.ridge, xt, ms=ms, zetas=zetas,
                                 threshold=thr, **kw)
        zeta = np.asarray(res.zeta).reshape(X.shape[1:])
        meta = {"attack": "optimal", "threshold": float(thr), "m": int(res.m),
                "asr_at_points": float(res.asr), "efficacy": float(res.efficacy),
                "visibility_max": float(np.max(res.visibility)),
                "feasible": bool(res.feasible), "frontier": front}
        return attacks.clone_attack(X, Y, zeta, t, int(res.m), trigger=patch, seed=cfg.seed,
                                    meta=io.to_jsonable(meta))
