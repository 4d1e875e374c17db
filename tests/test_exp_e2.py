"""exp_e2 --quick: the whole pipeline (both activations, every ablation) writes every output, all finite."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "exp_e2_MNIST_SGD_PAM_ablations.py"


@pytest.mark.skipif(not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists(), reason="MNIST not fetched")
def test_quick_run_writes_every_output(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--SEEDS=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["quick"] is True
    for act in ("topk", "relu"):
        d = tmp_path / act
        for name in ("curves_base", "reconstructions", "latent_stems", "filters_pam_encoder", "filters_pam_decoder",
                     "filters_sgd_decoder", "filters_sgd_tied_encoder", "ablation_base", "ablation_updates",
                     "ablation_fraction", "ablation_weight_decay", "ablation_mu_nu"):
            assert (d / f"{name}.png").stat().st_size > 1000, name
            assert (d / f"{name}.json").exists(), name
        rows = json.loads((d / "table.json").read_text())
        assert (d / "table.csv").read_text().count("\n") == len(rows) + 1
        # 2 seeds x (base 3 + updates 2 + fraction 2x3 + weight decay 2x3 + mu/nu 2x3)
        assert len(rows) == 2 * (3 + 2 + 6 + 6 + 6)
        for r in rows:
            for key in ("train_mse", "test_mse", "train_fvu", "test_fvu", "l0", "dead", "wall_time"):
                assert math.isfinite(float(r[key])), (r, key)
        assert {r["method"] for r in rows} == {"pam", "sgd", "sgd_tied"}
        assert {r["activation"] for r in rows} == {act}
        # the fraction ablation trains every method on the same, smaller subset
        frac = [r for r in rows if r["ablation"] == "fraction" and r["value"] == 0.1]
        assert len({r["n_train"] for r in frac}) == 1 and frac[0]["n_train"] == 40
        summary = (d / "summary.md").read_text()
        assert "## fraction" in summary and "±" in summary  # spread reported with 2 seeds
        assert sorted(p.name for p in (d / "models").iterdir()) == sorted(
            f"{m}_rep{i}.pt" for m in ("pam", "sgd", "sgd_tied") for i in (0, 1))


def test_bad_override_fails_before_work(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--ONLY=base,nope", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--ONLY=base,nope: expected a non-empty comma-separated list" in res.stderr
    res = subprocess.run([sys.executable, str(SCRIPT), "--K=999", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--K=999: expected an integer in [1, --N_LATENTS (= 256)]" in res.stderr
    assert not any(tmp_path.iterdir())


def test_e2_accepts_every_activation_of_the_table(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--ACTIVATIONS=topk,gelu", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--ACTIVATIONS=topk,gelu" in res.stderr
    assert "batchtopk" in res.stderr and "jumprelu" in res.stderr  # the accepted ones, from the table
    assert not any(tmp_path.iterdir())
