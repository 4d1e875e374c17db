"""check_claims.py --quick: the report's structure (every claim present, categories, verdicts per protocol,
strict numbers), replicate seeds that differ and are counted once. The verdict rules themselves are tested in
tests/test_claims_rules.py, the theory checks and their negative controls in tests/test_theory.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.experiments.claims import CATEGORIES, VERDICTS, across_protocols

ROOT = Path(__file__).resolve().parent.parent
THEORY = ["T1-piecewise-affine", "T1b-relu-piecewise-affine", "T2-topk-power-diagram", "T2b-k-subset-form",
          "T2c-topk-abs", "T3-relu-power-diagram", "T4-kmeans-top1", "T4b-kmeans-autoencoder", "T6-lifting",
          "T7-kflats-optimal"]
BOTH_PROTOCOLS = ["E2-sample-efficiency-topk-vs-sgd", "E2-sample-efficiency-relu-vs-sgd",
                  "E2-full-data-equal-epochs", "E2-full-data-equal-seconds", "E2-relu-sparsity-low-data",
                  "E2-weight-decay", "E3-sample-efficiency-vs-sgd", "E3-k", "E3-weight-decay", "E3-relu-sparsity"]
PAPER_ONLY = ["E2-sample-efficiency-topk-vs-sgd_tied", "E2-sample-efficiency-relu-vs-sgd_tied",
              "E3-sample-efficiency-vs-sgd_tied"]   # tied SGD, the original baseline: the paper protocol only
AT_TWO_BUDGETS = ["E2-sample-efficiency-topk-vs-sgd", "E2-sample-efficiency-relu-vs-sgd", "E2-relu-sparsity-low-data",
                  "E3-sample-efficiency-vs-sgd", "E4-recovery-few-samples", "E4-mse-and-recovery-agree"]
EXPECTED = THEORY + ["E1-between", "E2-sample-efficiency-topk-vs-sgd", "E2-sample-efficiency-topk-vs-sgd_tied",
                     "E2-sample-efficiency-relu-vs-sgd", "E2-sample-efficiency-relu-vs-sgd_tied",
                     "E2-full-data-equal-epochs", "E2-full-data-equal-seconds", "E2-relu-sparsity-low-data",
                     "E2-weight-decay", "E2-updates-direction", "E2-mu-nu-direction", "PAM-decoder-step",
                     "PAM-convergence", "E3-sample-efficiency-vs-sgd", "E3-sample-efficiency-vs-sgd_tied", "E3-lm-ce-loss-score",
                     "E3-lm-kl-div-score",
                     "E3-k", "E3-weight-decay", "E3-relu-sparsity", "E3-updates-direction", "E3-mu-nu-direction",
                     "E4-recovery-few-samples", "E4-mse-and-recovery-agree"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists():
        pytest.skip("MNIST not fetched")
    out = tmp_path_factory.mktemp("claims")
    env = dict(os.environ, MPLBACKEND="Agg", VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow")
    res = subprocess.run([sys.executable, str(ROOT / "check_claims.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads((out / "claims.json").read_text())


def test_quick_profile_report_structure(report):
    out, rep = report
    assert rep["profile"] == "quick" and rep["protocols"] == ["paper", "modern"]
    assert [c["id"] for c in rep["claims"]] == EXPECTED
    md = (out / "CLAIMS.md").read_text()
    # the three tallies open the report, each on its own line, before the table
    first = md.index("| claim |")
    for title in ("Numerical checks of the theory's identities", "Paper's empirical claims", "Implementation checks",
                  "Beyond the paper"):
        assert md.index(title) < first
    for c in rep["claims"]:
        assert c["verdict"] in VERDICTS and c["category"] in CATEGORIES, c["id"]
        assert c["statement"] and c["source"] and c["rule"] and c["ran"]
        if c["id"] in BOTH_PROTOCOLS:
            assert set(c["protocols"]) == {"paper", "modern"}, c["id"]
            assert (c["verdict"], c["depends_on_protocol"]) == across_protocols(c["protocols"])
        if c["id"] in PAPER_ONLY:
            assert set(c["protocols"]) == {"paper"}, c["id"]
        if c["id"] in AT_TWO_BUDGETS:  # the sample-efficiency claims: judged at both tuning budgets
            assert set(c["budgets"]) == {"2", "3"} and c["budget_stable"] == (len(set(c["budgets"].values())) == 1), c["id"]
        for link in c["links"]:
            assert (out / link).exists(), link
        assert f"## {c['id']}" in md
    cats = {c["id"]: c["category"] for c in rep["claims"]}
    assert all(cats[t] == "identity" for t in THEORY) and cats["PAM-decoder-step"] == "implementation"
    assert sum(sum(v.values()) for v in rep["tallies"].values()) == len(EXPECTED)
    assert all(c["returncode"] == 0 for c in rep["commands"]) and len(rep["commands"]) == 25
    # the theory statements are exact: they hold even on the quick profile
    assert all(c["verdict"] == "holds" for c in rep["claims"] if c["category"] == "identity")


def test_replicates_differ_and_are_counted_once(report):
    _, rep = report
    claim = next(c for c in rep["claims"] if c["id"] == "E2-sample-efficiency-topk-vs-sgd")
    for protocol, by_budget in claim["numbers"].items():
        per_fraction = by_budget if protocol == "paper" else {f: n for b in by_budget.values() for f, n in b.items()}
        assert protocol == "paper" or set(by_budget) == {"budget 2", "budget 3"}
        for fraction, nums in per_fraction.items():
            for method in ("pam", "sgd"):
                values = nums[method]["values"]
                assert len(values) == rep["seeds"], (protocol, fraction, method)  # each seed once
                assert len(set(values)) == len(values), (protocol, fraction, method)  # seeds differ
