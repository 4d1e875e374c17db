"""common.claims: the verdict rules (compare, combine, across_protocols), Claim, tally and the report."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from common.claims import (CATEGORIES, VERDICTS, Claim, across_protocols, combine, compare, tally,
                           write_report)

A = [1.0, 1.2, 0.9, 1.1]            # fixed numbers: A clearly lower than B
B = [1.5, 1.7, 1.4, 1.9, 1.6]


@pytest.mark.parametrize("level", [0.95, 0.99])
def test_welch_interval_matches_hand_computation(level):
    a, b = np.array(A), np.array(B)
    sa, sb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(sa + sb)
    dof = (sa + sb) ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
    diff = b.mean() - a.mean()
    half = stats.t.ppf((1 + level) / 2, dof) * se
    c = compare(A, B, level=level)
    assert (c.n_a, c.n_b) == (4, 5)
    assert c.diff == pytest.approx(diff, rel=1e-12) and c.se == pytest.approx(se, rel=1e-12)
    assert c.dof == pytest.approx(dof, rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half), rel=1e-12)
    # and scipy's own Welch test agrees on the interval for mean(B) - mean(A)
    ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(level)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_clear_win_holds_and_swapping_the_sides_flips_it():
    assert compare(A, B).verdict == "holds"
    # negative control: swapping PAM's and SGD's numbers must flip the verdict
    swapped = compare(B, A)
    assert swapped.verdict == "does not hold" and swapped.diff == pytest.approx(-compare(A, B).diff)


def test_overlapping_noisy_samples_are_inconclusive():
    c = compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert c.verdict == "inconclusive" and c.ci_low < 0 < c.ci_high


@pytest.mark.parametrize("a, b", [([1.0], [5.0]), ([1.0], [5.0, 5.1, 5.2]), ([1.0, 1.1], [5.0])])
def test_single_values_are_inconclusive(a, b):
    c = compare(a, b)
    assert c.verdict == "inconclusive" and c.diff > 0
    assert (c.se, c.dof, c.ci_low, c.ci_high) == (None, None, None, None)


def test_zero_spread_is_exact_sign():
    tiny = compare([1.0, 1.0, 1.0], [1.0 + 1e-9, 1.0 + 1e-9])
    assert tiny.verdict == "holds" and tiny.se == 0 and tiny.ci_low == tiny.ci_high == tiny.diff
    assert tiny.dof is None
    assert compare([2.0, 2.0], [1.0, 1.0]).verdict == "does not hold"
    assert compare([2.0, 2.0], [2.0, 2.0]).verdict == "inconclusive"  # an exact tie


def test_fvu_guard_applies_to_the_winner_only():
    assert compare(A, B, fvu_a=1.0, fvu_b=0.2).verdict == "uninformative"  # A would win but FVU >= 1
    assert compare(A, B, fvu_a=0.2, fvu_b=1.4).verdict == "holds"          # the loser's FVU does not matter
    assert compare(B, A, fvu_a=0.2, fvu_b=1.4).verdict == "uninformative"  # B would win but FVU >= 1
    assert compare(B, A, fvu_a=1.4, fvu_b=0.2).verdict == "does not hold"
    assert compare(A, B, fvu_a=0.999, fvu_b=0.2).verdict == "holds"
    assert compare([1.0, 2.0], [1.5, 2.5], fvu_a=2.0, fvu_b=2.0).verdict == "inconclusive"


@pytest.mark.parametrize("kwargs, name", [(dict(a=[1.0, np.nan], b=B), "a"), (dict(a=A, b=[np.inf, 1.0]), "b"),
                                          (dict(a=A, b=B, fvu_a=np.nan), "fvu_a"),
                                          (dict(a=A, b=B, fvu_b=np.inf), "fvu_b"), (dict(a=[], b=B), "a")])
def test_bad_values_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        compare(**kwargs)


@pytest.mark.parametrize("verdicts, expected", [
    (["holds", "holds"], "holds"),
    (["does not hold", "does not hold"], "does not hold"),
    (["holds", "does not hold", "inconclusive"], "mixed"),
    (["holds", "does not hold", "uninformative"], "mixed"),
    (["uninformative", "uninformative"], "uninformative"),
    (["holds", "inconclusive"], "inconclusive"),
    (["holds", "uninformative"], "inconclusive"),
    (["does not hold", "uninformative"], "inconclusive"),
    (["inconclusive"], "inconclusive"),
])
def test_combine(verdicts, expected):
    assert combine(verdicts) == expected


@pytest.mark.parametrize("verdicts", [[], ["holds", "mixed"], ["yes"]])
def test_combine_rejects_empty_and_non_setting_verdicts(verdicts):
    with pytest.raises(ValueError):
        combine(verdicts)


@pytest.mark.parametrize("verdicts, expected", [
    ({"paper": "holds", "modern-tuned": "holds"}, ("holds", False)),
    ({"paper": "mixed"}, ("mixed", False)),
    ({"paper": "holds", "modern-tuned": "does not hold"}, ("mixed", True)),
    ({"paper": "holds", "modern-tuned": "inconclusive"}, ("inconclusive", True)),
    ({"paper": "does not hold", "modern-tuned": "uninformative"}, ("inconclusive", True)),
])
def test_across_protocols(verdicts, expected):
    assert across_protocols(verdicts) == expected


def test_across_protocols_rejects_empty_and_unknown():
    for bad in ({}, {"paper": "maybe"}):
        with pytest.raises(ValueError):
            across_protocols(bad)


def claim(cid, category="paper-empirical", verdict="holds", **kw):
    fields = dict(statement=f"statement of {cid}", source="paper", ran={"seeds": 3}, numbers={"gap": 0.5},
                  rule="comparison rule")
    return Claim(cid, category, verdict=verdict, **(fields | kw))


def test_claim_validates_category_verdict_and_protocols():
    with pytest.raises(ValueError, match="category"):
        claim("x", category="empirical")
    with pytest.raises(ValueError, match="verdict"):
        claim("x", verdict="true")
    with pytest.raises(ValueError, match="protocols"):  # overall verdict must be what across_protocols gives
        claim("x", verdict="holds", protocols={"paper": "holds", "modern-tuned": "does not hold"},
              depends_on_protocol=True)
    ok = claim("x", verdict="mixed", protocols={"paper": "holds", "modern-tuned": "does not hold"},
               depends_on_protocol=True)
    assert ok.depends_on_protocol


def test_tally_counts_each_category_separately():
    claims = [claim("t1", "theory"), claim("t2", "theory"), claim("e1", verdict="does not hold"),
              claim("e2", verdict="uninformative"), claim("i1", "implementation")]
    counts = tally(claims)
    assert list(counts) == list(CATEGORIES) and all(list(c) == list(VERDICTS) for c in counts.values())
    assert counts["theory"]["holds"] == 2 and counts["implementation"]["holds"] == 1
    assert counts["paper-empirical"] == {"holds": 0, "does not hold": 1, "mixed": 0, "inconclusive": 0,
                                         "uninformative": 1}


def test_write_report_round_trip(tmp_path):
    claims = [claim("T1-identity", "theory", numbers={"agree": np.int64(20), "total": 20}),
              claim("E2-efficiency", verdict="mixed", numbers={"gap": np.float64(0.25), "per": [0.1, -0.2]},
                    protocols={"paper": "holds", "modern-tuned": "does not hold"}, depends_on_protocol=True,
                    links=["e2/ablation_fraction.png"], note="a note"),
              claim("PAM-decoder-step", "implementation")]
    commands = [{"command": "python exp.py --quick", "wall_time": 12.3, "returncode": 0}]
    write_report(tmp_path, claims, commands, {"profile": "quick", "seeds": 2})
    report = json.loads((tmp_path / "claims.json").read_text())
    assert report["profile"] == "quick" and report["seeds"] == 2 and report["commands"] == commands
    assert [c["id"] for c in report["claims"]] == ["T1-identity", "E2-efficiency", "PAM-decoder-step"]
    assert report["claims"][1]["numbers"] == {"gap": 0.25, "per": [0.1, -0.2]}
    assert report["claims"][1]["protocols"] == {"paper": "holds", "modern-tuned": "does not hold"}
    assert report["tallies"] == tally(claims)

    md = (tmp_path / "CLAIMS.md").read_text().splitlines()
    assert md[0].startswith("# ") and md[1] == ""
    tallies = md[2:5]  # the report opens with the three tallies, one per category, in this order
    assert tallies[0].startswith("- **Theory statements") and "holds: 1" in tallies[0]
    assert tallies[1].startswith("- **Paper's empirical claims**") and "mixed: 1" in tallies[1]
    assert tallies[2].startswith("- **Implementation checks") and "holds: 1" in tallies[2]
    text = "\n".join(md)
    assert "| [E2-efficiency](#e2-efficiency) statement of E2-efficiency | paper-empirical | paper: holds; " \
           "modern-tuned: does not hold | **mixed** | yes |" in text
    for c in claims:
        assert f"## {c.id}" in text
    assert "- `python exp.py --quick` (12 s)" in text


def test_write_report_rejects_non_finite_numbers(tmp_path):
    bad = claim("E2-bad", numbers={"pam": {"mean": float("nan")}})
    with pytest.raises(ValueError, match="E2-bad.*numbers.pam.mean"):
        write_report(tmp_path, [claim("ok"), bad], [], {"profile": "quick"})
    assert not (tmp_path / "claims.json").exists()


def test_between_rule_and_its_negative_control():
    from common.claims import between_verdict
    assert between_verdict(0.1, 0.2, 0.3) == "holds"
    assert between_verdict(0.0, 0.0, 0.3) == "holds"          # an exact comparator (2-D, rank 2)
    assert between_verdict(0.1, 0.35, 0.3) == "does not hold"  # the SAE worse than k-means
    assert between_verdict(0.25, 0.2, 0.3) == "does not hold"  # the SAE better than its same-rank comparator
    with pytest.raises(ValueError, match="value must be finite"):
        between_verdict(0.1, float("nan"), 0.3)


def test_convergence_rule_and_its_negative_controls():
    from common.claims import convergence_verdict
    settling = [1.0 / (1 + t) + 0.5 for t in range(40)]
    assert convergence_verdict([settling, [v * 1.1 for v in settling]]) == "holds"
    rising = list(reversed(settling))
    assert convergence_verdict([rising]) == "does not hold"                       # ends above its start
    noisy = [settling[t] * (1.03 if t % 3 == 0 and t > 0 else 1.0) for t in range(40)]
    assert convergence_verdict([noisy]) == "does not hold"                        # > 10% of epochs rise > 1%
    one_bump = list(settling)
    one_bump[20] *= 1.02
    assert convergence_verdict([one_bump]) == "inconclusive"                      # one 2% rise: neither
    still_falling = [2.0 - 0.04 * t for t in range(40)]
    assert convergence_verdict([still_falling]) == "inconclusive"                 # not settled yet
    with pytest.raises(ValueError, match="at least 2 epochs"):
        convergence_verdict([[1.0]])
