"""The finite-network regime of the matrix: the small CNN of ``nets.cnn`` trained by the
engine (``train.train``: momentum SGD, cosine schedule, cross-entropy).

Models: plain training; the loss penalty ``kappa |grad_x L|^2`` (``penalty``); random
crop plus the penalty (``penalty+aug``); EPIC as a data filter between epochs
(``defences.epic.epic_filter``, warm-up and frequency scaled from the paper's 10 and 2
epochs of 40). Detectors read penultimate-layer features of the undefended model. The
curvature is the top eigenvalue of the cross-entropy's input Hessian at the model's
predicted label (``monitor.input_hessian_top``, Lanczos). The optimal invisible poison
is the kernel regime's, transferred: the same zeta, the clone count scaled to the same
poison fraction.
"""

from __future__ import annotations

import numpy as np

from ntk_poison import attacks, monitor, nets, train
from ntk_poison.artefact import Artefact

from experiments.matrix.cells import evaluation_inputs


class NetRegime:
    name = "net"

    def __init__(self, cfg, task):
        import jax
        self.cfg = cfg
        X, y, xte, yte = task
        dt = np.float32
        self.X_img, self.y = X.astype(dt), y.astype(np.int32)
        self.C = 10
        self.eye = np.eye(self.C, dtype=dt)
        evaluation_inputs(self, cfg, xte.astype(dt), yte, lambda a: np.asarray(a, dt))
        self.model0 = nets.cnn(jax.random.PRNGKey(cfg.seed), input_shape=X.shape[1:],
                               channels=cfg.channels, depth=2, pool=2, num_outputs=self.C,
                               parameterization="standard")
        self._apply = jax.jit(nets.apply_fn)
        self._feats = jax.jit(lambda p, x: p.features(x))
        self.kernel_zeta = None        # set by the caller from the kernel regime

    def config(self, arm, epochs=None):
        cfg = self.cfg
        pen = arm in ("penalty", "penalty+aug")
        return train.TrainConfig(
            optimizer="momentum", lr=cfg.lr, momentum=0.9, weight_decay=5e-4,
            schedule="cosine", batch_size=cfg.batch_size, epochs=epochs or cfg.epochs,
            loss="xent", augment="crop" if arm == "penalty+aug" else "none", pad=cfg.pad,
            penalty="loss" if pen else "none",
            kappa=(cfg.net_kappa_aug if arm == "penalty+aug" else cfg.net_kappa) if pen
            else 0.0, seed=cfg.seed)

    # ---------------------------------------------------------------- models
    def train_arrays(self, art):
        if art is None:
            return self.X_img, self.y
        return np.asarray(art.x, np.float32), np.argmax(np.asarray(art.y), 1).astype(np.int32)

    def classes(self, Y):
        return np.asarray(Y)

    def fit(self, X, Y, arm):
        params, _ = train.train(self.model0, nets.apply_fn, X, Y, self.config(arm),
                                progress=True, desc=f"net {arm}")
        return params

    def fit_epic(self, X, Y):
        from ntk_poison.defences import epic
        warm, freq = epic.epic_schedule(self.cfg.epochs)
        base = epic.epic_filter(nets.apply_fn, X, Y, subset_size=self.cfg.epic_subset,
                                subset_freq=freq, warmup=warm, num_classes=self.C)
        last = {"keep": np.ones(len(X), bool)}

        def filt(params, epoch, keep):
            last["keep"] = np.asarray(base(params, epoch, keep), bool)
            return last["keep"]

        params, _ = train.train(self.model0, nets.apply_fn, X, Y, self.config("plain"),
                                data_filter=filt, progress=True, desc="net epic")
        return params, last["keep"]

    def predict(self, model, x):
        return np.concatenate([np.asarray(self._apply(model, x[i:i + 500]))
                               for i in range(0, len(x), 500)])

    def features(self, model, X):
        return np.concatenate([np.asarray(self._feats(model, X[i:i + 500]))
                               for i in range(0, len(X), 500)])

    def curvature(self, model, x):
        ev = monitor.input_hessian_top(nets.apply_fn, model, x, None, k=1,
                                       iters=self.cfg.probe_iters, key=self.cfg.seed)
        return np.asarray(ev[0])[:, 0]

    def loss_fn(self, model):
        from ntk_poison.attacks import deferred
        return deferred.net_pgd_loss(model, nets.apply_fn)

    # ---------------------------------------------------------------- attacks
    def attack(self, name) -> Artefact:
        cfg, X = self.cfg, self.X_img
        Y = self.eye[self.y]
        t = self.eye[cfg.target_class]
        trig = dict(cfg.trigger_objects())
        m = max(1, int(round(cfg.poison_rate * len(X))))
        if name in cfg.triggers:
            return attacks.backdoor_attack(X, Y, trig[name], t, rate=cfg.poison_rate,
                                           seed=cfg.seed, mode="replace")
        if name == "clone":
            zeta = attacks.prototype_poison(X, Y, trig["patch"], target=t)
            return attacks.clone_attack(X, Y, zeta, t, m, trigger=trig["patch"], seed=cfg.seed)
        if name == "near_clone":
            x0 = trig["patch"].apply(self.src_img[:1])[0]
            ell = float(np.median(np.linalg.norm(
                X[:200].reshape(200, -1)[:, None] - X[:200].reshape(200, -1)[None], axis=-1)))
            return attacks.near_clone_attack(X, Y, x0, cfg.near_clone_r * ell, t, m,
                                             trigger=trig["patch"], seed=cfg.seed)
        if name == "optimal":
            if self.kernel_zeta is None:
                raise ValueError("the optimal poison is transferred from the kernel regime; "
                                 "include 'kernel' in `regimes`.")
            zeta, frac = self.kernel_zeta
            mm = max(1, int(round(frac * len(X))))
            return attacks.clone_attack(X, Y, np.asarray(zeta, X.dtype).reshape(X.shape[1:]),
                                        t, mm, trigger=trig["patch"], seed=cfg.seed,
                                        meta={"attack": "optimal (kernel regime's zeta)"})
        if name == "deferred":
            from ntk_poison.attacks import deferred
            res = deferred.deferred_net(self.model0, nets.apply_fn, X, self.y,
                                        self.config("plain"), eps=cfg.deferred_eps,
                                        beta=cfg.deferred_beta, rounds=cfg.deferred_rounds,
                                        surrogate_epochs=cfg.deferred_net_epochs,
                                        delta_steps=cfg.deferred_steps, seed=cfg.seed)
            return Artefact(x=np.asarray(res.X_poisoned, X.dtype), y=Y,
                            poison_idx=np.asarray(res.rows), target=t, seed=cfg.seed,
                            meta={"attack": "deferred", "eps": cfg.deferred_eps})
        raise ValueError(f"unknown attack {name!r}")
