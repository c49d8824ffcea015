"""benchmarks/train_bench.py: the quick mode runs and writes a well-formed JSON; the
blocked kernel evaluation of case 4 equals the unblocked kernel."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import train_bench  # noqa: E402  (its _common import switches x64 on, as conftest does)

from ntk_poison import kernels  # noqa: E402


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_bench") / "train_bench.json"
    rc = train_bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    with open(out) as f:
        return rc, json.load(f)


@pytest.mark.slow
def test_quick_run_writes_every_case(quick):
    rc, res = quick
    assert rc == 0
    assert res["benchmark"] == "train_bench" and res["mode"] == "quick"
    assert list(res["cases"]) == list(train_bench.CASES)
    for name, case in res["cases"].items():
        assert "exception" not in case, (name, case.get("exception"))
        assert "goal" in case and "goal_met" in case
    assert res["summary"] and res["machine"]["versions"]["jax"]


@pytest.mark.slow
def test_quick_ratios_are_positive_finite(quick):
    cases = quick[1]["cases"]
    tp = cases["throughput"]
    for v in list(tp["ratios"].values()) + list(tp["examples_per_second"].values()):
        assert _positive_finite(v)
    for stat in tp["ratios_cross_check"].values():
        assert all(_positive_finite(v) for v in stat.values())
    assert set(tp["timings"]) == {"train_engine", "plain_nnx", "plain_jax"}
    assert _positive_finite(cases["penalty"]["ratios"]["penalised_over_plain"])
    assert _positive_finite(cases["hvp"]["ratios"]["hvp_over_grad"])
    kvn = cases["kernel_vs_net"]
    assert list(kvn["sizes"]) == [str(n) for n in train_bench.QUICK["kvn_ns"]]
    for s in kvn["sizes"].values():
        assert _positive_finite(s["time_ratio_kernel_over_net"])
        for who in ("kernel", "net"):
            assert 0.0 <= s[who]["test_error"] <= 1.0
    for key in ("kernel_end_to_end", "net_end_to_end"):
        assert math.isfinite(kvn["scaling_exponents"][key]["all_n"])
    assert kvn["kernel_estimate"]["chosen_pool"] in train_bench.QUICK["kernel_pools"]


@pytest.mark.slow
def test_quick_hvp_matches_reverse_over_reverse(quick):
    # forward-over-reverse against reverse-over-reverse (an independent AD mode), float32
    err = quick[1]["cases"]["hvp"]["errors"]["hvp_fwd_over_rev_vs_rev_over_rev_relative"]
    assert err < 1e-4


@pytest.mark.parametrize("rows,cols", [(3, 2), (7, 5), (2, 100)])
def test_blocked_kernel_equals_unblocked(rows, cols):
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    k = kernels.rbf(1.3)
    got = np.asarray(train_bench.blocked(k, rows, cols)(x1, x2))
    want = np.asarray(k(x1, x2))
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
