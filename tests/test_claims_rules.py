"""common.experiments.claims: the verdict rules (compare, combine, across_protocols), Claim, tally and the report."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from common.experiments.claims import (CATEGORIES, SPARSITY_MARGIN, VERDICTS, Claim, across_budgets, across_protocols,
                                       cap_at_edge, combine, compare, compare_family, sparsity_family, tally,
                                       write_report)

A = [1.0, 1.2, 0.9, 1.1, 1.05]      # fixed numbers, paired by replicate: A clearly lower than B
B = [1.5, 1.7, 1.4, 1.9, 1.6]


@pytest.mark.parametrize("level", [0.95, 0.99])
def test_paired_interval_matches_hand_computation_and_scipy(level):
    d = np.array(B) - np.array(A)
    n = len(d)
    se = d.std(ddof=1) / math.sqrt(n)
    half = stats.t.ppf((1 + level) / 2, n - 1) * se
    c = compare(A, B, level=level)
    assert (c.n_a, c.n_b, c.dof) == (5, 5, 4)
    assert c.diff == pytest.approx(d.mean(), rel=1e-12) and c.se == pytest.approx(se, rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
    # scipy's paired t-test agrees on the interval and the p-value
    res = stats.ttest_rel(B, A)
    ci = res.confidence_interval(level)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert c.p == pytest.approx(res.pvalue, rel=1e-10)


def test_the_pairing_matters_a_shuffled_pairing_changes_the_interval():
    # replicate effects shared by the pair (e.g. an easy subset): paired, the small consistent gain is clear
    a = [1.00, 2.00, 3.00, 4.00, 5.00]
    b = [1.10, 2.12, 3.09, 4.11, 5.10]
    assert compare(a, b).verdict == "holds"
    shuffled = compare(a, [b[i] for i in (3, 0, 4, 1, 2)])   # negative control: the same numbers, pairs broken
    assert shuffled.verdict == "inconclusive"
    assert shuffled.ci_high - shuffled.ci_low > 10 * (compare(a, b).ci_high - compare(a, b).ci_low)


def test_unpaired_sides_are_an_error():
    with pytest.raises(ValueError, match="pair"):
        compare([1.0, 2.0, 3.0], [1.0, 2.0])


def test_clear_win_holds_and_swapping_the_sides_flips_it():
    assert compare(A, B).verdict == "holds"
    # negative control: swapping PAM's and SGD's numbers must flip the verdict
    swapped = compare(B, A)
    assert swapped.verdict == "does not hold" and swapped.diff == pytest.approx(-compare(A, B).diff)


def test_overlapping_noisy_samples_are_inconclusive():
    c = compare([1.0, 2.0, 3.0], [1.5, 1.5, 3.6])
    assert c.verdict == "inconclusive" and c.ci_low < 0 < c.ci_high


def test_single_pairs_are_inconclusive():
    c = compare([1.0], [5.0])
    assert c.verdict == "inconclusive" and c.diff > 0
    assert (c.se, c.dof, c.ci_low, c.ci_high, c.p) == (None, None, None, None, None)


def test_zero_spread_is_exact_sign():
    tiny = compare([1.0, 1.0, 1.0], [1.0 + 1e-9] * 3)
    assert tiny.verdict == "holds" and tiny.se == 0 and tiny.ci_low == tiny.ci_high == tiny.diff
    assert tiny.dof is None and tiny.p == 0
    assert compare([2.0, 2.0], [1.0, 1.0]).verdict == "does not hold"
    tie = compare([2.0, 2.0], [2.0, 2.0])
    assert tie.verdict == "inconclusive" and tie.p == 1  # an exact tie


def test_both_sides_must_be_informative():
    # negative controls: a win over (or by) a model no better than the mean is no evidence
    assert compare(A, B, fvu_a=1.0, fvu_b=0.2).verdict == "uninformative"
    assert compare(A, B, fvu_a=0.2, fvu_b=1.4).verdict == "uninformative"   # the loser's FVU >= 1 too
    assert compare(B, A, fvu_a=0.2, fvu_b=1.4).verdict == "uninformative"
    assert compare(B, A, fvu_a=1.4, fvu_b=0.2).verdict == "uninformative"
    assert compare(A, B, fvu_a=0.999, fvu_b=0.5).verdict == "holds"
    assert compare([1.0], [2.0], fvu_a=0.5, fvu_b=1.5).verdict == "uninformative"


def test_holm_correction_matches_a_hand_computation():
    # three settings with p-values ~0.004, ~0.02 and ~0.03: alone each holds at 0.05; Holm decides the first
    # (0.004 <= 0.05/3), the second (0.02 <= 0.05/2) and the third (0.03 <= 0.05/1)
    rng = np.random.default_rng(0)
    settings = []
    for shift in (0.9, 0.5, 0.45):
        a = rng.normal(0, 0.3, 5)
        settings.append(dict(a=a.tolist(), b=(a + shift + rng.normal(0, 0.3, 5)).tolist()))
    plain = [compare(s["a"], s["b"]) for s in settings]
    ps = [c.p for c in plain]
    fam = compare_family(settings)
    order = np.argsort(ps)
    alive = True
    for rank, i in enumerate(order):
        thresh = 0.05 / (3 - rank)
        alive = alive and ps[i] <= thresh
        expected = ("holds" if plain[i].diff > 0 else "does not hold") if alive else "inconclusive"
        assert fam[i].verdict == expected
        assert fam[i].level == pytest.approx(1 - thresh)
        half = stats.t.ppf(1 - thresh / 2, 4) * plain[i].se
        assert (fam[i].ci_low, fam[i].ci_high) == pytest.approx((plain[i].diff - half, plain[i].diff + half))


def test_holm_stops_marginal_settings_that_hold_alone():
    # negative control: a setting with p in (0.05/2, 0.05) holds alone but not in a family of two
    a = [0.0, 0.0, 0.0, 0.0, 0.0]
    strong = dict(a=a, b=[1.0, 1.1, 0.9, 1.05, 0.95])
    z = np.array([1.0, -1.0, 0.5, -0.5, 0.0])
    z = (z - z.mean()) / z.std(ddof=1)
    d = stats.t.isf(0.035 / 2, 4) / math.sqrt(5) + z          # differences with p = 0.035 exactly
    marginal = dict(a=a, b=d.tolist())
    assert compare(marginal["a"], marginal["b"]).p == pytest.approx(0.035)
    assert compare(marginal["a"], marginal["b"]).verdict == "holds"
    # with a strong setting first, Holm's second step tests at 0.05 / 1: the marginal one still holds
    fam = compare_family([strong, marginal])
    assert fam[0].verdict == "holds" and fam[1].verdict == "holds"
    # two marginal settings: the smaller p must be <= 0.05 / 2, and is not: neither is decided
    fam = compare_family([marginal, dict(marginal)])
    assert [c.verdict for c in fam] == ["inconclusive", "inconclusive"]


def test_uninformative_settings_are_not_tested_in_the_family():
    fam = compare_family([dict(a=A, b=B, fvu_a=1.2, fvu_b=0.3), dict(a=A, b=B)])
    assert fam[0].verdict == "uninformative" and fam[1].verdict == "holds" and fam[1].level == 0.95  # m = 1


def test_sparsity_needs_fidelity():
    l0_pam, l0_sgd = [20.0, 21.0, 19.5, 20.5, 20.2], [30.0, 31.0, 29.0, 30.5, 30.1]
    mse_sgd = [0.10, 0.11, 0.10, 0.12, 0.105]
    close = [m * 1.01 for m in mse_sgd]
    twice = [m * 2.0 for m in mse_sgd]
    ok = dict(l0_a=l0_pam, l0_b=l0_sgd, mse_a=close, mse_b=mse_sgd, fvu_a=0.3, fvu_b=0.3)
    assert sparsity_family([ok])[0] == ["holds"]
    # negative control: sparser at twice the error does not hold
    bad = dict(ok, mse_a=twice)
    assert sparsity_family([bad])[0] == ["does not hold"]
    # not sparser: the L0 verdict decides
    assert sparsity_family([dict(ok, l0_a=l0_sgd, l0_b=l0_pam)])[0] == ["does not hold"]
    assert sparsity_family([dict(ok, fvu_a=1.4)])[0] == ["uninformative"]
    assert SPARSITY_MARGIN == 0.05


def test_edge_cap_and_budget_rule():
    assert cap_at_edge("holds", True) == "inconclusive" and cap_at_edge("does not hold", True) == "inconclusive"
    assert cap_at_edge("holds", False) == "holds" and cap_at_edge("uninformative", True) == "uninformative"
    assert across_budgets({"8": "holds", "32": "holds"}) == ("holds", True)
    # negative control: a budget disagreement is never stable
    assert across_budgets({"8": "holds", "32": "inconclusive"}) == ("inconclusive", False)
    assert across_budgets({"8": "holds", "32": "does not hold"}) == ("mixed", False)
    with pytest.raises(ValueError):
        Claim(id="x", category="paper-empirical", statement="s", source="s", ran={}, numbers={}, rule="r",
              verdict="holds", budgets={"8": "holds", "32": "inconclusive"}, budget_stable=True)


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
    claims = [claim("t1", "identity"), claim("t2", "identity"), claim("e1", verdict="does not hold"),
              claim("e2", verdict="uninformative"), claim("i1", "implementation")]
    counts = tally(claims)
    assert list(counts) == list(CATEGORIES) and all(list(c) == list(VERDICTS) for c in counts.values())
    assert counts["identity"]["holds"] == 2 and counts["implementation"]["holds"] == 1
    assert counts["paper-empirical"] == {"holds": 0, "does not hold": 1, "mixed": 0, "inconclusive": 0,
                                         "uninformative": 1}


def test_write_report_round_trip(tmp_path):
    claims = [claim("T1-identity", "identity", numbers={"agree": np.int64(20), "total": 20}),
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
    tallies = md[2:6]  # the report opens with the four tallies, one per category, in this order
    assert tallies[0].startswith("- **Numerical checks of the theory's identities") and "holds: 1" in tallies[0]
    assert tallies[1].startswith("- **Paper's empirical claims**") and "mixed: 1" in tallies[1]
    assert tallies[2].startswith("- **Implementation checks") and "holds: 1" in tallies[2]
    assert tallies[3].startswith("- **Beyond the paper")
    text = "\n".join(md)
    assert "| [E2-efficiency](#e2-efficiency) statement of E2-efficiency | paper-empirical | paper: holds; " \
           "modern-tuned: does not hold | — | **mixed** | yes |" in text
    for c in claims:
        assert f"## {c.id}" in text
    assert "- `python exp.py --quick` (12 s)" in text


def test_write_report_rejects_non_finite_numbers(tmp_path):
    bad = claim("E2-bad", numbers={"pam": {"mean": float("nan")}})
    with pytest.raises(ValueError, match="E2-bad.*numbers.pam.mean"):
        write_report(tmp_path, [claim("ok"), bad], [], {"profile": "quick"})
    assert not (tmp_path / "claims.json").exists()


def test_between_rule_and_its_negative_control():
    from common.experiments.claims import between_verdict
    assert between_verdict(0.1, 0.2, 0.3) == "holds"
    assert between_verdict(0.0, 0.0, 0.3) == "holds"          # an exact comparator (2-D, rank 2)
    assert between_verdict(0.1, 0.35, 0.3) == "does not hold"  # the SAE worse than k-means
    assert between_verdict(0.25, 0.2, 0.3) == "does not hold"  # the SAE better than its same-rank comparator
    with pytest.raises(ValueError, match="value must be finite"):
        between_verdict(0.1, float("nan"), 0.3)


def test_convergence_rule_and_its_negative_controls():
    from common.experiments.claims import convergence_verdict
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


def test_results_section_is_generated_from_the_report_and_keeps_the_text_around_it(tmp_path):
    from common.experiments.claims import RESULTS_BEGIN, RESULTS_END, write_results
    cmp = compare(A, B)
    numbers = {"paper": {"0.01": {"pam": {"mean": 1.051, "std": 0.11, "n": 5}, "sgd": {"mean": 1.62, "std": 0.19, "n": 5},
                                  "comparison": cmp.__dict__, "verdict": "holds"}}}
    claims = [Claim(id="E2-x", category="paper-empirical", statement="s", source="s", ran={}, numbers=numbers, rule="r",
                    verdict="holds", protocols={"paper": "holds"}),
              Claim(id="T1", category="identity", statement="t", source="s", ran={}, numbers={"agree": 3}, rule="r",
                    verdict="holds")]
    write_report(tmp_path, claims, [{"command": "python e2.py", "wall_time": 61.0, "returncode": 0}],
                 {"profile": "fast", "command": "python check_claims.py",
                  "run": {"wall_time_s": 1500.0, "machine": "test box", "load_before": 0.5, "load_after": 1.5,
                          "finished_utc": "2026-01-01 00:00"}})
    report = json.loads((tmp_path / "claims.json").read_text())
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\nhand-written intro\n\n{RESULTS_BEGIN}\nold numbers 0.999\n{RESULTS_END}\n\n## Benchmarks\nkept\n")
    write_results(report, md)
    text = md.read_text()
    assert "hand-written intro" in text and "## Benchmarks\nkept" in text and "old numbers" not in text
    assert "wall time: 25.0 min" in text and "test box" in text and "`python e2.py` (61 s)" in text
    assert "| E2-x | paper: holds | — | **holds** |" in text and "| T1 | — | — | **holds** |" in text
    # figure for figure: the means, spreads and the interval of the report
    assert "pam 1.051 ± 0.11; sgd 1.62 ± 0.19" in text
    assert f"[{cmp.ci_low:.4g}, {cmp.ci_high:.4g}]" in text
    write_results(report, md)   # idempotent: regenerating gives the same file
    assert md.read_text() == text
    md.write_text("no markers here")
    with pytest.raises(ValueError, match="markers"):
        write_results(report, md)
