"""The input-gradient penalty objective, one definition for kernels and networks.

THEORY.md section 3. On a training set of n points, with residuals
``e_i = f(x_i) - y_i`` and input gradients ``g_i = grad_x f(x_i)``::

    J(f) = (1/2n) sum_i |e_i|^2 + (kappa/2n) sum_i P_i + (ridge/2) ||f||^2

    penalty="output":  P_i = ||grad_x f(x_i)||^2                       (linear-quadratic)
    penalty="loss":    P_i = ||grad_x L_i||^2 = ||sum_o e_io grad_x f_o(x_i)||^2
                       (the paper's; for a scalar output (f(x_i) - y_i)^2 ||grad_x f(x_i)||^2)

:func:`data_objective` is ``J`` without its ridge term, as a function of the
residuals and gradients. The kernel fits (:mod:`ntk_poison.penalized`, through the
joint functionals ``u = [f(X); grad f(X)] = Kfull c``) and the networks
(:func:`ntk_poison.nets.train`, ``||w - w0||^2`` as the ridge) both minimise it.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

Array = Any

__all__ = ["PENALTIES", "check_penalty", "penalty_sum", "data_objective",
           "joint_objective"]

#: the two input-gradient penalties (THEORY.md section 3)
PENALTIES = ("output", "loss")


def check_penalty(penalty: Any) -> str:
    """``"output"`` or ``"loss"``; a ValueError naming the choices otherwise."""
    if penalty not in PENALTIES:
        raise ValueError(f"`penalty` must be one of {PENALTIES}, got {penalty!r}: "
                         "'output' penalises ||grad_x f||^2, 'loss' ||grad_x L||^2.")
    return penalty


def penalty_sum(e: Array, g: Array, penalty: str) -> Array:
    """``sum_i P_i`` for residuals ``e (n, r)`` and input gradients ``g (n, d, r)``."""
    if penalty == "output":
        return jnp.sum(g * g)
    gl = jnp.einsum("ir,idr->id", e, g)               # grad_x L_i
    return jnp.sum(gl * gl)


def data_objective(e: Array, g: Optional[Array], kappa: Any, penalty: Optional[str]
                   ) -> Array:
    """``(1/2n) (sum_i |e_i|^2 + kappa sum_i P_i)``: J without its ridge term.

    Args:
      e: residuals ``f(x_i) - y_i``, ``(n, r)``.
      g: input gradients ``(n, d, r)`` (flattened inputs), or None when
        ``penalty`` is None (kappa = 0: the gradients are never computed).
      kappa: the penalty weight.
      penalty: ``"output"``, ``"loss"`` or None (no penalty term).
    """
    n = e.shape[0]
    if penalty is None:
        return (0.5 / n) * jnp.sum(e * e)
    pen = penalty_sum(e, g, penalty)      # traced first: the order autodiff accumulates in
    return (0.5 / n) * (jnp.sum(e * e) + kappa * pen)


def joint_objective(u: Array, Y: Array, kappa: Any, penalty: str) -> Array:
    """:func:`data_objective` of the joint functionals ``u = [f(X); grad f(X)]``
    ``(n(1+d), r)`` (rows point-major, as ``joint.joint_gram``) at targets ``Y (n, r)``."""
    n, r = Y.shape
    return data_objective(u[:n] - Y, u[n:].reshape(n, -1, r), kappa, penalty)
