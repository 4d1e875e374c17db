"""Tuning on a validation split (common/tuning.py): the split, the equal-effort trials, the choice by validation
MSE, divergence as a failed trial, and reusing an earlier tuning (TUNED) only for the same base settings."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import experiment, tuning

ROOT = Path(__file__).resolve().parent.parent
E3 = ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"


def protocol(methods=("pam", "sgd"), **base):
    return experiment.Protocol(base=dict(dict(n_latents=12, k=3, epochs=2, batch_size=32), **base), ablations={},
                               methods=methods, base_seed=3)


def test_validation_split_is_a_seeded_partition():
    fit, val = tuning.validation_split(200, 0.1, seed=5)
    assert len(val) == 20 and len(fit) == 180
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(200))
    again = tuning.validation_split(200, 0.1, seed=5)
    assert torch.equal(fit, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, tuning.validation_split(200, 0.1, seed=6)[1])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction"):
            tuning.validation_split(200, bad, seed=5)


def test_trials_are_distinct_grid_points_and_a_small_grid_is_an_error():
    grid = {"lr": (1e-3, 2e-3, 3e-3), "weight_decay": (0.0, 1e-4)}
    picked = tuning.trials(grid, 4, seed=1)
    assert len(picked) == 4 and len({json.dumps(p, sort_keys=True) for p in picked}) == 4
    assert all(p["lr"] in grid["lr"] and p["weight_decay"] in grid["weight_decay"] for p in picked)
    assert picked == tuning.trials(grid, 4, seed=1)
    with pytest.raises(ValueError, match="cannot give 7 trials"):
        tuning.trials(grid, 7, seed=1)
    with pytest.raises(ValueError, match="empty grid"):
        tuning.trials({}, 1, seed=1)
    with pytest.raises(ValueError, match="non-empty tuple"):
        tuning.trials({"lr": ()}, 1, seed=1)


def test_shared_settings_take_the_same_values_in_every_method():
    """lr, offered by every grid with the same values, is drawn once: trial i of every method has the same lr, and
    the lrs are distinct while there are enough (PAM's larger grid samples lr no more thinly than SGD's)."""
    lrs = (3e-4, 6e-4, 1e-3, 2e-3, 4e-3)
    grids = {"pam": {"lr": lrs, "mu_nu": (0.0, 1e-4, 1e-3), "alpha": (0.0, 1e-5), "solve_order": ("enc_first", "dec_first")},
             "sgd": {"lr": lrs, "weight_decay": (0.0, 1e-4)}, "sgd_tied": {"lr": lrs, "weight_decay": (0.0, 1e-4)},
             "other": {"lr": lrs[:4], "weight_decay": (0.0, 1e-4)}}
    assert tuning.shared_settings({m: grids[m] for m in ("pam", "sgd")}) == ["lr"]
    assert tuning.shared_settings({m: grids[m] for m in ("sgd", "sgd_tied")}) == ["lr", "weight_decay"]
    assert tuning.shared_settings(grids) == []  # "other" offers other lr values: nothing is shared
    assert tuning.shared_settings({"pam": grids["pam"], "sgd": {"lr": lrs[::-1]}}) == ["lr"]  # order does not matter
    for n_trials, most in ((4, 1), (5, 1), (7, 2), (10, 2)):
        runs = tuning.plan_trials(protocol(methods=("pam", "sgd", "sgd_tied")), {m: grids[m] for m in
                                  ("pam", "sgd", "sgd_tied")}, n_trials, epochs=1, seed=0)
        by = {m: [v for run, v in runs if run.spec.method == m] for m in ("pam", "sgd", "sgd_tied")}
        pam_lr = [v["lr"] for v in by["pam"]]
        assert pam_lr == [v["lr"] for v in by["sgd"]] == [v["lr"] for v in by["sgd_tied"]], n_trials
        assert max(pam_lr.count(lr) for lr in lrs) == most and len(set(pam_lr)) == min(n_trials, 5), n_trials
        for m, values in by.items():  # still distinct points of each method's own grid
            assert len({json.dumps(v, sort_keys=True) for v in values}) == n_trials, (m, n_trials)
            assert all(set(v) == set(grids[m]) and all(v[k] in grids[m][k] for k in v) for v in values)
    # sgd and sgd_tied share lr and weight_decay: 10 trials give every point of their grid once, to both
    runs = tuning.plan_trials(protocol(methods=("sgd", "sgd_tied")), {m: grids[m] for m in ("sgd", "sgd_tied")}, 10,
                              epochs=1, seed=2)
    sgd = [v for run, v in runs if run.spec.method == "sgd"]
    assert sgd == [v for run, v in runs if run.spec.method == "sgd_tied"] and len({json.dumps(v) for v in sgd}) == 10


def test_every_method_gets_the_same_number_of_trials():
    grids = {"pam": {"lr": (1e-3, 2e-3, 4e-3), "mu_nu": (0.0, 1e-3)}, "sgd": {"lr": (1e-3, 2e-3, 4e-3)}}
    runs = tuning.plan_trials(protocol(), grids, 3, epochs=1, seed=0)
    methods = [run.spec.method for run, _ in runs]
    assert methods.count("pam") == 3 == methods.count("sgd")
    assert all(run.settings["epochs"] == 1 and run.may_diverge for run, _ in runs)
    assert len({run.spec.id for run, _ in runs}) == 6
    pam = [(run, values) for run, values in runs if run.spec.method == "pam"]
    assert all(run.settings["mu"] == run.settings["nu"] == values["mu_nu"] for run, values in pam)
    with pytest.raises(ValueError, match="no grid for method 'sgd'"):
        tuning.plan_trials(protocol(), {"pam": grids["pam"]}, 3, epochs=1, seed=0)
    with pytest.raises(ValueError, match="does not run"):
        tuning.plan_trials(protocol(methods=("pam",)), grids, 3, epochs=1, seed=0)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A real (small) tuning: sgd with one diverging learning rate among its trials."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 10, generator=g) @ torch.randn(10, 10, generator=g)
    p = protocol()
    grids = {"pam": {"lr": (1e-3, 1e-2)}, "sgd": {"lr": (1e-2, 1e38)}}
    out = tmp_path_factory.mktemp("tuning")
    chosen = tuning.tune(p, grids, 2, epochs=2, x_train=x, val_fraction=0.25, out=out, seed=0, progress=False)
    return p, chosen, out, json.loads((out / "tuning.json").read_text())


def test_tune_chooses_the_lowest_validation_mse_and_counts_divergence_as_failed(tuned):
    p, chosen, out, record = tuned
    assert record["trials_per_method"] == {"pam": 2, "sgd": 2} and record["n_val"] == 60
    assert record["base"] == json.loads(json.dumps(p.base))
    for method in ("pam", "sgd"):
        trials = [t for t in record["trials"] if t["method"] == method]
        finished = [t for t in trials if not t["diverged"]]
        assert chosen[method] == min(finished, key=lambda t: t["val_mse"])["values"]
    failed = [t for t in record["trials"] if t["diverged"]]
    assert [t["values"] for t in failed] == [{"lr": 1e38}] and failed[0]["val_mse"] is None
    assert chosen["sgd"] == {"lr": 1e-2}
    assert "diverged" in (out / "tuning.md").read_text()
    tp = tuning.tuned_protocol(p, chosen)
    assert tp.settings("base", "-", "sgd")["lr"] == 1e-2


def test_every_trial_of_a_method_diverging_is_an_error(tmp_path):
    x = torch.randn(120, 10, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="every trial of sgd diverged"):
        tuning.tune(protocol(methods=("sgd",)), {"sgd": {"lr": (1e37, 1e38)}}, 2, epochs=1, x_train=x,
                    val_fraction=0.25, out=tmp_path, seed=0, progress=False)


def test_reuse_returns_the_chosen_values_only_for_the_same_base_settings(tuned, tmp_path):
    p, chosen, out, _ = tuned
    assert tuning.reuse(out / "tuning.json", p) == chosen
    assert tuning.reuse(out / "tuning.json", protocol(methods=("sgd",))) == {"sgd": chosen["sgd"]}
    with pytest.raises(ValueError, match=r"other base settings.*k 3 vs 4"):
        tuning.reuse(out / "tuning.json", protocol(k=4))
    with pytest.raises(ValueError, match="no tuned values for sgd_tied"):
        tuning.reuse(out / "tuning.json", protocol(methods=("pam", "sgd_tied")))
    bad = tmp_path / "tuning.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a tuning.json"):
        tuning.reuse(bad, p)
    with pytest.raises(ValueError, match="not a tuning.json"):
        tuning.reuse(tmp_path / "missing.json", p)


def e3(*args):
    return subprocess.run([sys.executable, str(E3), "--quick", *args], cwd=ROOT, capture_output=True, text=True)


def test_e3_reuses_a_tuning_and_refuses_one_made_for_other_settings(tmp_path):
    first = e3("--RECIPE=modern", "--TUNE=True", "--ONLY=k", "--METHODS=pam,sgd", "--out", str(tmp_path / "tuned"))
    assert first.returncode == 0, first.stderr[-2000:]
    chosen = json.loads((tmp_path / "tuned" / "tuning" / "tuning.json").read_text())["chosen"]

    again = e3("--RECIPE=modern", f"--TUNED={tmp_path / 'tuned'}", "--ONLY=weight_decay", "--METHODS=sgd",
               "--out", str(tmp_path / "reused"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (tmp_path / "reused" / "tuning").exists()           # nothing tuned again
    rows = json.loads((tmp_path / "reused" / "table.json").read_text())
    assert rows and all(json.loads(r["tuned"]) == chosen["sgd"] for r in rows)
    assert str(tmp_path / "tuned" / "tuning") in (tmp_path / "reused" / "summary.md").read_text()

    other = e3("--RECIPE=paper", f"--TUNED={tmp_path / 'tuned'}", "--METHODS=pam,sgd",
               "--out", str(tmp_path / "other"))
    assert other.returncode == 2 and "tuned for other base settings" in other.stderr and "init" in other.stderr
    missing = e3("--RECIPE=modern", f"--TUNED={tmp_path / 'tuned'}", "--out", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no tuned values for sgd_tied" in missing.stderr
    both = e3("--TUNE=True", f"--TUNED={tmp_path / 'tuned'}", "--out", str(tmp_path / "both"))
    assert both.returncode == 2 and "--TUNED" in both.stderr
