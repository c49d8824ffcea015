"""benchmarks/compare_results.py: the diff behind "the refactor changes no result"."""

from __future__ import annotations

import copy
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_results as cr  # noqa: E402

OLD = {"title": "t", "started_utc": "2026-01-01", "versions": {"jax": "1"},
       "config": {"n": 3},
       "claims": [{"name": "a", "supported": True, "verdict": "supported",
                   "evidence": "slope 1.993 over 12 radii"}],
       "results": {"x": [1.0, 2.0, None], "seconds": {"total": 3.0},
                   "k": {"asr": 0.5, "label": "rbf"}}}


def test_identical_and_timings_ignored():
    new = copy.deepcopy(OLD)
    new["results"]["seconds"]["total"] = 99.0
    new["started_utc"] = "later"
    d = cr.compare(OLD, new)
    assert not d.changed and d.n_numbers == 7 and d.n_claims == 1   # 1.993, 12 in text


def test_changed_number_verdict_text_and_removed_key():
    new = copy.deepcopy(OLD)
    new["results"]["x"][1] = 2.0 * (1 + 1e-8)
    new["claims"][0]["supported"] = False
    new["claims"][0]["evidence"] = "slope 1.994 over 12 radii"
    del new["results"]["k"]["label"]
    d = cr.compare(OLD, new)
    assert d.changed
    assert sorted(n.split(":")[0] for n in d.numbers) == ["claims[a].evidence#0",
                                                           "results.x[1]"]
    assert d.verdicts == ["claim 'a': supported -> NOT supported"]
    assert d.structure == ["results.k.label: only in old", "claims[a].supported: True -> False"]
    assert not cr.compare(OLD, new, rtol=1e-7).numbers[1:]     # within a looser rtol


def test_additions_and_maps(tmp_path):
    new = copy.deepcopy(OLD)
    new["results"]["k"]["trigger_alone_asr"] = 0.1
    new["results"]["kk"] = new["results"].pop("k")
    d = cr.compare(OLD, new, maps=[("results.k", "results.kk")])
    assert not d.changed and d.added == ["results.kk.trigger_alone_asr"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(OLD))
    b.write_text(json.dumps(new))
    assert cr.main([str(a), str(b), "--map", "results.k=results.kk"]) == 0
    assert cr.main([str(a), str(b)]) == 1                        # unmapped: removed keys


def test_claims_matched_by_name_a_new_claim_is_an_addition():
    """A claim inserted in front shifts no other claim: 'a' is still compared with 'a'."""
    new = copy.deepcopy(OLD)
    new["claims"].insert(0, {"name": "b", "supported": None, "evidence": "7 of 9"})
    d = cr.compare(OLD, new)
    assert not d.changed and d.added == ["claims[b]"] and d.n_numbers == 7
    new["claims"][1]["evidence"] = "slope 1.994 over 12 radii"      # 'a', now second
    d = cr.compare(OLD, new)
    assert [n.split(":")[0] for n in d.numbers] == ["claims[a].evidence#0"]


def test_a_claim_made_a_measurement_shows_its_verdict():
    new = copy.deepcopy(OLD)
    new["claims"][0].update(supported=None, measured=True,
                            verdict="measured (no verdict: not a theorem)")
    d = cr.compare(OLD, new)
    assert d.verdicts == ["claim 'a': supported -> measured (no verdict: not a theorem)"]
