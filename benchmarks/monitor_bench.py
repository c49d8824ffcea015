"""Per-epoch cost of ``monitor.curvature_hook`` on a CNN, and one measured backdoor run.

Cases:

* ``cost``: a CNN on (28, 28, 1) inputs (conv 3x3, 32 channels, ReLU, avgpool 2; the
  same again; dense to 10 logits), float32, random parameters; the hook on m = 32
  clean + 32 triggered inputs (uniform [0, 1] images, a 3x3 additive corner patch),
  k = 3, iters = 20, labels = the model's predictions. Reported: the first call
  (compilation included), the median of warm calls with NEW parameters each call
  (a perturbed copy, as after an epoch), and the compiled-program count
  (``_hessian_top._cache_size()``), which must not grow with new parameters.
* ``backdoor``: MNIST (4000 training images, 10% carrying a 3x3 corner patch
  relabelled 0), mean-pooled to 14x14, a CNN with two 8-channel conv layers, Adam,
  4 epochs with the hook on 32 clean test images and their triggered versions
  (float32, k = 3, iters = 20), then :func:`monitor.feature_collapse` on the
  penultimate features. Reported per epoch: the AUROC of the top eigenvalue,
  the eigenvalue ratios, the overlap with the patch, and the Lanczos residual.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/monitor_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402  (switches x64 on; every array below is float32)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_poison import data, monitor, nets, train  # noqa: E402


class CNN(nnx.Module):
    """conv(ch) -> relu -> avgpool 2 -> conv(ch) -> relu -> avgpool 2 -> dense(10)."""

    def __init__(self, side: int, ch: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        f32 = jnp.float32
        self.c1 = nnx.Conv(1, ch, (3, 3), param_dtype=f32, rngs=rngs)
        self.c2 = nnx.Conv(ch, ch, (3, 3), param_dtype=f32, rngs=rngs)
        self.out = nnx.Linear((side // 4) ** 2 * ch, 10, param_dtype=f32, rngs=rngs)

    def features(self, x):
        h = nnx.avg_pool(jax.nn.relu(self.c1(x)), (2, 2), strides=(2, 2))
        h = nnx.avg_pool(jax.nn.relu(self.c2(h)), (2, 2), strides=(2, 2))
        return h.reshape(h.shape[0], -1)

    def __call__(self, x):
        return self.out(self.features(x))


def patch(side: int) -> np.ndarray:
    p = np.zeros((side, side, 1), np.float32)
    p[-4:-1, -4:-1] = 1.0
    return p


def case_cost(repeats: int):
    rs = np.random.default_rng(0)
    m, side = 32, 28
    model = CNN(side, 32)
    x_clean = rs.uniform(size=(m, side, side, 1)).astype(np.float32)
    x_trig = x_clean + patch(side)
    hook = monitor.curvature_hook(nets.apply_fn, x_clean, None, x_trig, None, patch(side),
                                  k=3, iters=20)
    versions = [jax.tree.map(lambda a, i=i: a * (1 + 1e-3 * i), model)
                for i in range(repeats + 1)]
    t0 = time.perf_counter()
    hook(versions[0], 1)
    cold = time.perf_counter() - t0
    size = monitor._hessian_top._cache_size()
    walls, cpus = [], []
    for i in range(1, repeats + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        out = hook(versions[i], i + 1)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return dict(m_clean=m, m_trig=m, k=3, iters=20, dtype="float32",
                input_shape=[side, side, 1], channels=32,
                cold_seconds=cold, warm_median_seconds=float(np.median(walls)),
                warm_seconds=walls, warm_cpu_seconds=cpus,
                compiled_after_first=size,
                compiled_after_all=monitor._hessian_top._cache_size(),
                last=dict(auroc=out["auroc"], lanczos_residual=out["lanczos_residual"]))


def case_backdoor(n_train: int, epochs: int):
    Xtr, ytr, Xte, yte = data.load("mnist")
    rs = np.random.default_rng(1)
    pick = rs.choice(Xtr.shape[0], n_train, replace=False)
    X = data.mean_pool(Xtr[pick], 2).reshape(-1, 14, 14, 1).astype(np.float32)
    Y = ytr[pick].astype(np.int32)
    side, target = X.shape[1], 0
    P = patch(side)
    n_p = n_train // 10
    X[:n_p] = np.clip(X[:n_p] + P, 0, 1)
    Y[:n_p] = target
    sel = rs.choice(np.flatnonzero(yte != target), 32, replace=False)
    x_clean = data.mean_pool(Xte[sel], 2).reshape(-1, 14, 14, 1).astype(np.float32)
    x_trig = np.clip(x_clean + P, 0, 1)
    hook = monitor.curvature_hook(nets.apply_fn, x_clean, None, x_trig, None,
                                  x_trig - x_clean, k=3, iters=20)
    cfg = train.TrainConfig(optimizer="adam", lr=1e-2, batch_size=64, epochs=epochs)
    t0 = time.perf_counter()
    params, hist = train.train(CNN(side, 8), nets.apply_fn, X, Y, cfg, hooks=[hook],
                               progress=False)
    wall = time.perf_counter() - t0
    asr = float(np.mean(np.argmax(np.asarray(params(jnp.asarray(x_trig))), 1) == target))
    acc = float(np.mean(np.argmax(np.asarray(params(jnp.asarray(x_clean))), 1)
                        == yte[sel]))
    feats = lambda a: np.asarray(params.features(jnp.asarray(a)))  # noqa: E731
    clean_idx = np.arange(n_p, n_train)[:1000]
    fc = monitor.feature_collapse(feats(X[clean_idx]), Y[clean_idx], feats(X[:n_p]),
                                  feats(x_trig), target)
    keys = ("auroc", "lam_ratio_median", "lam_ratio_mean", "overlap_mean",
            "overlap_clean_mean", "lanczos_residual")
    return dict(n_train=n_train, poison=n_p, epochs=epochs, train_wall_seconds=wall,
                attack_success=asr, clean_accuracy_32=acc,
                per_epoch={k: hist[k] for k in ("loss", "accuracy") + keys},
                feature_collapse={k: fc[k] for k in (
                    "spread", "trig_to_poison", "clean_target_to_poison",
                    "trig_to_target", "clean_other_to_poison")})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=_common.out_path("monitor_bench"))
    args = p.parse_args(argv)
    res = dict(machine=_common.machine_info(_common.REPO), load_before=_common.load_info(),
               env=_common.env_blas_vars())
    res["cost"] = case_cost(2 if args.quick else 5)
    _common.log(f"cost: {res['cost']}")
    res["backdoor"] = case_backdoor(1000 if args.quick else 4000, 2 if args.quick else 4)
    _common.log(f"backdoor: {res['backdoor']}")
    res["load_after"] = _common.load_info()
    _common.write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
