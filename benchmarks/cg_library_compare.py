"""lineax CG and matfree's pivoted Cholesky against ours (a measurement, not a test).

Neither library is a dependency: install them outside the project's venv, e.g.
``pip download lineax equinox jaxtyping wadler_lindig matfree --no-deps -d W`` then
``pip install --no-deps --target T W/*.whl`` and run
``PYTHONPATH=.:T python benchmarks/cg_library_compare.py 4000``. Same operator (the
stored float64 RBF Gram matrix of n MNIST points plus n*1e-3 I), same Nystrom
preconditioner, 10 one-hot right-hand sides (lineax: vmapped over the columns), and
the rank-r pivoted Cholesky of the same kernel. Prints one JSON line and writes
benchmarks/results/cg_library_compare.json.
"""
import sys, time, json, numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, "benchmarks")
import _common as C
import lineax as lx
from matfree import low_rank
from ntk_poison import krr, kernels, gram, linalg, metrics
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
ds = C.load_flat_dataset(n, 10)
X = jnp.asarray(ds["x_train"]); Y = jnp.asarray(np.eye(10)[ds["labels_train"]])
ls = float(metrics.median_distance(ds["x_train"]) / np.sqrt(2)); k = kernels.rbf(ls)
shift = n * 1e-3; r = krr.default_precond_rank(n)
G = gram.stored_gram(k, X, n, np.dtype(np.float64)); Kmat = G.reshape(-1, G.shape[2])[:n, :n]
B = gram.nystrom_factor(k, X, r, jax.random.PRNGKey(0)); P = linalg.low_rank_preconditioner(B, shift)
def tm(f, reps=3):
    jax.block_until_ready(f()); ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = jax.block_until_ready(f()); ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out
res = {"n": n, "rank": r}
# --- CG: ours
ours = jax.jit(lambda K, Y, P: linalg.conjugate_gradients(lambda V: K @ V + shift * V, Y, P, 1e-10, 1000))
t, (x1, it1, r1) = tm(lambda: ours(Kmat, Y, P)); res["cg_ours"] = dict(seconds=t, iterations=int(it1), residual=float(r1))
# --- CG: lineax, same operator and preconditioner, vmapped over the 10 columns
struct = jax.ShapeDtypeStruct((n,), jnp.float64)
@jax.jit
def lx_solve(K, Y, P):
    op = lx.FunctionLinearOperator(lambda v: K @ v + shift * v, struct, tags=lx.positive_semidefinite_tag)
    pre = lx.FunctionLinearOperator(lambda v: P(v[:, None])[:, 0], struct, tags=lx.positive_semidefinite_tag)
    solver = lx.CG(rtol=1e-10, atol=0.0, max_steps=1000)
    def f(y):
        sol = lx.linear_solve(op, y, solver, options={"preconditioner": pre}, throw=False)
        return sol.value, sol.stats["num_steps"]
    val, steps = jax.vmap(f, in_axes=1)(Y)
    return val.T, steps
t, (x2, st) = tm(lambda: lx_solve(Kmat, Y, P))
rr = np.linalg.norm(np.asarray(Y - (Kmat @ x2 + shift * x2)), axis=0) / np.linalg.norm(np.asarray(Y), axis=0)
res["cg_lineax"] = dict(seconds=t, iterations=np.asarray(st).tolist(), residual=float(rr.max()), max_abs_diff_vs_ours=float(jnp.abs(x2 - x1).max()))
# --- pivoted Cholesky: ours vs matfree
t, C1 = tm(lambda: gram.pivoted_cholesky_factor(k, X, r)); res["pivchol_ours_seconds"] = t
mat_el = lambda i, j: k.fn(X[i][None], X[j][None])[0, 0]
mf = jax.jit(low_rank.cholesky_partial_pivot(mat_el, nrows=n, rank=r))
t, (C2, info) = tm(lambda: mf(), reps=1); res["pivchol_matfree_seconds"] = t
res["pivchol_lowrank_diff"] = float(jnp.abs(C1 @ C1.T - C2 @ C2.T).max())
t, _ = tm(lambda: gram.nystrom_factor(k, X, r, jax.random.PRNGKey(0))); res["nystrom_ours_seconds"] = t
print(json.dumps(res))
C.write_json_atomic(C.out_path("cg_library_compare"), {"machine": C.machine_info(C.REPO),
                                                     "load": C.load_info(), **res})
