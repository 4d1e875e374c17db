"""The shared SGD-vs-PAM protocol: the plan, its fairness rules, and parallel workers changing nothing."""
import dataclasses
import json

import pytest
import torch

from common.experiments import experiment, report
from common.maths.sae import SAEConfig
from common.maths.train import TrainConfig

A = experiment.Ablation
ABLATIONS = {"base": experiment.BASE, "weight_decay": A(("weight_decay",), (0.0, 1e-3)),
             "updates": A(("updates_per_batch",), (1, 2), methods=("pam",)), "fraction": A(("fraction",), (0.5,)),
             "mu_nu": A(("mu", "nu"), (1e-3,)), "k": A(("k",), (2,))}


def only(*names, **values):
    """The test ablations ``names``, with other values where given."""
    return {n: (A(ABLATIONS[n].sets, values[n], ABLATIONS[n].methods) if n in values else ABLATIONS[n]) for n in names}


def tiny_protocol(**kw):
    base = dict(n_latents=12, activation="topk", k=3, epochs=2, batch_size=32, lr=3e-3, solve_batch=64)
    args = dict(base=base, ablations=only("base", "weight_decay", "updates", "fraction"), seeds=1, base_seed=7)
    args.update(kw)
    return experiment.Protocol(**args)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 6, generator=g), torch.randn(50, 6, generator=g)


def test_plan_shares_identical_configurations_and_restricts_methods():
    runs = tiny_protocol().plan()
    by_id = {r.spec.id: r for r in runs}
    # weight_decay=0 and updates=1 are the base configuration: run once, reported in both places
    assert by_id["sgd|weight_decay=0.0|rep0"].shared_with == "sgd|base=-|rep0"
    assert by_id["pam|updates=1|rep0"].shared_with == "pam|base=-|rep0"
    assert by_id["pam|weight_decay=0.001|rep0"].shared_with is None
    # the updates ablation concerns PAM only
    assert {r.spec.method for r in runs if r.spec.ablation == "updates"} == {"pam"}
    assert len(runs) == 3 + 3 * 2 + 2 + 3


def test_a_scripts_own_ablation_and_what_follows_from_its_value():
    then = lambda s, v: s.update(epochs=7 if v == 2 else s["epochs"])  # noqa: E731
    protocol = tiny_protocol(ablations={"k": A(("k",), (2, 3), methods=("sgd",), then=then),
                                        "mu_nu": A(("mu", "nu"), (1e-3,))},
                             ablation_overrides={"epochs": 5})
    plan = {r.spec.id: r.settings for r in protocol.plan()}
    assert set(plan) == {"sgd|k=2|rep0", "sgd|k=3|rep0", "pam|mu_nu=0.001|rep0", "sgd|mu_nu=0.001|rep0",
                         "sgd_tied|mu_nu=0.001|rep0"}
    assert plan["sgd|k=2|rep0"]["k"] == 2 and plan["sgd|k=2|rep0"]["epochs"] == 7
    assert plan["sgd|k=3|rep0"]["epochs"] == 5                       # the override; the base keeps its own
    assert plan["pam|mu_nu=0.001|rep0"]["mu"] == plan["pam|mu_nu=0.001|rep0"]["nu"] == 1e-3
    assert protocol.settings("base", "-", "pam")["epochs"] == 2


def test_a_run_spec_names_a_run_and_every_planned_run_carries_one():
    spec = experiment.RunSpec("pam", "base", "-", 0)
    assert spec.id == "pam|base=-|rep0"                      # the names saved histories and run files use
    assert experiment.RunSpec("sgd", "weight_decay", 0.001, 2).id == "sgd|weight_decay=0.001|rep2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "sgd"
    runs = tiny_protocol(seeds=2).plan()
    assert runs[0].spec == spec
    assert {r.spec.replicate for r in runs} == {0, 1} and len({r.spec for r in runs}) == len(runs)


def test_a_tuned_protocol_plans_one_run_per_budget_and_shares_identical_choices(tmp_path):
    """With settings chosen per value (common/experiments/tuning.py) every run is planned once per budget, its choice last; a
    budget whose choice is the same as a smaller one's is trained once, and its row carries its own budget."""
    protocol = tiny_protocol(ablations=only("base", "weight_decay"), methods=("pam", "sgd"))
    choice = {"lr": 1e-2, "epochs": 3, "stop_epoch": 2}
    tuned = {}
    for ablation, values in (("base", ("-",)), ("weight_decay", (0.0, 1e-3))):
        for value in values:
            for method in ("pam", "sgd"):
                tuned[experiment.TunedKey(ablation, value, method, 0, 2)] = dict(choice)
                later = dict(choice, lr=2e-2) if method == "pam" and ablation == "base" else dict(choice)
                tuned[experiment.TunedKey(ablation, value, method, 0, 5)] = later
    p = dataclasses.replace(protocol, tuned=tuned)
    assert p.budgets == (2, 5) and protocol.budgets == ()
    runs = {r.spec.id: r for r in p.plan()}
    assert len(runs) == 2 * (2 + 2 * 2)
    assert experiment.RunSpec("sgd", "base", "-", 0, 5).id == "sgd|base=-|rep0|budget5"
    for rid, run in runs.items():
        assert rid.endswith(f"|budget{run.spec.budget}") and run.spec.budget in (2, 5)
        expected = tuned[experiment.TunedKey(run.spec.ablation, run.spec.value, run.spec.method, 0, run.spec.budget)]
        assert {k: run.settings[k] for k in expected} == expected       # the choice comes last (epochs: 3, not 2)
        assert json.loads(run.tuned) == expected
    assert runs["sgd|base=-|rep0|budget5"].shared_with == "sgd|base=-|rep0|budget2"      # the same choice
    assert runs["sgd|weight_decay=0.0|rep0|budget2"].shared_with == "sgd|base=-|rep0|budget2"
    assert runs["pam|base=-|rep0|budget5"].shared_with is None                          # another choice
    x_train, x_test = data()
    rows, hist, _ = experiment.execute(p, x_train, x_test, tmp_path, progress=False)
    by = {(r["method"], r["ablation"], r["value"], r["budget"]): r for r in rows}
    assert len(by) == len(rows) == 12
    shared = by[("sgd", "base", "-", 5)]
    assert shared["shared_with"] == "sgd|base=-|rep0|budget2" and shared["budget"] == 5
    assert shared["test_mse"] == by[("sgd", "base", "-", 2)]["test_mse"]
    assert by[("pam", "base", "-", 5)]["test_mse"] != by[("pam", "base", "-", 2)]["test_mse"]
    for r in rows:
        assert (r["epochs"], r["stop_epoch"], r["steps"]) == (3, 2, 2 * 7)   # 200 rows in batches of 32
    assert len(hist["sgd|base=-|rep0|budget5"]) == 3
    summary = report.summary(rows, "tuned")
    assert "## Tuning budget: 5 trials" in summary and summary.index("budget: 5") < summary.index("budget: 2")
    # every run needs its own choice
    missing = dict(tuned)
    del missing[experiment.TunedKey("weight_decay", 1e-3, "sgd", 0, 5)]
    with pytest.raises(ValueError, match=r"no tuned settings for TunedKey\(ablation='weight_decay', value=0.001, "
                                         r"method='sgd', replicate=0, budget=5\)"):
        dataclasses.replace(protocol, tuned=missing).plan()
    with pytest.raises(ValueError, match=r"no tuned settings for .*replicate=1"):
        dataclasses.replace(protocol, tuned=tuned, seeds=2).plan()
    bad = dict(tuned)
    bad[experiment.TunedKey("base", "-", "pam", 0, 2)] = {"lrate": 1e-2}
    with pytest.raises(ValueError, match=r"tuned settings of base=- have unknown settings \['lrate'\]"):
        dataclasses.replace(protocol, tuned=bad).plan()


def test_settings_split_into_the_model_and_the_training_configuration():
    s = tiny_protocol().settings("base", "-", "sgd_tied")
    model, train = experiment.configs(s, "sgd_tied", n_features=6)
    assert model == SAEConfig(6, 12, "topk", 3, tied=True)
    assert (train.method, train.epochs, train.lr, train.solve_batch) == ("sgd_tied", 2, 3e-3, 64)
    assert experiment.configs(dict(s, activation="relu"), "pam", 6)[0].k is None   # a ReLU model has no k
    # the defaults are the dataclasses' own
    assert experiment.DEFAULTS["dec_init_scale"] == SAEConfig(6, 12, k=3).dec_init_scale == 0.01
    assert experiment.DEFAULTS["solve_batch"] == TrainConfig().solve_batch
    with pytest.raises(ValueError, match=r"unknown settings \['lr_decay'\]; accepted: .*, weight_decay"):
        experiment.configs(dict(s, lr_decay=0.1), "pam", 6)


@pytest.mark.parametrize("kw, match", [
    (dict(ablations={"nope": A(("nope",), (1,))}), "sets unknown settings"),
    (dict(method_settings={"pam": {"lrr": 1e-3}}), r"method_settings\['pam'\] has unknown settings \['lrr'\]; accepted"),
    (dict(ablation_overrides={"epoch": 3}), r"ablation_overrides has unknown settings \['epoch'\]"),
    (dict(ablations={"k": A(("k",), (2,), then=lambda s, v: s.update(epoch=3))}), r"unknown settings \['epoch'\]"),
    (dict(ablations=only("base"), base=dict(n_latents=12, k=3, init="unit")), "unknown init 'unit'"),
    (dict(ablations={"weights": {"weight_decay": (1,)}}), "must be an experiment.Ablation"),
    (dict(ablations=only("fraction", fraction=(0.0,))), "fraction"),
    (dict(ablations=only("k", k=(99,))), "k must satisfy"),
    (dict(methods=("pam", "adam")), "unknown methods"),
    (dict(seeds=0), "seeds"),
])
def test_bad_protocol_fails_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_protocol(**kw)


def test_every_method_starts_from_the_same_point_and_fraction_runs_share_the_subset(tmp_path):
    x_train, x_test = data()
    rows, hist, _ = experiment.execute(tiny_protocol(ablations=only("base", "fraction")),
                                       x_train, x_test, tmp_path, progress=False)
    # same initial encoder and decoder for pam and untied sgd: identical metrics at epoch 0
    assert hist["pam|base=-|rep0"][0]["test_mse"] == hist["sgd|base=-|rep0"][0]["test_mse"]
    assert {r["n_train"] for r in rows if r["ablation"] == "fraction"} == {100}
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["method"] for r in table] == [r["method"] for r in rows]


def test_parallel_workers_give_the_same_rows_in_plan_order(tmp_path):
    x_train, x_test = data()
    protocol = tiny_protocol()
    serial, hs, _ = experiment.execute(protocol, x_train, x_test, tmp_path / "serial", progress=False, workers=1)
    parallel, hp, models = experiment.execute(protocol, x_train, x_test, tmp_path / "parallel", progress=False,
                                              workers=2)
    assert [(r["method"], r["ablation"], r["value"]) for r in serial] == \
           [(r["method"], r["ablation"], r["value"]) for r in parallel]
    for a, b in zip(serial, parallel):
        for key in ("train_mse", "test_mse", "l0", "dead", "samples_seen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["method"], a["ablation"], key)
        assert a["shared_with"] == b["shared_with"]
    assert set(hs) == set(hp)
    assert set(models) == {f"{m}|base=-|rep0" for m in ("pam", "sgd", "sgd_tied")}
    assert (tmp_path / "parallel" / "models" / "pam_rep0.pt").is_file()


def test_extra_metrics_of_each_trained_model_join_its_row_csv_and_run_file(tmp_path, monkeypatch):
    x_train, x_test = data()
    protocol = tiny_protocol(ablations=only("base", "weight_decay", weight_decay=(0.0,)))
    seen = []

    def extra(model):  # a number only the trained model knows: its first atom's norm
        seen.append(model)
        return {"atom0_norm": float(model.atoms[0].detach().norm()), "n_latents_seen": model.n_latents}
    rows, _, models = experiment.execute(protocol, x_train, x_test, tmp_path, progress=False,
                                         extra_metrics=extra)
    assert len(seen) == 3 and len(rows) == 6  # once per trained run; weight_decay=0 is the base run, shared
    for r in rows:
        rid = experiment.RunSpec(r["method"], "base", "-", 0).id
        assert r["atom0_norm"] == pytest.approx(float(models[rid].atoms[0].detach().norm()), rel=1e-6)
        assert r["n_latents_seen"] == 12
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert header == list(report.TABLE_COLUMNS) + ["atom0_norm", "n_latents_seen"]
    # a resumed run keeps the values it was saved with; nothing is recomputed
    again, _, _ = experiment.execute(protocol, x_train, x_test, tmp_path, progress=False, extra_metrics=extra)
    assert len(seen) == 3 and [r["atom0_norm"] for r in again] == [r["atom0_norm"] for r in rows]
    with pytest.raises(ValueError, match=r"extra_metrics returned names the row already has: \['test_mse'\]"):
        experiment.execute(protocol, x_train, x_test, tmp_path / "clash", progress=False,
                           extra_metrics=lambda m: {"test_mse": 0.0})
    with pytest.raises(ValueError, match="extra_metrics must map names to finite numbers"):
        experiment.execute(protocol, x_train, x_test, tmp_path / "nan", progress=False,
                           extra_metrics=lambda m: {"x": float("nan")})


def test_bad_workers():
    x_train, x_test = data()
    with pytest.raises(ValueError, match="workers"):
        experiment.execute(tiny_protocol(), x_train, x_test, "unused", workers=0)


def test_an_interrupted_protocol_resumes_where_it_stopped(tmp_path, monkeypatch):
    x_train, x_test = data()
    protocol = tiny_protocol()
    first, h1, m1 = experiment.execute(protocol, x_train, x_test, tmp_path, progress=False)
    trained = []
    real = experiment.run_one
    monkeypatch.setattr(experiment, "run_one", lambda run, *a, **k: trained.append(run.spec.id) or real(run, *a, **k))
    # "interrupt": one finished run is lost, another left as a corrupt file
    plan = {r.spec.id: r for r in protocol.plan()}
    lost = experiment.run_file(tmp_path, plan["sgd|fraction=0.5|rep0"])
    corrupt = experiment.run_file(tmp_path, plan["pam|weight_decay=0.001|rep0"])
    lost.unlink()
    corrupt.write_text("{\"key\": ")
    again, h2, m2 = experiment.execute(protocol, x_train, x_test, tmp_path, progress=False)
    assert sorted(trained) == ["pam|weight_decay=0.001|rep0", "sgd|fraction=0.5|rep0"]
    for a, b in zip(first, again):
        assert (a["method"], a["ablation"], a["value"], a["shared_with"]) == \
               (b["method"], b["ablation"], b["value"], b["shared_with"])
        assert b["test_mse"] == pytest.approx(a["test_mse"], rel=1e-5)
    assert set(h2) == set(h1)
    # the base models come back from their checkpoints
    assert set(m2) == set(m1)
    for rid in m1:
        for k, v in m1[rid].state_dict().items():
            assert torch.equal(v, m2[rid].state_dict()[k])


def test_resume_never_reuses_runs_made_with_other_data_or_settings(tmp_path, monkeypatch):
    x_train, x_test = data()
    experiment.execute(tiny_protocol(ablations=only("base")), x_train, x_test, tmp_path, progress=False)
    trained = []
    real = experiment.run_one
    monkeypatch.setattr(experiment, "run_one", lambda run, *a, **k: trained.append(run.spec.id) or real(run, *a, **k))
    experiment.execute(tiny_protocol(ablations=only("base")), x_train + 1e-3, x_test, tmp_path, progress=False)
    assert len(trained) == 3                      # other data
    trained.clear()
    base = dict(n_latents=12, activation="topk", k=3, epochs=2, batch_size=32, lr=1e-3, solve_batch=64)
    experiment.execute(tiny_protocol(ablations=only("base"), base=base), x_train + 1e-3, x_test, tmp_path,
                       progress=False)
    assert len(trained) == 3                      # another learning rate
    trained.clear()
    experiment.execute(tiny_protocol(ablations=only("base"), base=base), x_train + 1e-3, x_test, tmp_path,
                       progress=False, resume=False)
    assert len(trained) == 3                      # asked not to resume
    # the earlier settings' run files are still there, beside the new ones
    assert len(list((tmp_path / "runs").glob("pam_base_-_rep0_*.json"))) == 2


def test_resume_never_returns_a_model_that_another_setting_overwrote(tmp_path, monkeypatch):
    """models/<method>_rep<r>.pt is shared by every setting of a folder: default, then another base
    setting (overwrites it), then the default again must not return the second setting's models."""
    x_train, x_test = data()
    only_base = only("base")
    _, _, m1 = experiment.execute(tiny_protocol(ablations=only_base), x_train, x_test, tmp_path, progress=False)
    other = dict(n_latents=12, activation="topk", k=3, epochs=2, batch_size=32, lr=1e-2, solve_batch=64)
    _, _, m2 = experiment.execute(tiny_protocol(ablations=only_base, base=other), x_train, x_test, tmp_path,
                                  progress=False)
    trained = []
    real = experiment.run_one
    monkeypatch.setattr(experiment, "run_one", lambda run, *a, **k: trained.append(run.spec.id) or real(run, *a, **k))
    _, _, m3 = experiment.execute(tiny_protocol(ablations=only_base), x_train, x_test, tmp_path, progress=False)
    assert sorted(trained) == sorted(m1)          # the base runs were trained again, not resumed
    for rid in m1:
        assert not torch.equal(m2[rid].W_enc, m1[rid].W_enc)
        for name, v in m1[rid].state_dict().items():
            assert torch.equal(v, m3[rid].state_dict()[name]), (rid, name)
    # and now that the checkpoints are the default's again, a fourth call resumes everything
    trained.clear()
    experiment.execute(tiny_protocol(ablations=only_base), x_train, x_test, tmp_path, progress=False)
    assert trained == []


class _Payload:
    """Unpickling this would run code: a checkpoint that holds it must never be loaded."""

    def __reduce__(self):
        return (open, ("/tmp/splinterp_checkpoint_exploit", "w"))


def test_a_crafted_checkpoint_is_never_unpickled_and_the_run_is_retrained(tmp_path, monkeypatch):
    import os
    x_train, x_test = data()
    protocol = tiny_protocol(ablations=only("base"))
    experiment.execute(protocol, x_train, x_test, tmp_path, progress=False)
    run = next(r for r in protocol.plan() if r.spec.method == "pam")
    path = experiment._checkpoint_path(tmp_path, run)
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"] = _Payload()
    torch.save(ckpt, path)
    if os.path.exists("/tmp/splinterp_checkpoint_exploit"):
        os.remove("/tmp/splinterp_checkpoint_exploit")
    trained = []
    real = experiment.run_one
    monkeypatch.setattr(experiment, "run_one", lambda r, *a, **k: trained.append(r.spec.id) or real(r, *a, **k))
    experiment.execute(protocol, x_train, x_test, tmp_path, progress=False)
    assert not os.path.exists("/tmp/splinterp_checkpoint_exploit")
    assert trained == [run.spec.id]                  # refused (weights_only) and retrained; nothing else


def test_a_run_that_diverges_fails_loudly_and_is_never_saved(tmp_path):
    from common.maths.train import NonFiniteError
    x_train, x_test = data()
    protocol = tiny_protocol(ablations=only("base"), methods=("sgd",))
    with pytest.raises(NonFiniteError, match=r"sgd\|base=-\|rep0 \(sgd\), epoch 1"):
        experiment.execute(protocol, x_train * 1e30, x_test, tmp_path, progress=False)
    assert not list(tmp_path.glob("runs/*.json"))
    assert not (tmp_path / "table.json").exists()


def test_every_module_training_runs_on_is_a_training_source():
    """A resumed run or tuning study is reused only while the code it ran is unchanged (TRAINING_SOURCES): every
    module of common/ that a run or a trial imports must be listed, or a change there would leave stale results."""
    code = ("import sys, common.experiments.experiment, common.experiments.study\n"
            "print(sorted(m.__file__.split('common/', 1)[1] for n, m in list(sys.modules.items())\n"
            "             if n.startswith('common.') and getattr(m, '__file__', '') and not m.__file__.endswith('__init__.py')))")
    import ast
    import subprocess
    import sys
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True).stdout
    imported = set(ast.literal_eval(out.strip()))
    assert imported - set(experiment.TRAINING_SOURCES) == set()
    assert set(experiment.TRAINING_SOURCES) <= imported   # no stale entry either
