"""exp_e4 --quick: the ground-truth sweep end to end writes every output, and its rows carry the recovery metrics."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "exp_e4_ground_truth_recovery.py"
RECOVERY = ("recovered_fraction", "mmcs_true_to_learned", "mmcs_learned_to_true")


def test_quick_run_writes_every_output_with_recovery_in_every_row(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("recovery_vs_samples", "ablation_n_train"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
    rows = json.loads((tmp_path / "table.json").read_text())
    assert len(rows) == 2 * 2 * 2  # 2 seeds x 2 sample counts x (sgd, pam)
    assert {(r["method"], r["value"], r["n_train"]) for r in rows} == {
        (m, n, n) for m in ("sgd", "pam") for n in (32, 256)}
    for r in rows:
        assert r["ablation"] == "n_train"
        for key in (*RECOVERY, "test_mse", "test_fvu", "l0", "dead"):
            assert math.isfinite(float(r[key])), (r, key)
        assert all(0.0 <= r[k] <= 1.0 for k in RECOVERY)
        # about STEPS = 24 Adam steps whatever the sample count (batch 32): 24 epochs of 1 batch, 3 of 8
        assert r["epochs"] == {32: 24, 256: 3}[r["value"]]
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert set(RECOVERY) <= set(header)
    fig = json.loads((tmp_path / "recovery_vs_samples.json").read_text())
    assert fig["n_train"] == [32, 256] and fig["threshold"] == 0.9
    for m in ("sgd", "pam"):
        for key in (*RECOVERY, "test_mse"):
            for n in ("32", "256"):
                e = fig["methods"][m][key][n]
                mine = [r[key] for r in rows if r["method"] == m and r["value"] == int(n)]
                assert e["n"] == 2 and sorted(e["values"]) == sorted(mine)
                assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    synthetic = json.loads((tmp_path / "synthetic.json").read_text())
    assert synthetic["config"]["n_true"] == 24 and len(synthetic["firing_prob"]) == 24
    assert math.isclose(sum(synthetic["firing_prob"]), 3.0, rel_tol=1e-9)
    summary = (tmp_path / "summary.md").read_text()
    assert "## n_train" in summary and "## Recovery of the true features" in summary and "| agree |" in summary
    assert (tmp_path / "manifest.json").is_file()


def test_bad_setting_exits_2_with_one_line_before_any_work(tmp_path):
    for arg, says in (("--CORRELATION=0.3", "--CORRELATION=0.3: expected 0 when --GROUP_SIZE is 1 (= 1)"),
                      ("--N_TRAINS=64,0", "--N_TRAINS=64,0: expected a non-empty comma-separated list")):
        res = subprocess.run([sys.executable, str(SCRIPT), arg, "--out", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and says in res.stderr, (arg, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not any(tmp_path.iterdir())
