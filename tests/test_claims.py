"""check_claims.py --quick: the report's structure (every claim present, verdicts valid, numbers finite)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ["T1-piecewise-affine", "T2-topk-power-diagram", "T2b-k-subset-form", "T2c-topk-abs",
            "T3-relu-power-diagram", "T4-kmeans-top1", "T5-local-pca-bound", "T6-lifting", "E1-local-pca-vs-sae",
            "E1-between", "E2-sample-efficiency-topk-vs-sgd", "E2-sample-efficiency-topk-vs-sgd_tied",
            "E2-sample-efficiency-relu-vs-sgd", "E2-sample-efficiency-relu-vs-sgd_tied", "E2-updates-direction",
            "E2-mu-nu-direction", "PAM-decoder-step", "PAM-objective-decreases", "E3-sample-efficiency-vs-sgd",
            "E3-sample-efficiency-vs-sgd_tied", "E3-relu-sparsity"]


def numbers_in(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers_in(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.skipif(not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists(), reason="MNIST not fetched")
def test_quick_profile_report_structure(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow")
    res = subprocess.run([sys.executable, str(ROOT / "check_claims.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "claims.json").read_text())
    assert report["profile"] == "quick"
    assert [c["id"] for c in report["claims"]] == EXPECTED
    md = (tmp_path / "CLAIMS.md").read_text()
    for c in report["claims"]:
        assert c["verdict"] in ("holds", "does not hold", "inconclusive"), c
        assert c["statement"] and c["source"] and c["rule"] and c["ran"]
        nums = list(numbers_in(c["numbers"]))
        assert nums and all(math.isfinite(x) for x in nums), c["id"]
        for link in c["links"]:
            assert (tmp_path / link).exists(), link
        assert f"## {c['id']}" in md and c["verdict"] in md
    assert sum(report["counts"].values()) == len(EXPECTED)
    assert all(c["returncode"] == 0 for c in report["commands"]) and len(report["commands"]) == 10
    # the theory statements are exact: they hold even on the quick profile
    assert all(c["verdict"] == "holds" for c in report["claims"] if c["id"].startswith("T"))
