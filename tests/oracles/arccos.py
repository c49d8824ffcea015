"""The arc-cosine NNGP / NTK recursion of a fully connected ReLU net, in numpy.

Architecture (as :func:`ntk_poison.kernels.nt_fc` and neural-tangents ``stax``):
``depth x (Dense, Relu)`` then ``Dense``, NTK parameterisation, i.e. a Dense layer
computes ``W_std / sqrt(fan_in) * W h + b_std * b`` with standard-normal ``W, b``.

Recursion (Jacot et al. 2018; Cho & Saul 2009; Lee et al. 2019, appendix):

* input layer: ``Sigma^0(x, x') = W_std^2 x.x'/d + b_std^2``, ``Theta^0 = Sigma^0``
  (the gradient w.r.t. the first layer's W and b);
* through a ReLU, with ``(u, v) ~ N(0, [[S(x,x), S(x,x')], [S(x,x'), S(x',x')]])``
  and angle ``t = arccos(S(x,x') / sqrt(S(x,x) S(x',x')))``:

      E[relu(u) relu(v)] = sqrt(S(x,x) S(x',x')) (sin t + (pi - t) cos t) / (2 pi)
      E[relu'(u) relu'(v)] = (pi - t) / (2 pi)

* next Dense layer:

      Sigma^{l+1} = W_std^2 E[relu relu] + b_std^2
      Theta^{l+1} = Sigma^{l+1} + W_std^2 E[relu' relu'] Theta^l

After ``depth`` hidden layers and the readout, the NNGP is ``Sigma^depth`` and the
NTK ``Theta^depth``.

Identical inputs: the angle is ill-conditioned at ``t = 0`` (``arccos`` of a cosine
rounded to ``1 - eps`` is ``~sqrt(2 eps) ~ 1e-8``, and the NTK is linear in ``t``
there). Pairs of identical rows therefore use the exact ``t = 0`` values
``E[relu relu] = S/2`` and ``E[relu' relu'] = 1/2``.
"""

from __future__ import annotations

import numpy as np


def relu_kernels(x1, x2, depth, W_std=1.0, b_std=0.0):
    """``(nngp, ntk)`` Gram matrices ``(n1, n2)`` of the ReLU network described above."""
    x1 = np.asarray(x1, dtype=np.float64).reshape(len(x1), -1)
    x2 = np.asarray(x2, dtype=np.float64).reshape(len(x2), -1)
    d = x1.shape[1]
    w2, b2 = W_std ** 2, b_std ** 2
    s12 = w2 * (x1 @ x2.T) / d + b2                      # Sigma^0(x1, x2)
    s11 = w2 * np.sum(x1 * x1, axis=1) / d + b2          # Sigma^0(x1, x1) (diagonal)
    s22 = w2 * np.sum(x2 * x2, axis=1) / d + b2
    theta = s12.copy()
    same = np.all(x1[:, None, :] == x2[None, :, :], axis=-1)
    for _ in range(depth):
        norm = np.sqrt(np.outer(s11, s22))
        cos = np.clip(s12 / norm, -1.0, 1.0)
        cos = np.where(same, 1.0, cos)
        t = np.where(same, 0.0, np.arccos(cos))
        e_relu = norm * (np.sin(t) + (np.pi - t) * cos) / (2.0 * np.pi)
        e_step = (np.pi - t) / (2.0 * np.pi)
        new12 = w2 * e_relu + b2
        theta = new12 + w2 * e_step * theta
        # On the diagonal t = 0: E[relu(u)^2] = S / 2.
        s11 = w2 * s11 / 2.0 + b2
        s22 = w2 * s22 / 2.0 + b2
        s12 = new12
    return s12, theta


def relu_nngp(x1, x2, depth, W_std=1.0, b_std=0.0):
    """The NNGP kernel (``Sigma`` of the readout)."""
    return relu_kernels(x1, x2, depth, W_std, b_std)[0]


def relu_ntk(x1, x2, depth, W_std=1.0, b_std=0.0):
    """The neural tangent kernel (``Theta`` of the readout)."""
    return relu_kernels(x1, x2, depth, W_std, b_std)[1]


def erf_kernels(x1, x2, depth, W_std=1.0, b_std=0.0):
    """``(nngp, ntk)`` of ``depth x (Dense, Erf)`` then ``Dense`` (Williams 1997).

    For ``(u, v) ~ N(0, [[S11, S12], [S12, S22]])``::

        E[erf(u) erf(v)]   = (2/pi) arcsin(2 S12 / sqrt((1 + 2 S11)(1 + 2 S22)))
        E[erf'(u) erf'(v)] = (4/pi) / sqrt((1 + 2 S11)(1 + 2 S22) - 4 S12^2)

    and the same Dense-layer updates as the ReLU recursion above.
    """
    x1 = np.asarray(x1, dtype=np.float64).reshape(len(x1), -1)
    x2 = np.asarray(x2, dtype=np.float64).reshape(len(x2), -1)
    d = x1.shape[1]
    w2, b2 = W_std ** 2, b_std ** 2
    s12 = w2 * (x1 @ x2.T) / d + b2
    s11 = w2 * np.sum(x1 * x1, axis=1) / d + b2
    s22 = w2 * np.sum(x2 * x2, axis=1) / d + b2
    theta = s12.copy()

    def e_erf(a, b, c):                  # E[erf(u) erf(v)] for variances a, b, covariance c
        return 2.0 / np.pi * np.arcsin(2.0 * c / np.sqrt((1.0 + 2.0 * a) * (1.0 + 2.0 * b)))

    for _ in range(depth):
        A = np.outer(1.0 + 2.0 * s11, 1.0 + 2.0 * s22)
        e_step = 4.0 / np.pi / np.sqrt(A - 4.0 * s12 ** 2)
        new12 = w2 * e_erf(s11[:, None], s22[None, :], s12) + b2
        theta = new12 + w2 * e_step * theta
        s11 = w2 * e_erf(s11, s11, s11) + b2
        s22 = w2 * e_erf(s22, s22, s22) + b2
        s12 = new12
    return s12, theta
