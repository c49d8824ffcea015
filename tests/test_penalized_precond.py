"""fit_penalized(solver="cg", preconditioner="nystrom"): the Nystrom preconditioner of
the joint system (linalg.column_nystrom) against the direct solve."""

import numpy as np
import pytest

from ntk_poison import kernels, linalg, penalized


@pytest.mark.slow
def test_nystrom_preconditioned_cg_matches_direct_with_fewer_iterations():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 3))
    y = np.sin(X[:, 0])
    k = kernels.rbf(1.7)
    ref = penalized.fit_penalized(k, X, y, 1e-3, 0.5, solver="direct")
    its = {}
    for pre in ("jacobi", "nystrom"):
        m = penalized.fit_penalized(k, X, y, 1e-3, 0.5, solver="cg", preconditioner=pre,
                                    precond_rank=60, tol=1e-11)
        its[pre] = dict(m.info)["iterations"]
        x = X[:5] + 0.1
        np.testing.assert_allclose(np.asarray(m.predict(x)), np.asarray(ref.predict(x)),
                                   atol=1e-8)
    assert its["nystrom"] < its["jacobi"] / 2


def test_column_nystrom_is_exact_at_full_rank():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((12, 12))
    A = A @ A.T
    P = linalg.column_nystrom(lambda V: A @ V + 0.5 * V, np.arange(12), 12, np.float64,
                              0.5, chunk=5)
    V = rng.standard_normal((12, 2))
    np.testing.assert_allclose(np.asarray(P(V)), np.linalg.solve(A + 0.5 * np.eye(12), V),
                               rtol=1e-8)


def test_bad_preconditioner():
    X = np.zeros((3, 2)) + np.arange(3)[:, None]
    with pytest.raises(ValueError, match="preconditioner"):
        penalized.fit_penalized(kernels.rbf(1.0), X, np.ones(3), 1e-3, 0.5, solver="cg",
                                preconditioner="ilu")
