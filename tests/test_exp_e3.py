"""exp_e3 --quick on synthetic activations: every output, every ablation, all numbers finite."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"


def test_quick_run_on_synthetic_activations(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "activations.json").read_text())
    assert meta["n_train"] == 360 and meta["n_test"] == 40 and "synthetic" in meta["model"]
    for name in ("curves_base", "latent_stems") + tuple(f"ablation_{a}" for a in (
            "base", "updates", "fraction", "activation", "weight_decay", "mu_nu", "k")):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.json").exists(), name
    rows = json.loads((tmp_path / "table.json").read_text())
    # base 3 + updates 2 (pam) + fraction 2x3 + activation 2x3 + weight decay 2x3 + mu/nu 2x3 + k 2x3
    assert len(rows) == 3 + 2 + 5 * 6
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("train_mse", "test_mse", "l0", "dead")), r
    relu = [r for r in rows if r["ablation"] == "activation" and r["value"] == "relu"]
    assert {r["activation"] for r in relu} == {"relu"} and len(relu) == 3
    ks = {(r["value"], round(r["l0"])) for r in rows if r["ablation"] == "k" and r["method"] == "pam"}
    assert ks == {(3, 3), (6, 6)}
    assert "## k" in (tmp_path / "summary.md").read_text()


def test_bad_settings_fail_before_extraction(tmp_path):
    for arg, msg in (("--K=5000", "--K=5000: expected an integer in [1, --N_LATENTS (= 4096)]"),
                     ("--SOURCE=web", "--SOURCE=web: expected one of llm, synthetic"),
                     ("--ONLY=base,colour", "--ONLY=base,colour: expected"),
                     ("--FRACTIONS=0,1", "each a number in (0, 1]")):
        res = subprocess.run([sys.executable, str(SCRIPT), arg, "--out", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr, (arg, res.stderr[-500:])
    assert not any(tmp_path.iterdir())
