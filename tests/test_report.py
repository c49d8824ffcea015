"""ntk_poison.report: claims, measured lines (no verdict) and what is written."""

from __future__ import annotations

import json

from ntk_poison.report import Report


def test_measured_lines_have_no_verdict_and_are_not_counted(tmp_path):
    rep = Report("t", tmp_path)
    rep.claim("a theorem", "dof falls", True, "10 -> 1")
    rep.claim("a failed claim", "x", False, "no")
    rep.measurement("a measurement", "the residual against kappa", "0.6 -> 0.9")
    rep.write()
    md = (tmp_path / "report.md").read_text()
    assert "1 of 2 claims supported by the measured data (1 measured lines beside them" in md
    assert "| measured (no verdict: not a theorem) |" in md
    claims = json.loads((tmp_path / "results.json").read_text())["claims"]
    assert [c.get("measured", False) for c in claims] == [False, False, True]
    assert [c["verdict"] for c in claims] == ["supported", "NOT supported",
                                              "measured (no verdict: not a theorem)"]
    assert claims[2]["supported"] is None
