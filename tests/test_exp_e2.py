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


@pytest.mark.skipif(not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists(), reason="MNIST not fetched")
def test_a_reused_tuning_gives_the_tuning_runs_table_and_other_data_are_refused(tmp_path):
    """--TUNE=True tunes each method at each value (the fraction per replicate) and trains at each budget; --TUNED
    with that folder tunes nothing and gives the same table and summary; on other data it exits 2."""
    env = dict(os.environ, MPLBACKEND="Agg")
    small = ["--quick", "--RECIPE=modern", "--ACTIVATIONS=topk", "--ONLY=base,fraction", "--FRACTIONS=0.5",
             "--METHODS=pam,sgd", "--WORKERS=1"]

    def e2(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *small, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    tuned = e2("--TUNE=True", "--out", str(tmp_path / "tuned"))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    record = json.loads((tmp_path / "tuned" / "topk" / "tuning" / "tuning.json").read_text())
    assert record["budgets"] == [2, 3] and len(record["studies"]) == 4     # base and fraction 0.5, pam and sgd
    reused = e2("--TUNED=" + str(tmp_path / "tuned"), "--out", str(tmp_path / "reused"))
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert not (tmp_path / "reused" / "topk" / "tuning").exists()           # nothing tuned again

    def table(name):
        rows = json.loads((tmp_path / name / "topk" / "table.json").read_text())
        return [{k: v for k, v in r.items() if k not in ("wall_time", "train_time")} for r in rows]

    rows = table("tuned")
    assert len(rows) == 2 * 4 and {r["budget"] for r in rows} == {2, 3}
    assert all(json.loads(r["tuned"])["epochs"] >= 2 for r in rows)
    assert table("reused") == rows
    summary = (tmp_path / "tuned" / "topk" / "summary.md").read_text()
    assert (tmp_path / "reused" / "topk" / "summary.md").read_text() == summary
    assert str(tmp_path / "tuned" / "topk" / "tuning") in summary
    other = e2("--TUNED=" + str(tmp_path / "tuned"), "--N_TRAIN=300", "--out", str(tmp_path / "other"))
    assert other.returncode == 2 and "tuned on other data" in other.stderr and "Traceback" not in other.stderr
    both = e2("--TUNE=True", "--TUNED=" + str(tmp_path / "tuned"), "--out", str(tmp_path / "both"))
    assert both.returncode == 2 and "--TUNED" in both.stderr and not (tmp_path / "both").exists()


@pytest.mark.skipif(not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists(), reason="MNIST not fetched")
def test_min_steps_gives_small_fractions_a_smaller_batch_and_leaves_the_others(tmp_path):
    """MIN_STEPS: 10% of 400 images (40 rows) over 2 epochs with a batch of 128 makes 2 steps; MIN_STEPS=8 gives it
    the largest batch with >= 8 steps (4 per epoch: 40 // 4 = 10); the full-data runs keep 128 (4 per epoch x 2)."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--ACTIVATIONS=topk", "--ONLY=base,fraction",
                          "--METHODS=pam,sgd", "--MIN_STEPS=8", "--FRACTIONS=0.1", "--out", str(tmp_path)],
                         cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "topk" / "table.json").read_text())
    frac = [r for r in rows if r["ablation"] == "fraction"]
    base = [r for r in rows if r["ablation"] == "base"]
    assert {(r["batch_size"], r["steps"]) for r in frac} == {(10, 8)}
    assert {(r["batch_size"], r["steps"]) for r in base} == {(128, 2 * math.ceil(400 / 128))}
