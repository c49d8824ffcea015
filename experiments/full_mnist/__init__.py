"""Full MNIST by preconditioned CG (issue 15): 60,000 training images, 10,000 test
images, 10 classes, and the clone attack at full scale.

For each kernel (RBF at ``length_scale_factor`` times the median pairwise distance, and
the fully connected ReLU NTK on unit-norm inputs):

* **the fit**: KRR on centred one-hot targets by ``krr.fit(..., solver="cg")`` with a
  Nystrom preconditioner, the Gram matrix stored in ``gram_dtype`` (float32 at full
  scale: 14.4 GB) and products accumulated in float64; test accuracy, CG iterations
  and relative residual, wall time of fit and predict, and peak resident memory;
* **the clone attack**: m copies of ``zeta`` (the BadNets patch on the mean non-target
  training image) labelled ``target_class``. The fit solves one more right-hand side,
  ``b = (K + mu I)^-1 k(X, zeta)``, beside the targets (one CG solve), and the exact
  law of m clones at the same absolute ridge ``mu = N ridge`` is then closed form for
  every m (THEORY.md section 3, the rank-one clone law):

      f_m(x) = f_0(x) + w_m (k(x, zeta) - k(x, X) b),
      w_m = m (y_t - f_0(zeta)) / (mu + m s),   s = k(zeta, zeta) - k(X, zeta) . b,

  giving the efficacy (the target margin at zeta) and the ASR on triggered non-target
  test images for every m, beside the trigger alone (m = 0);
* **the check**: at ``refit_ms`` the model is refitted by CG on the N + m points
  (relative ridge ``mu / (N + m)``, the same absolute ridge) and compared with the law.

Run: ``NTK_POISON_MEMORY_BUDGET=18e9 ntk-poison run full_mnist --out
results/full_mnist`` (about an hour on a 2-core CPU; ``--set n_train=4000`` for a quick
look). The float32 Gram matrix of 60,000 images and the CG working set take 15.8 GiB,
over the default budget of half the RAM on a 24 GB machine, hence the variable.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ntk_poison import io, kernels, krr, triggers
from ntk_poison.config import Config as _Config
from ntk_poison.report import Report, new_figure, progress, x64_run

NAME = "full_mnist"


@dataclasses.dataclass(frozen=True)
class Config(_Config):
    """Configuration of the full-MNIST experiment (validated; saved in results.json)."""

    n_train: int = 60000            # training images (MNIST's train + validation split)
    n_test: int = 10000
    kernels: Tuple[str, ...] = ("rbf", "nt_fc")
    ridge: float = 1e-6             # relative: absolute N * ridge
    length_scale_factor: float = 0.5   # RBF l = factor * median pairwise distance
    ntk_depth: int = 2
    gram_dtype: str = "float32"     # "float32", "float64" or "blockwise"
    tol: Optional[float] = None     # CG relative residual; None: the dtype's default
    maxiter: int = 1000
    precond_rank: int = 2000
    target_class: int = 0
    patch_size: int = 4
    ms: Tuple[int, ...] = (1, 3, 10, 30, 100, 300, 1000)
    refit_ms: Tuple[int, ...] = (10, 300)   # checked by a CG refit (first kernel only)
    n_trigger: int = 1000           # triggered non-target test images for the ASR
    law_rtol: Optional[float] = None   # the law "equals" a refit: max |diff| <= this x
    # scale; None: 1e-8 with a float64 Gram, 1e-5 with a float32 one (each fit solves
    # its own float32-rounded Gram matrix: entries differ by ~6e-8 relative)
    seed: int = 0
    x64: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_min(1, "n_train", "n_test", "n_trigger", "precond_rank", "maxiter",
                       "ntk_depth", "patch_size")
        self.check_positive("ridge", "length_scale_factor")
        if self.law_rtol is not None and not self.law_rtol > 0:
            raise ValueError(f"`law_rtol` must be > 0 or None, got {self.law_rtol!r}.")
        if not self.kernels or any(k not in ("rbf", "nt_fc") for k in self.kernels):
            raise ValueError(f"`kernels` must be a non-empty subset of ('rbf', 'nt_fc'), "
                             f"got {list(self.kernels)}.")
        self.check_choice("gram_dtype", ("float32", "float64", "blockwise"))
        if not 0 <= self.target_class <= 9:
            raise ValueError(f"`target_class` must be in 0..9, got {self.target_class}.")
        for name in ("ms", "refit_ms"):
            v = list(getattr(self, name))
            if any(m < 1 for m in v) or v != sorted(set(v)):
                raise ValueError(f"`{name}` must be increasing counts >= 1, got {v}.")
        if not set(self.refit_ms) <= set(self.ms):
            raise ValueError("`refit_ms` must be a subset of `ms` (the law is checked "
                             "where it is reported).")

    @classmethod
    def quick(cls) -> "Config":
        return cls(n_train=2000, n_test=500, precond_rank=200, ms=(1, 10, 100),
                   refit_ms=(10,), n_trigger=200, gram_dtype="float64")


def load(cfg: Config):
    """MNIST in [0, 1]: the first ``n_train`` of train + validation, the first
    ``n_test`` test images, flattened, float64."""
    from ntk_poison import data
    Xtr, ytr, Xva, yva, Xte, yte = data.load("mnist", dtype=np.float64,
                                             with_validation=True)
    X = np.concatenate([Xtr, Xva]).reshape(-1, 784)[:cfg.n_train]
    y = np.concatenate([ytr, yva])[:cfg.n_train]
    if cfg.n_train > len(X) or cfg.n_test > len(Xte):
        raise ValueError(f"`n_train` <= {len(X)} and `n_test` <= {len(Xte)} (MNIST).")
    Xte = Xte.reshape(-1, 784)[:cfg.n_test]
    scale = 255.0 if X.max() > 1.5 else 1.0
    return X / scale, np.asarray(y), Xte / scale, np.asarray(yte)[:cfg.n_test]


def kernel_for(name: str, cfg: Config, X: np.ndarray):
    """The kernel and the input map: RBF on pixels at a fraction of the median
    distance (2000-image sample), or the ReLU NTK on unit-norm inputs."""
    if name == "rbf":
        rng = np.random.default_rng(cfg.seed)
        S = X[rng.choice(len(X), min(len(X), 2000), replace=False)]
        d2 = (S * S).sum(1)[:, None] + (S * S).sum(1)[None] - 2 * S @ S.T
        med = float(np.sqrt(np.median(d2[np.triu_indices(len(S), 1)])))
        return kernels.rbf(length_scale=cfg.length_scale_factor * med), (lambda a: a)
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return kernels.nt_fc(depth=cfg.ntk_depth), unit


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss, KiB), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def kernel_cell(cfg: Config, name: str, X, y, Xte, yte, zeta, Xtrig) -> dict:
    """Everything measured for one kernel (one sweep cell)."""
    import jax.numpy as jnp
    k, fmap = kernel_for(name, cfg, X)
    Z, Zte, z, Zt = fmap(X), fmap(Xte), fmap(zeta[None])[0], fmap(Xtrig)
    N, t = len(Z), cfg.target_class
    Y = np.eye(10)[y] - 0.1                       # centred one-hot
    y_t = np.eye(10)[t] - 0.1
    k_z = np.asarray(k(jnp.asarray(Z), jnp.asarray(z[None])))[:, 0]
    opts = dict(solver="cg", tol=cfg.tol, maxiter=cfg.maxiter, precond_rank=cfg.precond_rank,
                gram_dtype={"float32": jnp.float32, "float64": jnp.float64,
                            "blockwise": "blockwise"}[cfg.gram_dtype], key=cfg.seed)
    t0 = time.perf_counter()
    model = krr.fit(k, Z, np.c_[Y, k_z], cfg.ridge, **opts)   # 10 targets + b
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    F = np.asarray(model.predict(Zte))
    t_pred = time.perf_counter() - t0
    acc = float(np.mean(F[:, :10].argmax(1) == yte))
    info = model.info
    # the clone law at absolute ridge mu = N ridge, for every m
    mu = N * cfg.ridge
    Ft, Fz = np.asarray(model.predict(Zt)), np.asarray(model.predict(z[None]))[0]
    k_zz = float(np.asarray(k(jnp.asarray(z[None]), jnp.asarray(z[None])))[0, 0])
    s = k_zz - float(k_z @ np.asarray(model.alpha)[:, 10])
    r_t = np.asarray(k(jnp.asarray(Zt), jnp.asarray(z[None])))[:, 0] - Ft[:, 10]
    r_z = k_zz - Fz[10]                           # = s
    rows = []
    for m in [0, *cfg.ms]:
        w = m * (y_t - Fz[:10]) / (mu + m * s)
        f_t = Ft[:, :10] + r_t[:, None] * w[None]
        f_z = Fz[:10] + r_z * w
        rows.append(dict(m=m, efficacy=float(f_z[t] - np.delete(f_z, t).max()),
                         delta_target_at_zeta=float(f_z[t] - Fz[t]),
                         asr=float(np.mean(f_t.argmax(1) == t))))
    law = dict(Ft=Ft[:, :10], Fz=Fz[:10], r_t=r_t, r_z=r_z, s=s, mu=mu)
    return dict(kernel=name, kernel_params=dict(k.params), test_accuracy=acc, iterations=int(info.iterations),
                residual=float(info.residual), fit_seconds=t_fit, predict_seconds=t_pred,
                peak_rss_gb=peak_rss_gb(), sigma2_zeta=s, mu=mu, m_half=mu / s,
                rows=rows, law=law, n_train=N, n_test=len(Zte))


def refit_cell(cfg: Config, name: str, law: dict, m: int, X, y, zeta, Xtrig) -> dict:
    """The clone law of :func:`kernel_cell` against a CG refit on N + m points at the
    same absolute ridge (relative ``mu / (N + m)``)."""
    import jax.numpy as jnp
    k, fmap = kernel_for(name, cfg, X)
    Z, z, Zt = fmap(X), fmap(zeta[None])[0], fmap(Xtrig)
    N, t, mu = len(Z), cfg.target_class, law["mu"]
    Y = np.eye(10)[y] - 0.1
    y_t = np.eye(10)[t] - 0.1
    opts = dict(solver="cg", tol=cfg.tol, maxiter=cfg.maxiter, precond_rank=cfg.precond_rank,
                gram_dtype={"float32": jnp.float32, "float64": jnp.float64,
                            "blockwise": "blockwise"}[cfg.gram_dtype], key=cfg.seed)
    refit = krr.fit(k, np.concatenate([Z, np.repeat(z[None], m, 0)]),
                    np.concatenate([Y, np.repeat(y_t[None], m, 0)]), mu / (N + m), **opts)
    w = m * (y_t - law["Fz"]) / (mu + m * law["s"])
    law_t = law["Ft"] + law["r_t"][:, None] * w[None]
    law_z = law["Fz"] + law["r_z"] * w
    g_t, g_z = np.asarray(refit.predict(Zt)), np.asarray(refit.predict(z[None]))[0]
    return dict(m=m, max_abs_diff_triggered=float(np.abs(g_t - law_t).max()),
                max_abs_diff_zeta=float(np.abs(g_z - law_z).max()),
                scale=float(np.abs(law_t).max()), iterations=int(refit.info.iterations),
                residual=float(refit.info.residual), peak_rss_gb=peak_rss_gb())


@x64_run
def run(cfg: Config, out_dir: str | Path, *, fresh: bool = False) -> Report:
    rep = Report("ntk-poison full_mnist: KRR on all of MNIST by preconditioned CG, and "
                 "the clone attack at full scale", out_dir, cfg)
    sweep = io.Sweep(out_dir, cfg, fresh=fresh, ignore=("law_rtol",))   # verdicts only
    rep.started = sweep.started       # a resumed run writes the same results.json
    X, y, Xte, yte = load(cfg)
    mask, pattern = triggers.patch_mask((28, 28), cfg.patch_size)
    patch = lambda a: (a * (1 - mask.ravel()) + pattern.ravel() * mask.ravel())
    zeta = patch(X[y != cfg.target_class].mean(0))
    Xtrig = patch(Xte[yte != cfg.target_class][:cfg.n_trigger])
    res = {}
    for name in progress(cfg.kernels, "kernels"):
        res[name] = sweep.cell(f"kernel-{name}", lambda: kernel_cell(
            cfg, name, X, y, Xte, yte, zeta, Xtrig))
    first = cfg.kernels[0]      # the law checked by refits, after every kernel's fit
    refits = [sweep.cell(f"refit-{first}-m{m}", lambda: refit_cell(
        cfg, first, res[first]["law"], m, X, y, zeta, Xtrig))
        for m in progress(cfg.refit_ms, f"{first}: CG refits")]
    for r in res.values():
        r.pop("law")
    rep.results = dict(kernels=res, refits=refits, seconds=sweep.seconds())
    lines = ["| kernel | test accuracy | CG iterations | residual | fit (s) | predict (s) "
             "| peak RSS (GB) |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['test_accuracy']:.4f} | {r['iterations']} | "
                     f"{r['residual']:.1e} | {r['fit_seconds']:.0f} | "
                     f"{r['predict_seconds']:.0f} | {r['peak_rss_gb']:.1f} |")
        rep.measurement(f"accuracy_{name}", f"{name}: test accuracy of KRR on "
                        f"{r['n_train']} MNIST images", f"{r['test_accuracy']:.4f} "
                        f"({r['iterations']} CG iterations, relative residual "
                        f"{r['residual']:.1e}, fit {r['fit_seconds']:.0f} s)")
    lines += ["", "Clone attack (the exact law; m = 0 is the trigger alone). The change at "
              "zeta is (y_t - f_0(zeta)) m s / (mu + m s): linear in m while m << m_half = "
              "mu / s, saturated beyond (" + ", ".join(
                  f"{n}: s = {r['sigma2_zeta']:.3g}, mu = {r['mu']:.3g}, m_half = "
                  f"{r['m_half']:.3g}" for n, r in res.items()) + ").", "",
              "| m | " + " | ".join(f"{n} efficacy | {n} ASR" for n in res) + " |",
              "|---|" + "---|---|" * len(res)]
    for i, m in enumerate([0, *cfg.ms]):
        lines.append(f"| {m} | " + " | ".join(
            f"{r['rows'][i]['efficacy']:.3f} | {r['rows'][i]['asr']:.3f}"
            for r in res.values()) + " |")
    rep.text("\n".join(lines))
    for c in refits:
        rtol = cfg.law_rtol or (1e-5 if cfg.gram_dtype == "float32" else 1e-8)
        ok = c["max_abs_diff_triggered"] <= rtol * max(1.0, c["scale"])
        rep.claim(f"law_vs_refit_m{c['m']}", f"{cfg.kernels[0]}: the clone law equals a "
                  f"CG refit on N + {c['m']} points (to {rtol:g} relative)", ok,
                  f"max |difference| {c['max_abs_diff_triggered']:.1e} at the triggered "
                  f"inputs and {c['max_abs_diff_zeta']:.1e} at zeta (outputs up to "
                  f"{c['scale']:.2f}; refit: {c['iterations']} iterations, residual "
                  f"{c['residual']:.1e})")
    fig, axes = new_figure(2, 1)
    ms = [0.5, *cfg.ms]
    for name, r in res.items():
        axes[0][0].plot(ms, [q["efficacy"] for q in r["rows"]], "-o", label=name)
        axes[0][1].plot(ms, [q["asr"] for q in r["rows"]], "-o", label=name)
    for ax, lab in ((axes[0][0], "efficacy (target margin at zeta)"),
                    (axes[0][1], "ASR (triggered test images)")):
        ax.set_xscale("log")
        ax.set_xlabel("clones m (0 drawn at 0.5)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    rep.figure(fig, "clone_attack")
    rep.write()
    return rep
