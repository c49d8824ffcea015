"""The training engine side by side: throughput, the penalty's cost, input HVPs, kernel vs net.

Cases (see ``--help``); the networks are the small CNN of ``nets.CNN`` (contract
defaults: 28x28x1 inputs, 2 x [Conv(32, 3x3, SAME), ReLU, AvgPool(2)], Flatten,
Dense(10)), standard parameterisation, float32; the kernels are float64.

1. ``throughput``: examples per second of ``train.train`` (progress off; SGD with
   heavy-ball momentum 0.9, lr 0.05, batch 128, cross-entropy) against the loop a user
   would write with Flax nnx and optax, on the same model, data and number of steps:

   * ``plain_nnx``: ``nnx.Optimizer`` and an ``@nnx.jit`` train step (``nnx.value_and_grad``),
     a Python loop over minibatches of a fresh numpy permutation each epoch;
   * ``plain_jax``: the same with ``nnx.split`` once and an ``@jax.jit`` step on the
     ``(params, opt_state)`` pytrees (``nnx.merge`` inside the step).

   Every path is called once before timing (its ``cold_seconds``: tracing and XLA
   compilation; ``compile_seconds = cold - median``), then ``--repeats`` interleaved
   rounds. Goal: ``train.train`` >= 0.9x the faster plain loop. Diagnostic (one warm
   call each): the plain step inside a jitted ``lax.scan`` over the epoch, as
   ``train.train`` runs it, rolled and unrolled (XLA:CPU runs convolutions inside a
   while-loop body much more slowly: jax-ml/jax#12868).
2. ``penalty``: one epoch of ``train.train`` with the input-gradient penalty
   (``penalty="loss"``, ``kappa=1``: double backprop) against the same epoch without it.
   Goal: time ratio <= 3.
3. ``hvp``: the Hessian-vector product ``H_x v`` of the per-example cross-entropy loss
   w.r.t. the input image (forward-over-reverse, ``jvp`` of ``grad``), ``vmap``-ed over a
   batch of 32 and jitted, against the input gradient ``grad_x L`` of the same batch.
   Each timed call runs the jitted function ``inner`` times (same inputs) and blocks
   on the last output. Cross-check (untimed): the HVP equals reverse-over-reverse
   (``grad`` of ``<grad_x L, v>``). Goal: ratio <= 4.
4. ``kernel_vs_net``: for n MNIST training points (10 classes; the first n) and the
   first 1000 test images: (a) NTK kernel ridge regression with the CNN's analytic
   kernel (``nets.CNN(..., parameterization="ntk").kernel("ntk")``) via ``krr.fit`` on
   one-hot targets (relative ridge 1e-3 x the mean of k(x_i, x_i)) and ``predict`` on
   the test set, and (b) the
   standard CNN trained for 10 epochs by case 1's plain ``jax.jit`` loop (not
   ``train.train``, whose scanned epoch is ~10x slower on XLA:CPU: see case 1).
   Reported per n: time (wall, one run each: compilation included, which is what a
   user waits for; the network's warm time, i.e. median warm epoch x epochs, is
   reported too) and test error, and
   the log-log slopes of time against n (``metrics.loglog_slope``) over all n and
   over the two largest. The analytic kernel of a pooling CNN needs the full spatial
   covariance (``(H W)^2`` entries per pair of images), so its cost is first
   *estimated*: the Gram of a few images is timed at each candidate input size
   (28x28, then 2x2, 4x4 and 7x7 mean-pooled: 14x14, 7x7, 4x4) and extrapolated as
   n^2 (pairs) to the whole case; the first size whose estimate fits
   ``--kernel-budget`` seconds is used (else the smallest), and the JSON says which
   (``kernel_input``) and why. The network always
   trains on the full 28x28 images. The kernel is evaluated in row/column blocks
   (``lax.map``) so that its intermediates fit in memory.

Usage::

    .venv/bin/python benchmarks/train_bench.py --blas-threads 1   # full run (README)
    .venv/bin/python benchmarks/train_bench.py --quick            # small smoke run

Results go to ``--out`` (JSON, written atomically) and a table is printed.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (switches x64 on; the networks are float32 explicitly)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ntk_poison import data, kernels, krr, metrics, nets, train  # noqa: E402

DEFAULT_OUT = C.out_path("train_bench")
CASES = ("throughput", "penalty", "hvp", "kernel_vs_net")

#: the contract's CNN (input shape added per case)
CNN_ARCH = dict(channels=32, depth=2, filter_size=3, pool=2, hidden=0, num_outputs=10)
FULL = dict(cnn=CNN_ARCH, batch=128, scan_diagnostic=True, tp_n=1024, tp_epochs=1,
            pen_n=384, pen_epochs=1, hvp_batch=32, hvp_inner=20,
            kvn_ns=(500, 1000, 2000, 4000), kvn_test=1000, kvn_epochs=10,
            kernel_pools=(1, 2, 4, 7), kernel_probe=4, kernel_block_mb=256)
#: smoke sizes (tests/test_train_bench.py): a 1-layer, 4-channel CNN without pooling
#: (its kernel needs only the spatial diagonal: quick to compile); no scan diagnostic
QUICK = dict(cnn=dict(CNN_ARCH, channels=4, depth=1, pool=1), batch=16,
             scan_diagnostic=False, tp_n=32, tp_epochs=1, pen_n=32, pen_epochs=1,
             hvp_batch=4, hvp_inner=2, kvn_ns=(16, 32), kvn_test=16, kvn_epochs=1,
             kernel_pools=(4,), kernel_probe=2, kernel_block_mb=1024)

LR, MOMENTUM = 0.05, 0.9
#: the plain loops' optimiser, built once: it is static in their compiled steps
#: (nnx.Optimizer keeps it in its graph definition), so a new one would recompile
PLAIN_TX = optax.sgd(LR, momentum=MOMENTUM)
KAPPA = 1.0
RIDGE = 1e-3
SEED = 0
GOAL_THROUGHPUT = 0.9         # train.train / plain loop throughput >= 0.9
GOAL_PENALTY = 3.0            # penalised / plain epoch time <= 3
GOAL_HVP = 4.0                # HVP / input gradient time <= 4
GOAL_RULE = ("The headline ratio is the median wall time; the goal is judged on the "
             "least favourable of the median-wall, min-wall and median-CPU ratios "
             "(ratios_cross_check), so that load from other processes during one path's "
             "repeats cannot make it pass by luck.")


# =========================================================================== set-up

def load_images(n_train: int, n_test: int) -> Dict[str, Any]:
    """The first ``n_train`` / ``n_test`` MNIST images ``(n, 28, 28, 1)`` float32 in
    [0, 1] and int32 labels; a deterministic uniform random stand-in (said so in
    ``source``) if MNIST cannot be loaded."""
    try:
        xtr, ytr, xte, yte = data.load("mnist", flatten=False, dtype=np.float32)
        if len(xtr) < n_train or len(xte) < n_test:
            raise ValueError(f"mnist has only {len(xtr)}/{len(xte)} points")
        out = dict(x_train=xtr[:n_train], y_train=ytr[:n_train], x_test=xte[:n_test],
                   y_test=yte[:n_test], source="ntk_poison.data.load('mnist', "
                   "flatten=False)", fallback_reason=None)
    except Exception as e:
        rng = np.random.default_rng(SEED)
        out = dict(x_train=rng.random((n_train, 28, 28, 1), dtype=np.float32),
                   y_train=rng.integers(0, 10, n_train),
                   x_test=rng.random((n_test, 28, 28, 1), dtype=np.float32),
                   y_test=rng.integers(0, 10, n_test),
                   source=f"deterministic random uniform[0,1], default_rng({SEED})",
                   fallback_reason=f"{type(e).__name__}: {e}")
    for k in ("y_train", "y_test"):
        out[k] = np.asarray(out[k]).astype(np.int32)
    return out


def standard_cnn(cfg: Dict[str, Any], input_shape=(28, 28, 1), seed: int = SEED):
    """The benchmark's network: ``nets.CNN`` in the standard parameterisation, float32."""
    return nets.CNN(input_shape=input_shape, **cfg["cnn"], parameterization="standard",
                    rngs=nnx.Rngs(params=jax.random.key(seed)), dtype=jnp.float32)


def train_config(cfg: Dict[str, Any], epochs: int, **kw) -> train.TrainConfig:
    return train.TrainConfig(optimizer="momentum", lr=LR, momentum=MOMENTUM,
                             batch_size=cfg["batch"], epochs=epochs, seed=SEED, **kw)


def mean_xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


@jax.jit
def _eval_logits(model, x):
    return nets.apply_fn(model, x)


def eval_loss(model, x, y) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)`` (the paths' sanity check)."""
    return float(mean_xent(_eval_logits(model, jnp.asarray(x)), jnp.asarray(y)))


def test_error(logits, labels) -> float:
    """The fraction of test points whose argmax is not the label."""
    return float(1.0 - metrics.clean_accuracy(np.asarray(logits), np.asarray(labels),
                                              multiclass=True))


# =========================================================================== case 1

@nnx.jit
def _nnx_step(model, optimizer, x, y):
    """The plain nnx train step a user would write."""
    def loss_fn(m):
        return mean_xent(m(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jax_step(graphdef, tx, params, opt_state, x, y):
    """The plain jax.jit train step on the split (params, opt_state) pytrees."""
    def loss_fn(p):
        return mean_xent(nnx.merge(graphdef, p)(x), y)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def plain_nnx_loop(model0, X: np.ndarray, Y: np.ndarray, batch: int, epochs: int,
                   seed: int = SEED):
    """SGD-momentum training with nnx.Optimizer and an @nnx.jit step over numpy batches."""
    model = nnx.clone(model0)
    optimizer = nnx.Optimizer(model, PLAIN_TX, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    for _ in range(epochs):
        perm = rng.permutation(len(X))
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            _nnx_step(model, optimizer, X[idx], Y[idx])
    return model


def plain_jax_loop(model0, X: np.ndarray, Y: np.ndarray, batch: int, epochs: int,
                   seed: int = SEED, on_epoch: Optional[Callable[[Any], None]] = None):
    """The same with nnx.split once and an @jax.jit step on the state pytrees.
    ``on_epoch(params)``, if given, is called after each epoch (e.g. to block and time)."""
    tx = PLAIN_TX
    graphdef, params = nnx.split(model0)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    for _ in range(epochs):
        perm = rng.permutation(len(X))
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            params, opt_state, _ = _jax_step(graphdef, tx, params, opt_state, X[idx], Y[idx])
        if on_epoch is not None:
            on_epoch(params)
    return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jax_scan_epoch(graphdef, tx, unroll, params, opt_state, X, Y, batches):
    """One epoch of the plain jax step as a jitted ``lax.scan`` over the batches (the
    structure of train.train's epoch), with or without unrolling."""
    def body(carry, idx):
        p, s = carry
        p, s, loss = _jax_step(graphdef, tx, p, s, X[idx], Y[idx])
        return (p, s), loss

    return jax.lax.scan(body, (params, opt_state), batches, unroll=unroll)[0][0]


def plain_jax_scan(model0, X, Y, batch: int, epochs: int, unroll: bool, seed: int = SEED):
    """The plain step inside a jitted lax.scan per epoch (diagnostic of case 1)."""
    graphdef, params = nnx.split(model0)
    opt_state = PLAIN_TX.init(params)
    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    for _ in range(epochs):
        batches = jnp.asarray(rng.permutation(len(X))[:steps * batch].reshape(steps, batch))
        params = _jax_scan_epoch(graphdef, PLAIN_TX, unroll, params, opt_state, X, Y,
                                 batches)
    return params


def case_throughput(ds, cfg, repeats: int) -> Dict[str, Any]:
    n, epochs, bs = cfg["tp_n"], cfg["tp_epochs"], cfg["batch"]
    Xn, Yn = ds["x_train"][:n], ds["y_train"][:n]
    X, Y = jnp.asarray(Xn), jnp.asarray(Yn)
    model0 = standard_cnn(cfg)
    config = train_config(cfg, epochs)
    steps = epochs * (n // bs)
    fns = {
        "train_engine": lambda: nnx.state(train.train(model0, nets.apply_fn, X, Y, config,
                                                      progress=False)[0]),
        "plain_nnx": lambda: nnx.state(plain_nnx_loop(model0, Xn, Yn, bs, epochs)),
        "plain_jax": lambda: nnx.state(plain_jax_loop(model0, Xn, Yn, bs, epochs)),
    }
    tm = C.time_group(fns, repeats, log=C.log)
    # Diagnostic (one warm call each): the plain step inside a jitted lax.scan over the
    # epoch, as train.train runs it, rolled and unrolled: separates the cost of XLA:CPU
    # while loops (convolutions in a loop body run much slower: jax-ml/jax#12868) from
    # the rest of the engine.
    diag = {}
    for unroll in ((False, True) if cfg["scan_diagnostic"] else ()):
        name = "plain_jax_scan" + ("_unrolled" if unroll else "")
        diag[name] = C.time_repeats(name, lambda u=unroll: plain_jax_scan(
            model0, X, Y, bs, epochs, u), 1, log=C.log).as_dict()
        diag[name]["examples_per_second"] = steps * bs / diag[name]["median_seconds"]
    graphdef = nnx.graphdef(model0)
    m_eval = min(n, 1024)
    losses = {k: eval_loss(nnx.merge(graphdef, t.output), Xn[:m_eval], Yn[:m_eval])
              for k, t in tm.items()}
    examples = steps * bs
    thr = {k: examples / t.median for k, t in tm.items()}
    pairs = {"engine_over_plain_nnx": ("plain_nnx", "train_engine"),
             "engine_over_plain_jax": ("plain_jax", "train_engine")}
    cross = C.ratios_by_statistic(tm, pairs)           # plain time / engine time
    ratios = {k: C.ratio(tm[b].median, tm[a].median) for k, (b, a) in pairs.items()}
    best_plain = "plain_nnx" if tm["plain_nnx"].median <= tm["plain_jax"].median \
        else "plain_jax"
    key = f"engine_over_{best_plain}"
    worst = C.least_favourable(cross, [key], higher_is_better=True)
    return {
        "description": "training throughput (examples/s): train.train vs plain nnx/optax "
                       "loops, same model, data, optimiser and number of steps",
        "params": {"n_train": n, "epochs": epochs, "batch_size": bs, "steps": steps,
                   "examples_per_call": examples, "optimizer": f"sgd momentum {MOMENTUM}, "
                   f"lr {LR}", "loss": "softmax cross-entropy", "dtype": "float32",
                   "model": dict(cfg["cnn"], input_shape=[28, 28, 1],
                                 parameterization="standard"),
                   "engine": "train.train(model, nets.apply_fn, X, Y, TrainConfig("
                             "optimizer='momentum', ...), progress=False): one jitted "
                             "lax.scan per epoch, data on device",
                   "plain_nnx": "nnx.Optimizer + @nnx.jit step, Python loop over numpy "
                                "minibatches (numpy permutation per epoch)",
                   "plain_jax": "nnx.split once + @jax.jit step on (params, opt_state), "
                                "Python loop over numpy minibatches"},
        "timings": {k: t.as_dict() for k, t in tm.items()},
        "examples_per_second": thr,
        "compile_seconds": {k: t.cold_seconds - t.median for k, t in tm.items()},
        "ratios": ratios,
        "ratios_cross_check": cross,
        "diagnostic_scan": None if not diag else {
            "timings": diag,
            "text": "the plain jax step in a jitted lax.scan over each epoch (train.train's "
                    "structure), one warm call each, not interleaved: scan / plain_jax and "
                    "unrolled scan / plain_jax time ratios below",
            "scan_over_plain_jax": C.ratio(diag["plain_jax_scan"]["median_seconds"],
                                           tm["plain_jax"].median),
            "unrolled_scan_over_plain_jax": C.ratio(
                diag["plain_jax_scan_unrolled"]["median_seconds"], tm["plain_jax"].median)},
        "train_loss_after": {"value": losses, "on": f"the first {m_eval} training points",
                             "initial": eval_loss(model0, Xn[:m_eval], Yn[:m_eval])},
        "goal": {"text": f"train.train throughput >= {GOAL_THROUGHPUT}x the faster plain "
                         f"loop ({best_plain}). {GOAL_RULE}",
                 "ratio_median_wall": ratios[key], "ratio_least_favourable": worst,
                 "source": "issue"},
        "goal_met": bool(worst is not None and worst >= GOAL_THROUGHPUT),
    }


# =========================================================================== case 2

def case_penalty(ds, cfg, repeats: int) -> Dict[str, Any]:
    n, epochs = cfg["pen_n"], cfg["pen_epochs"]
    X, Y = jnp.asarray(ds["x_train"][:n]), jnp.asarray(ds["y_train"][:n])
    model0 = standard_cnn(cfg)
    plain = train_config(cfg, epochs)
    pen = train_config(cfg, epochs, penalty="loss", kappa=KAPPA)

    def run(config):
        return lambda: nnx.state(train.train(model0, nets.apply_fn, X, Y, config,
                                             progress=False)[0])

    tm = C.time_group({"plain": run(plain), "penalised": run(pen)}, repeats, log=C.log)
    pairs = {"penalised_over_plain": ("penalised", "plain")}
    cross = C.ratios_by_statistic(tm, pairs)
    r = C.ratio(tm["penalised"].median, tm["plain"].median)
    worst = C.least_favourable(cross, list(pairs), higher_is_better=False)
    return {
        "description": "per-epoch cost of the input-gradient penalty in train.train",
        "params": {"n_train": n, "epochs": epochs, "batch_size": cfg["batch"],
                   "steps_per_epoch": n // cfg["batch"], "penalty": "loss",
                   "kappa": KAPPA, "dtype": "float32",
                   "penalised_objective": "mean xent + kappa mean ||grad_x L_i||^2 "
                                          "(double backprop)"},
        "timings": {k: t.as_dict() for k, t in tm.items()},
        "seconds_per_epoch": {k: t.median / epochs for k, t in tm.items()},
        "compile_seconds": {k: t.cold_seconds - t.median for k, t in tm.items()},
        "ratios": {"penalised_over_plain": r},
        "ratios_cross_check": cross,
        "goal": {"text": f"penalised epoch <= {GOAL_PENALTY}x a plain one. {GOAL_RULE}",
                 "ratio_median_wall": r, "ratio_least_favourable": worst,
                 "source": "issue"},
        "goal_met": bool(worst is not None and worst <= GOAL_PENALTY),
    }


# =========================================================================== case 3

def _input_loss(graphdef, state, x, y):
    """L(x) = xent(f(x), y) for one image x (H, W, C)."""
    logits = nnx.merge(graphdef, state)(x[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@functools.partial(jax.jit, static_argnums=0)
def input_grads(graphdef, state, X, Y):
    """grad_x L(x_i) for each image of the batch (reverse mode, vmapped)."""
    g = jax.grad(_input_loss, argnums=2)
    return jax.vmap(g, in_axes=(None, None, 0, 0))(graphdef, state, X, Y)


@functools.partial(jax.jit, static_argnums=0)
def input_hvps(graphdef, state, X, Y, V):
    """H_x(x_i) v_i, forward-over-reverse: jvp of the input gradient, vmapped."""
    def one(x, y, v):
        g = lambda z: jax.grad(_input_loss, argnums=2)(graphdef, state, z, y)
        return jax.jvp(g, (x,), (v,))[1]

    return jax.vmap(one)(X, Y, V)


@functools.partial(jax.jit, static_argnums=0)
def input_hvps_rev(graphdef, state, X, Y, V):
    """The same HVP reverse-over-reverse: grad_x <grad_x L, v> (the cross-check)."""
    def one(x, y, v):
        g = lambda z: jax.grad(_input_loss, argnums=2)(graphdef, state, z, y)
        return jax.grad(lambda z: jnp.vdot(g(z), v))(x)

    return jax.vmap(one)(X, Y, V)


def _repeat(fn: Callable[[], Any], inner: int) -> Callable[[], Any]:
    def run():
        out = None
        for _ in range(inner):
            out = fn()
        return out
    return run


def case_hvp(ds, cfg, repeats: int) -> Dict[str, Any]:
    b, inner = cfg["hvp_batch"], cfg["hvp_inner"]
    model = standard_cnn(cfg)
    graphdef, state = nnx.split(model)
    X, Y = jnp.asarray(ds["x_train"][:b]), jnp.asarray(ds["y_train"][:b])
    V = jax.random.normal(jax.random.key(1), X.shape, jnp.float32)
    tm = C.time_group({
        "input_grad": _repeat(lambda: input_grads(graphdef, state, X, Y), inner),
        "hvp_fwd_over_rev": _repeat(lambda: input_hvps(graphdef, state, X, Y, V), inner),
    }, repeats, log=C.log)
    hv_rev = input_hvps_rev(graphdef, state, X, Y, V)
    pairs = {"hvp_over_grad": ("hvp_fwd_over_rev", "input_grad")}
    cross = C.ratios_by_statistic(tm, pairs)
    r = C.ratio(tm["hvp_fwd_over_rev"].median, tm["input_grad"].median)
    worst = C.least_favourable(cross, list(pairs), higher_is_better=False)
    return {
        "description": "input HVP of the xent loss (forward-over-reverse) vs the input "
                       "gradient, batch vmapped and jitted",
        "params": {"batch": b, "inner_calls_per_timed_call": inner, "dtype": "float32",
                   "input_shape": [28, 28, 1], "tangents": "standard normal, key(1)",
                   "model": "standard CNN at initialisation (key(0))"},
        "timings": {k: t.as_dict() for k, t in tm.items()},
        "seconds_per_call": {k: t.median / inner for k, t in tm.items()},
        "ratios": {"hvp_over_grad": r},
        "ratios_cross_check": cross,
        "errors": {"hvp_fwd_over_rev_vs_rev_over_rev_relative":
                   C.relative_error(tm["hvp_fwd_over_rev"].output, hv_rev)},
        "goal": {"text": f"HVP <= {GOAL_HVP}x one input gradient. {GOAL_RULE}",
                 "ratio_median_wall": r, "ratio_least_favourable": worst,
                 "source": "issue"},
        "goal_met": bool(worst is not None and worst <= GOAL_HVP),
    }


# =========================================================================== case 4

def blocked(k: kernels.Kernel, rows: int, cols: int) -> kernels.Kernel:
    """``k`` evaluated in ``rows x cols`` blocks of the Gram matrix (``lax.map`` over
    row blocks, then column blocks), so that only one block's intermediates live at a
    time. Ragged ends are padded with copies of the first point and cut off."""
    def pad_to(x, b):
        nb = -(-x.shape[0] // b)
        extra = nb * b - x.shape[0]
        if extra:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])
        return x.reshape((nb, b) + x.shape[1:])

    def row(xb, x2):                                  # (b1, *s) -> (b1, n2)
        n2 = x2.shape[0]
        if n2 <= cols:
            return k.fn(xb, x2)
        blocks = jax.lax.map(lambda yb: k.fn(xb, yb), pad_to(x2, cols))  # (nb2, b1, cols)
        return jnp.moveaxis(blocks, 0, 1).reshape(xb.shape[0], -1)[:, :n2]

    def fn(x1, x2):
        n1 = x1.shape[0]
        if n1 <= rows:
            return row(x1, x2)
        G = jax.lax.map(lambda xb: row(xb, x2), pad_to(x1, rows))      # (nb1, rows, n2)
        return G.reshape(-1, G.shape[-1])[:n1]

    return kernels.Kernel(fn, "blocked_" + k.name, k.params + (("block", (rows, cols)),),
                          k.input_rank)


def _block_sizes(side: int, budget_mb: float) -> Tuple[int, int]:
    """Square blocks whose full-spatial-covariance intermediates, (side^2)^2 float64
    entries per pair and ~8 live arrays, take about ``budget_mb``."""
    per_pair = 8 * 8 * side ** 4
    b = max(1, int(math.sqrt(budget_mb * 2 ** 20 / per_pair)))
    return b, b


def pool_images(x: np.ndarray, p: int) -> np.ndarray:
    """Mean-pool ``(n, H, W, 1)`` images by ``p x p`` blocks (``data.mean_pool``)."""
    n, H = x.shape[0], x.shape[1]
    flat = data.mean_pool(np.asarray(x).reshape(n, -1), p)
    q = H // p
    return flat.reshape(n, q, q, 1)


def _ntk_of_twin(cfg) -> kernels.Kernel:
    """The analytic NTK of the benchmark's architecture: ``model.kernel("ntk")`` of the
    NTK-parameterised 28x28 twin (``kernels.nt_cnn``). Its pools are VALID, so it also
    takes smaller (pooled) images: 7x7 -> 3x3 -> 1x1 at pool 2, depth 2."""
    twin = nets.CNN(input_shape=(28, 28, 1), **cfg["cnn"], parameterization="ntk",
                    rngs=nnx.Rngs(params=jax.random.key(SEED)))
    return twin.kernel("ntk")


def estimate_kernel(ds, cfg, budget_s: float) -> Dict[str, Any]:
    """Time the kernel's Gram of ``probe`` images at each candidate input size,
    extrapolate as (pairs) to the whole case, and pick the first size within budget."""
    ns, m, p = cfg["kvn_ns"], cfg["kvn_test"], cfg["kernel_probe"]
    pairs_total = float(sum(n * n + n * m for n in ns))
    rows = []
    chosen = None
    for pool in cfg["kernel_pools"]:
        side = 28 // pool
        k = _ntk_of_twin(cfg)
        x = jnp.asarray(pool_images(ds["x_train"][:p], pool), jnp.float64)
        wall_cold, _, _ = C.timed_call(lambda: k(x, x))
        wall, _, _ = C.timed_call(lambda: k(x, x))
        est = wall / (p * p) * pairs_total
        rows.append({"pool": pool, "input_shape": [side, side, 1], "probe_points": p,
                     "probe_gram_seconds": wall, "probe_cold_seconds": wall_cold,
                     "estimated_seconds_all_grams": est,
                     "full_covariance_bytes_per_pair": 8 * side ** 4})
        C.log(f"    kernel at {side}x{side}: {p}x{p} Gram {wall:.4f} s -> estimate "
              f"{est:.0f} s for all n")
        if est <= budget_s:
            chosen = pool
            break
    if chosen is None:
        chosen = cfg["kernel_pools"][-1]
    return {"candidates": rows, "chosen_pool": chosen, "budget_seconds": budget_s,
            "pairs_total": pairs_total,
            "rule": "time a probe x probe Gram after a warm-up call, extrapolate as "
                    "(seconds per pair) x sum_n (n^2 + n n_test); the first input size "
                    "(28x28, then mean-pooled) within the budget is used"}


def _net_run(cfg, X, Y, Xt, Yt, epochs: int) -> Dict[str, Any]:
    """Train the standard CNN with the plain jax.jit loop of case 1 (not train.train,
    whose lax.scan epoch is ~10x slower on XLA:CPU: see case 1's diagnostic) and
    classify the test set. Epoch times from a blocking per-epoch callback."""
    model0 = standard_cnn(cfg)
    marks: List[float] = []

    def on_epoch(p):
        jax.block_until_ready(p)
        marks.append(time.perf_counter())

    t0 = time.perf_counter()
    params = plain_jax_loop(model0, X, Y, cfg["batch"], epochs, on_epoch=on_epoch)
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    logits = jax.block_until_ready(_eval_logits(params, jnp.asarray(Xt)))
    t_pred = time.perf_counter() - t1
    ep = np.diff(np.concatenate([[t0], marks]))
    warm_epoch = float(np.median(ep[1:])) if len(ep) > 1 else None
    m_eval = min(len(X), 1024)
    return {"seconds_end_to_end": t_train + t_pred, "seconds_train": t_train,
            "seconds_predict_test": t_pred, "epoch_seconds": ep.tolist(),
            "seconds_train_warm_estimate": (warm_epoch * epochs if warm_epoch else None),
            "compile_seconds_estimate": (float(ep[0] - warm_epoch) if warm_epoch
                                         else None),
            "test_error": test_error(logits, Yt),
            "final_train_loss": eval_loss(params, X[:m_eval], Y[:m_eval])}


def _kernel_run(k, X, Y1h, Xt, Yt) -> Dict[str, Any]:
    """KRR with a scale-free ridge: relative ridge ``RIDGE * mean_i k(x_i, x_i)`` (the
    analytic NTK of pooled images is O(1e-3), so a fixed relative ridge would swamp it)."""
    t0 = time.perf_counter()
    ridge = RIDGE * float(jnp.mean(k.diag(X)))
    model = krr.fit(k, X, Y1h, ridge=ridge)
    jax.block_until_ready(model.alpha)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = jax.block_until_ready(model.predict(Xt))
    t_pred = time.perf_counter() - t1
    return {"seconds_end_to_end": t_fit + t_pred, "seconds_fit": t_fit,
            "seconds_predict_test": t_pred, "test_error": test_error(pred, Yt),
            "ridge_relative": ridge}


def _slopes(ns, ts) -> Dict[str, Any]:
    ok = [(n, t) for n, t in zip(ns, ts) if t is not None]
    if len(ok) < 2:
        return {"all_n": None, "largest_two_n": None}
    x, y = zip(*ok)
    return {"all_n": metrics.loglog_slope(x, y),
            "largest_two_n": metrics.loglog_slope(x[-2:], y[-2:])}


def case_kernel_vs_net(ds, cfg, kernel_budget: float) -> Dict[str, Any]:
    ns, m, epochs = cfg["kvn_ns"], cfg["kvn_test"], cfg["kvn_epochs"]
    est = estimate_kernel(ds, cfg, kernel_budget)
    pool = est["chosen_pool"]
    side = 28 // pool
    k = blocked(_ntk_of_twin(cfg), *_block_sizes(side, cfg["kernel_block_mb"]))
    Xk_all = jnp.asarray(pool_images(ds["x_train"][:max(ns)], pool), jnp.float64)
    Xk_test = jnp.asarray(pool_images(ds["x_test"][:m], pool), jnp.float64)
    Y1h_all = jnp.asarray(data.one_hot(ds["y_train"][:max(ns)], 10, dtype=np.float64))
    Xt, Yt = jnp.asarray(ds["x_test"][:m]), ds["y_test"][:m]
    sizes: Dict[str, Any] = {}
    for n in ns:
        C.log(f"  n = {n}")
        before = C.load_info()["loadavg_1_5_15"]
        kr = _kernel_run(k, Xk_all[:n], Y1h_all[:n], Xk_test, Yt)
        C.log(f"    kernel: {kr['seconds_end_to_end']:.2f} s, test error "
              f"{kr['test_error']:.3f}")
        nr = _net_run(cfg, ds["x_train"][:n], ds["y_train"][:n], Xt, Yt, epochs)
        C.log(f"    net: {nr['seconds_end_to_end']:.2f} s, test error "
              f"{nr['test_error']:.3f}")
        sizes[str(n)] = {"kernel": kr, "net": nr,
                         "time_ratio_kernel_over_net": C.ratio(kr["seconds_end_to_end"],
                                                               nr["seconds_end_to_end"]),
                         "load_before": before,
                         "load_after": C.load_info()["loadavg_1_5_15"]}
    col = lambda who, key: [sizes[str(n)][who][key] for n in ns]
    pooled = pool > 1
    return {
        "description": "NTK kernel ridge regression with the CNN's analytic kernel vs the "
                       "trained standard CNN: time and test error against n",
        "params": {
            "n_train": list(ns), "n_test": m, "classes": 10,
            "kernel": f"nets.CNN(input_shape=(28, 28, 1), {cfg['cnn']}, "
                      "parameterization='ntk').kernel('ntk') (kernels.nt_cnn; VALID "
                      f"pools, so it takes {side}x{side} images), evaluated in blocks "
                      f"{_block_sizes(side, cfg['kernel_block_mb'])} (lax.map)",
            "kernel_input": (f"MNIST mean-pooled {pool}x{pool} to {side}x{side}x1 "
                             "(the full 28x28 kernel is too slow on this CPU: see "
                             "kernel_estimate)" if pooled else "MNIST 28x28x1"),
            "kernel_input_pooled": pooled,
            "krr": f"krr.fit(k, X, one_hot(y), ridge={RIDGE} * mean diag k(X, X)) then "
                   "predict(X_test); float64; argmax decision",
            "net": f"standard CNN 28x28x1 {cfg['cnn']}, float32, trained by the plain "
                   f"jax.jit loop of case 1 (momentum {MOMENTUM}, lr {LR}, batch "
                   f"{cfg['batch']}, {epochs} epochs, xent), then logits on X_test; "
                   "argmax decision. Not train.train: its lax.scan epoch is ~10x slower "
                   "on XLA:CPU (case 1), which would make this case about the loop, "
                   "not the model",
            "timing": "one run each per n, wall clock, compilation included "
                      "(seconds_end_to_end); the net's seconds_train_warm_estimate is "
                      "its median warm epoch (epochs 2..E, blocking per-epoch "
                      "callback) x E; its compiled step has the same shapes for every n "
                      "(batch 128)"},
        "kernel_estimate": est,
        "sizes": sizes,
        "scaling_exponents": {
            "kernel_end_to_end": _slopes(ns, col("kernel", "seconds_end_to_end")),
            "net_end_to_end": _slopes(ns, col("net", "seconds_end_to_end")),
            "net_train_warm": _slopes(ns, col("net", "seconds_train_warm_estimate")),
            "method": "metrics.loglog_slope of time against n"},
        "goal": {"text": "No goal set; reported: times, test errors and scaling exponents",
                 "source": "issue"},
        "goal_met": None,
    }


# =========================================================================== driver

def _summary_rows(cases: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []

    def add(case, path, median=None, cold=None, ratio=None, ratio_is=None, extra=None,
            extra_is=None, goal=None):
        rows.append({"case": case, "path": path, "median_s": median, "cold_s": cold,
                     "ratio": ratio, "ratio_is": ratio_is, "extra": extra,
                     "extra_is": extra_is, "goal_met": goal})

    c = cases.get("throughput")
    if c and "timings" in c:
        for k, t in c["timings"].items():
            add("1 throughput" if k == "train_engine" else "", k, t["median_seconds"],
                t["cold_seconds"], extra=c["examples_per_second"][k], extra_is="examples/s")
        add("", "engine vs best plain", ratio=c["goal"]["ratio_median_wall"],
            ratio_is="plain/engine", extra=c["goal"]["ratio_least_favourable"],
            extra_is="least fav.", goal=c["goal_met"])
    c = cases.get("penalty")
    if c and "timings" in c:
        for k, t in c["timings"].items():
            add("2 penalty" if k == "plain" else "", k, t["median_seconds"],
                t["cold_seconds"])
        add("", "penalised/plain", ratio=c["ratios"]["penalised_over_plain"],
            ratio_is="time ratio", extra=c["goal"]["ratio_least_favourable"],
            extra_is="least fav.", goal=c["goal_met"])
    c = cases.get("hvp")
    if c and "timings" in c:
        for k, t in c["timings"].items():
            add("3 hvp" if k == "input_grad" else "", k, c["seconds_per_call"][k],
                t["cold_seconds"])
        add("", "hvp/grad", ratio=c["ratios"]["hvp_over_grad"], ratio_is="time ratio",
            extra=c["errors"]["hvp_fwd_over_rev_vs_rev_over_rev_relative"],
            extra_is="rel diff vs rev-rev", goal=c["goal_met"])
    c = cases.get("kernel_vs_net")
    if c and "sizes" in c:
        for n, s in c["sizes"].items():
            add(f"4 n={n}", "kernel KRR", s["kernel"]["seconds_end_to_end"],
                extra=s["kernel"]["test_error"], extra_is="test error")
            add("", "CNN", s["net"]["seconds_end_to_end"],
                ratio=s["time_ratio_kernel_over_net"], ratio_is="kernel/net",
                extra=s["net"]["test_error"], extra_is="test error")
        se = c["scaling_exponents"]
        add("4 slopes", "kernel / net (all n)", ratio=se["kernel_end_to_end"]["all_n"],
            ratio_is="kernel", extra=se["net_end_to_end"]["all_n"], extra_is="net")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = C.arg_parser(__doc__, DEFAULT_OUT, CASES)
    p.add_argument("--kernel-budget", type=float, default=180.0,
                   help="seconds the kernel Grams of case 4 may take, estimated from a "
                        "small probe; above it the kernel's inputs are mean-pooled "
                        "(default 180)")
    args, wanted = C.parse_args(p, argv, CASES)
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    n_train = max(cfg["tp_n"], cfg["pen_n"], cfg["hvp_batch"], max(cfg["kvn_ns"]))
    ds = load_images(n_train, cfg["kvn_test"])
    C.log(f"data: {ds['source']}" + (f" (fallback: {ds['fallback_reason']})"
                                     if ds["fallback_reason"] else ""))
    runners = {
        "throughput": lambda: case_throughput(ds, cfg, args.repeats),
        "penalty": lambda: case_penalty(ds, cfg, args.repeats),
        "hvp": lambda: case_hvp(ds, cfg, args.repeats),
        "kernel_vs_net": lambda: case_kernel_vs_net(ds, cfg, args.kernel_budget),
    }
    cases, failed = C.run_cases(wanted, runners)
    summary = _summary_rows(cases)
    result = C.result_record(
        "train_bench", args, cfg, cases, summary, t_start,
        kernel_budget_seconds=args.kernel_budget,
        data={"source": ds["source"], "fallback_reason": ds["fallback_reason"],
              "n_train_loaded": int(ds["x_train"].shape[0]),
              "n_test_loaded": int(ds["x_test"].shape[0]), "image_shape": [28, 28, 1]},
        timing=dict(
            warmup="cases 1-3: each path is called once before timing, on the same "
                   "shapes and config (cold_seconds: tracing and compilation "
                   "included); medians exclude it. Case 4: one run per n, compilation "
                   "included, plus the network's warm-epoch estimate",
            interleaving="cases 1-3: paths alternate round robin, the order rotated "
                         "each round",
            dtype="networks float32 (explicit; x64 is on for the kernels); kernels "
                  "float64",
            machine_note="shared 2-core machine: other processes may run at the same "
                         "time; see load_before / load_after per case and the CPU-time "
                         "cross-checks"),
        advice="compare the CPU-time and min-wall cross-checks before trusting a ratio")
    path = C.write_json_atomic(args.out, result)
    goals = "; ".join(f"{n}: {'met' if c.get('goal_met') else 'NOT met'}"
                      for n, c in cases.items() if c.get("goal_met") is not None)
    return C.finish(result, path, failed, C.format_table(
        summary, ["case", "path", "median_s", "cold_s", "ratio", "ratio_is", "extra",
                  "extra_is", "goal_met"]),
        [f"\ngoals: {goals or 'none in the cases run'}",
         f"data: {ds['source']}; repeats: {args.repeats}"])


if __name__ == "__main__":
    sys.exit(main())
