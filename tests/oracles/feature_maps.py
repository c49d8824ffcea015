"""An explicit finite feature map, and the primal solutions of the penalised objectives.

For ``k(x, x') = phi(x) . phi(x')`` the RKHS is ``{phi(.)^T w}`` with norm ``|w|``, so
every kernel-regime minimiser of THEORY.md section 3 is a finite-dimensional primal
problem in w, solved here in float64 numpy with analytic Jacobians
``J_i = d phi(x_i) / dx`` (no autodiff, no kernel derivatives, no ntk_poison):

    phi(x) = [x, sin(A x + b), |x|^2 / 2]                       (D = d + p + 1)

    J(w) = (1/2n) sum (phi_i.w - y_i)^2 + (lam/2)|w|^2 + (kappa/2n) sum P_i(w)
    output penalty: P_i = |J_i w|^2  ->  (Phi^T Phi + n lam I + kappa G) w = Phi^T y,
                                         G = sum_i J_i^T J_i
    loss penalty:   P_i = (phi_i.w - y_i)^2 |J_i w|^2   (minimised by scipy BFGS)

The restricted model minimises the output-penalty objective over
``w in span{phi(x_j)}``; it differs from the exact one only when D > n.
"""

from __future__ import annotations

import numpy as np


class TrigFeatures:
    """``phi(x) = [x, sin(A x + b), |x|^2 / 2]`` with A (p, d), b (p,)."""

    def __init__(self, A, b):
        self.A = np.asarray(A, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)

    @property
    def dim(self) -> int:
        return self.A.shape[1] + self.A.shape[0] + 1

    def phi(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.concatenate([X, np.sin(X @ self.A.T + self.b),
                               0.5 * np.sum(X * X, axis=1, keepdims=True)], axis=1)

    def jac(self, X):
        """``d phi(x_i) / dx`` for each point, ``(n, D, d)``."""
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        eye = np.broadcast_to(np.eye(d), (n, d, d))
        trig = np.cos(X @ self.A.T + self.b)[:, :, None] * self.A[None]
        return np.concatenate([eye, trig, X[:, None, :]], axis=1)

    def gram(self, X1, X2):
        return self.phi(X1) @ self.phi(X2).T

    # ------------------------------------------------------------------ models in w
    def predict(self, w, x):
        return self.phi(x) @ w

    def input_grad(self, w, x):
        return np.einsum("nDd,D->nd", self.jac(x), w)

    def grad_gram(self, X):
        """``G = sum_i J_i^T J_i``, (D, D)."""
        J = self.jac(X)
        return np.einsum("nDd,nEd->DE", J, J)

    def fit_output(self, X, y, lam, kappa):
        """The exact output-penalty minimiser (primal normal equations)."""
        P = self.phi(X)
        n = len(X)
        A = P.T @ P + n * lam * np.eye(self.dim) + kappa * self.grad_gram(X)
        return np.linalg.solve(A, P.T @ y)

    def dof(self, X, lam, kappa):
        """``tr[Phi (Phi^T Phi + n lam I + kappa G)^-1 Phi^T]``: the hat-matrix trace."""
        P = self.phi(X)
        n = len(X)
        A = P.T @ P + n * lam * np.eye(self.dim) + kappa * self.grad_gram(X)
        return float(np.trace(P @ np.linalg.solve(A, P.T)))

    def fit_restricted(self, X, y, lam, kappa):
        """The output-penalty minimiser over w in span{phi(x_j)} (w = Phi^T a)."""
        P = self.phi(X)
        n = len(X)
        basis, sv, _ = np.linalg.svd(P.T, full_matrices=False)
        basis = basis[:, sv > 1e-12 * sv[0]]
        A = P.T @ P + n * lam * np.eye(self.dim) + kappa * self.grad_gram(X)
        v = np.linalg.solve(basis.T @ A @ basis, basis.T @ (P.T @ y))
        return basis @ v

    def loss_objective(self, w, X, y, lam, kappa):
        P, J = self.phi(X), self.jac(X)
        e = P @ w - y
        g = np.einsum("nDd,D->nd", J, w)
        n = len(X)
        return float(0.5 / n * np.sum(e * e * (1.0 + kappa * np.sum(g * g, axis=1)))
                     + 0.5 * lam * w @ w)

    def output_objective(self, w, X, y, lam, kappa):
        P, J = self.phi(X), self.jac(X)
        e = P @ w - y
        g = np.einsum("nDd,D->nd", J, w)
        n = len(X)
        return float(0.5 / n * (np.sum(e * e) + kappa * np.sum(g * g)) + 0.5 * lam * w @ w)

    def loss_gradient(self, w, X, y, lam, kappa):
        """Analytic gradient of :meth:`loss_objective` in w."""
        P, J = self.phi(X), self.jac(X)
        e = P @ w - y
        g = np.einsum("nDd,D->nd", J, w)
        n = len(X)
        gg = np.sum(g * g, axis=1)
        term1 = P.T @ (e * (1.0 + kappa * gg))
        term2 = kappa * np.einsum("n,nDd,nd->D", e * e, J, g)
        return (term1 + term2) / n + lam * w

    def fit_loss(self, X, y, lam, kappa, w0=None):
        """Minimise the loss-penalty objective with scipy BFGS (analytic gradient)."""
        from scipy.optimize import minimize

        w0 = self.fit_output(X, y, lam, kappa) if w0 is None else w0
        res = minimize(self.loss_objective, w0, args=(X, y, lam, kappa),
                       jac=self.loss_gradient, method="BFGS",
                       options={"gtol": 1e-13, "maxiter": 20000})
        return res.x
