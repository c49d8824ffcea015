"""Tests for ntk_poison.floor: the radial and angular parts of the spike factor
against closed forms (Euler's identity for homogeneous kernels, the linear kernel),
finite differences of the numpy arc-cosine NTK, and the Taylor expansion of a smooth
normalised kernel (the r^2 law as a theorem, checked analytically)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_poison import floor, kernels
from oracles import arccos
from oracles import finite_diff as fd


def test_linear_kernel_spike_factor_and_radial_part_closed_form(rng):
    """k = x . z: grad_x k = z, so R_k = |z|^2 / (x0.z)^2 and the radial part
    (z . x0/|x0|)^2 / (x0.z)^2 = 1/|x0|^2."""
    x0 = rng.standard_normal(6)
    Z = x0 + 0.3 * rng.standard_normal((4, 6))
    p = floor.spike_parts(kernels.linear(), x0, Z)
    np.testing.assert_allclose(p["R_k"], np.sum(Z ** 2, 1) / (Z @ x0) ** 2, rtol=1e-12)
    np.testing.assert_allclose(p["radial"], 1.0 / np.sum(x0 ** 2), rtol=1e-12)
    assert floor.radial_spike_factor(x0) == pytest.approx(1.0 / np.sum(x0 ** 2), rel=1e-15)


def test_relu_ntk_radial_floor_is_one_over_norm_squared(rng):
    """The ReLU NTK with b_std = 0 is homogeneous of degree 1 in each argument, so
    (Euler) its radial part is 1/|x0|^2 at every r, the sphere kernel carries exactly
    the rest, R_k(raw) = 1/|x0|^2 + R_k(sphere), and the normalised kernel equals the
    sphere kernel's R_k. The raw R_k itself is checked against finite differences of
    the numpy arc-cosine recursion (an independent oracle)."""
    d, depth = 8, 2
    x0 = rng.standard_normal(d)
    rs = np.array([0.3, 1e-2, 1e-4])
    Z = floor.clones_at(x0, rs, 1.0, seed=3)
    base = kernels.nt_fc(depth=depth, W_std=1.3)
    raw = floor.spike_parts(base, x0, Z)
    sph = floor.spike_parts(kernels.on_sphere(base, radius=2.0), x0, Z)
    nrm = floor.spike_parts(kernels.normalized(base), x0, Z)
    inv = 1.0 / np.sum(x0 ** 2)
    np.testing.assert_allclose(raw["radial"], inv, rtol=1e-9)
    np.testing.assert_allclose(raw["R_k"] - sph["R_k"], inv, rtol=1e-8)
    # k(x, x) of the ReLU NTK carries an O(sqrt(eps)) error (test_kernels): 1e-6
    np.testing.assert_allclose(nrm["R_k"], sph["R_k"], rtol=1e-6)
    np.testing.assert_allclose(sph["radial"], 0.0, atol=1e-12 * inv)
    # the floor: the angular part tends to c_L^2/|x0|^2 as r -> 0 (the arc-cosine cusp,
    # c_L = L/(2 pi) from the recursion), so R_k |x0|^2 -> 1 + c_L^2; O(theta) at r = 1e-4
    c2 = floor.relu_cusp_constant(depth) ** 2
    assert c2 == pytest.approx(1.0 / np.pi ** 2, rel=1e-15)
    np.testing.assert_allclose(raw["R_k"][-1] / inv, 1.0 + c2, rtol=1e-3)
    np.testing.assert_allclose(sph["R_k"][-1] / inv, c2, rtol=1e-3)
    assert abs(raw["R_k"][0] / inv - 1.0 - c2) > 1e-2          # not yet at r = 0.3
    # R_k at r = 0.3 against finite differences of the numpy NTK
    z = Z[0]
    k_np = lambda a: arccos.relu_ntk(a[None], z[None], depth, 1.3)[0, 0]  # noqa: E731
    g = fd.gradient(k_np, x0, h=1e-4)
    np.testing.assert_allclose(raw["R_k"][0], np.sum(g * g) / k_np(x0) ** 2, rtol=1e-7)


def test_erf_normalized_kernel_has_the_r2_law():
    """A smooth normalised kernel peaks at x = z (k_n <= 1 = k_n(z, z)), so
    grad_x k_n(z, z) = 0 and R_k(x0, x0 - r u) = r^2 |H u|^2 + O(r^3), H the input
    Hessian at the diagonal: the ratio to r^2 |H u|^2 tends to 1 linearly in r, and the
    log-log slope is 2 + O(r)."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal(6)
    u = rng.standard_normal(6)
    u /= np.linalg.norm(u)
    k = kernels.normalized(kernels.nt_fc(depth=1, W_std=1.2, b_std=0.3, activation="erf"))
    zj, uj = jnp.asarray(z), jnp.asarray(u)
    grad = jax.grad(lambda a: k.pair(a, zj))
    g0, Hu = jax.jit(lambda: jax.jvp(grad, (zj,), (uj,)))()   # grad and H u at x = z
    assert np.linalg.norm(np.asarray(g0)) <= 1e-12
    lead = float(jnp.sum(Hu * Hu))
    assert lead > 1e-3
    rs = np.array([1e-2, 1e-3, 1e-4])
    # x0 = z, clones at z - r u: grad_x k_n(x, z - r u)|_{x=z} = r H(z) u + O(r^2)
    R = floor.spike_parts(k, z, z[None] - rs[:, None] * u[None])["R_k"]
    dev = np.abs(R / (rs ** 2 * lead) - 1.0)
    assert np.all(dev <= 50 * rs)                  # O(r) with a generous constant
    assert dev[-1] < dev[0]                        # and shrinking
    slope = np.log(R[-1] / R[-2]) / np.log(rs[-1] / rs[-2])
    assert abs(slope - 2.0) <= 1e-2


def test_floor_sweep_and_summary(rng):
    """floor_sweep's summary against its own arrays and the closed-form radial floor,
    on the linear kernel (R_k -> 1/|x0|^2 exactly: the whole floor is radial)."""
    x0 = rng.standard_normal(5)
    rs = np.geomspace(1e-4, 1.0, 9)
    Z = floor.clones_at(x0, rs, 2.0, seed=1)
    out = floor.floor_sweep({"lin": kernels.linear()}, x0, Z, rs, 2.0)
    s = out["lin"]
    assert out["radial_floor"] == pytest.approx(4.0 / np.sum(x0 ** 2), rel=1e-14)
    assert s["floor"] == pytest.approx(s["R_k"][0])
    assert s["closed_form_share"] == pytest.approx(1.0, rel=1e-3)
    assert s["radial_share"] == pytest.approx(1.0, rel=1e-3)
    assert abs(s["slope_floor"]) < 1e-2


def test_floor_bad_inputs(rng):
    k = kernels.linear()
    with pytest.raises(ValueError, match="zero"):
        floor.spike_parts(k, np.zeros(3), rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="x0"):
        floor.spike_parts(k, rng.standard_normal((1, 3)), rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="same input space"):
        floor.spike_parts(k, rng.standard_normal(3), rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="rs"):
        floor.floor_sweep({"lin": k}, rng.standard_normal(3), rng.standard_normal((2, 3)),
                          [0.1], 1.0)
    with pytest.raises(ValueError, match="depth"):
        floor.relu_cusp_constant(0)
    with pytest.raises(ValueError, match="Kernel"):
        floor.spike_parts("linear", rng.standard_normal(3), rng.standard_normal((2, 3)))
