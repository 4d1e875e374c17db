"""Tuning where each claim is judged (common/experiments/tuning.py): studies per ablation value, method and replicate on
validation rows of that value's own training rows (never other rows, never the test set), the split, the stopping
epoch, budgets that nest, edges extended once, resuming an interrupted tuning, pruning alike for every method,
divergence as a counted trial, and reusing a record (TUNED) only for the same data, settings and honest choices."""
import json
import math
from dataclasses import replace

import optuna
import pytest
import torch

from common.experiments import experiment, runner, tuning
from common.experiments import study as S
from common.experiments.experiment import Ablation, TunedKey, replicate_seed, training_rows

SPACE = {"lr": (1e-3, 1e-1)}


def data(n=96, d=12, seed=0):
    """Correlated training rows and a test set (every row distinct)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / 3, torch.randn(40, d, generator=g)


# a base run whose stopping epoch is tuned, as every ablation value's is (the scripts' experiment.BASE keeps its
# whole schedule: test_the_base_run_keeps_its_whole_schedule_and_its_epochs_are_no_edge)
STOP_TUNED_BASE = Ablation((), ("-",))


def protocol(ablations=None, methods=("sgd",), seeds=1, **base):
    return experiment.Protocol(base=dict(dict(n_latents=8, k=2, epochs=2, batch_size=16), **base),
                               ablations=ablations or {"base": STOP_TUNED_BASE}, methods=methods, seeds=seeds,
                               base_seed=3)


def tune(p, out, space=SPACE, budgets=(2,), epochs=2, x=None, x_test=None, seed=0, **kw):
    x0, xt0 = data()
    return tuning.tune(p, space, budgets, epochs, x0 if x is None else x, xt0 if x_test is None else x_test, 0.25,
                       out, seed, progress=False, **kw)


def record_calls(monkeypatch, interrupt_at=None):
    """Wrap ``S._train_trial``: one dict per call (study, values, epochs, rows, curve; ``main``: a counted
    trial, given the pruning hook, rather than a trial past an edge). ``interrupt_at``: the counted trial (1-based,
    among this wrapper's calls) at whose start a KeyboardInterrupt stops the tuning, as a kill would."""
    calls = []
    real = S._train_trial

    def wrapped(study, values, epochs, x_fit, x_val, report=None):
        call = dict(study=study, values=dict(values), epochs=epochs, x_fit=x_fit, x_val=x_val, main=report is not None)
        calls.append(call)
        if interrupt_at is not None and call["main"] and sum(c["main"] for c in calls) == interrupt_at:
            raise KeyboardInterrupt
        call["curve"] = real(study, values, epochs, x_fit, x_val, report)
        return call["curve"]

    monkeypatch.setattr(S, "_train_trial", wrapped)
    return calls


def only_study(out):
    (st,) = tuning.json_record(out)["studies"]
    return st


# --- the pieces -------------------------------------------------------------------------------------------
def test_validation_split_is_a_seeded_partition():
    fit, val = tuning.validation_split(200, 0.1, seed=5)
    assert len(val) == 20 and len(fit) == 180
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(200))
    again = tuning.validation_split(200, 0.1, seed=5)
    assert torch.equal(fit, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, tuning.validation_split(200, 0.1, seed=6)[1])
    assert [len(p) for p in tuning.validation_split(2, 0.01, seed=5)] == [1, 1]   # at least one row each side
    assert [len(p) for p in tuning.validation_split(3, 0.99, seed=5)] == [1, 2]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction"):
            tuning.validation_split(200, bad, seed=5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        tuning.validation_split(1, 0.5, seed=5)


def test_every_method_draws_the_shared_ranges_and_its_own_and_never_what_the_ablation_fixes():
    space = {"lr": (1e-4, 1e-1), "weight_decay": (1e-6, 1e-2),
             "pam": {"mu_nu": (1e-6, 1e-2), "solve_order": ("enc_first", "dec_first")}}
    shared = {"lr": (1e-4, 1e-1), "weight_decay": (1e-6, 1e-2)}
    assert S.method_space(space, "sgd") == shared == S.method_space(space, "sgd_tied")
    assert S.method_space(space, "pam") == dict(shared, mu_nu=(1e-6, 1e-2), solve_order=("enc_first", "dec_first"))
    assert "weight_decay" not in S.method_space(space, "sgd", fixed=("weight_decay",))
    assert "mu_nu" not in S.method_space(space, "pam", fixed=("mu", "nu"))    # the mu_nu ablation sets both
    assert S.expand({"mu_nu": 1e-3, "lr": 0.1}) == {"mu": 1e-3, "nu": 1e-3, "lr": 0.1}
    for bad, match in (({}, "non-empty"), ({"lr": (0.0, 1.0)}, "0 < lo < hi"), ({"lr": (1e-2, 1e-3)}, "0 < lo < hi"),
                       ({"lr": (1e-3, math.inf)}, "0 < lo < hi"), ({"lr": "fast"}, "expected a range"),
                       ({"adam": {"lr": (1e-3, 1e-2)}}, "a method's own ranges"),
                       ({"pam": {"alpha": (1.0, 0.5)}}, r"pam: alpha: a range needs")):
        with pytest.raises(ValueError, match=match):
            S.method_space(bad, "pam")


def test_a_setting_is_on_the_edge_in_the_outer_five_percent_of_its_log_range():
    spec = (1e-4, 1e-2)                      # two decades: the outer 5% is a tenth of a decade at each end
    assert S.EDGE == 0.05
    assert S.edge_of("lr", 1e-2, spec) == S.edge_of("lr", 10 ** -2.09, spec) == "high"
    assert S.edge_of("lr", 10 ** -2.11, spec) is None and S.edge_of("lr", 1e-3, spec) is None
    assert S.edge_of("lr", 1e-4, spec) == S.edge_of("lr", 10 ** -3.91, spec) == "low"
    assert S.edge_of("lr", 10 ** -3.89, spec) is None
    # a low end that means "none" (no decay, no proximal term) is no edge; its high end is
    assert S.edge_of("weight_decay", 1e-4, spec) is None and S.edge_of("mu_nu", 1e-4, spec) is None
    assert S.edge_of("weight_decay", 1e-2, spec) == "high"
    assert S.edge_of("solve_order", "enc_first", ("enc_first", "dec_first")) is None


def test_the_split_partitions_each_values_own_training_rows_alike_for_every_method():
    """fit and validation rows are disjoint, together the value's training rows (its fraction subset), the same for
    every method of a replicate; a per-replicate ablation (the fraction) has its own subset and split in every
    replicate, the others one split, replicate 0's."""
    ablations = {"base": experiment.BASE, "fraction": Ablation(("fraction",), (0.5,)),
                 "weight_decay": Ablation(("weight_decay",), (0.0, 1e-3))}
    p = protocol(ablations, methods=("pam", "sgd", "sgd_tied"), seeds=3)
    jobs = tuning.plan_studies(p, SPACE, (2,), 2, n_train=100, val_fraction=0.2, seed=0)
    by = {}
    for study, rows, fit, val in jobs:
        by.setdefault((study.ablation, study.value, study.replicate), []).append((study, rows, fit, val))
    assert sorted(by) == sorted([("base", "-", 0), ("weight_decay", 0.0, 0), ("weight_decay", 1e-3, 0)]
                                + [("fraction", 0.5, r) for r in range(3)])   # one split per value but the fraction's
    splits = {}
    for (ablation, value, rep), studies in by.items():
        assert [s.method for s, *_ in studies] == ["pam", "sgd", "sgd_tied"]
        study, rows, fit, val = studies[0]
        assert study.settings["epochs"] == 2 and study.settings["stop_epoch"] == 0
        expected = training_rows(100, study.settings["fraction"], replicate_seed(p.base_seed, rep))
        assert rows == expected if isinstance(expected, slice) else torch.equal(rows, expected)
        n_rows = 100 if isinstance(rows, slice) else len(rows)
        assert n_rows == (50 if ablation == "fraction" else 100)
        assert not set(fit.tolist()) & set(val.tolist())
        assert sorted(fit.tolist() + val.tolist()) == list(range(n_rows)) and len(val) == round(0.2 * n_rows)
        for other, rows2, fit2, val2 in studies[1:]:     # every method: the same rows, the same split
            assert (other.split_seed, other.rseed) == (study.split_seed, study.rseed)
            assert torch.equal(fit, fit2) and torch.equal(val, val2)
            assert rows2 == rows if isinstance(rows, slice) else torch.equal(rows2, rows)
        absolute = (torch.arange(100) if isinstance(rows, slice) else rows)
        splits[(ablation, value, rep)] = (set(absolute[fit].tolist()), set(absolute[val].tolist()))
    fraction = [splits[("fraction", 0.5, r)] for r in range(3)]
    assert all(a[0] | a[1] != b[0] | b[1] for i, a in enumerate(fraction) for b in fraction[i + 1:])  # own subsets
    assert splits[("weight_decay", 0.0, 0)][1] != splits[("weight_decay", 1e-3, 0)][1]               # own seeds
    with pytest.raises(ValueError, match="budgets must be increasing"):
        tuning.plan_studies(p, SPACE, (3, 2), 2, 100, 0.2, 0)
    with pytest.raises(ValueError, match="tuning epochs"):
        tuning.plan_studies(p, SPACE, (2,), -1, 100, 0.2, 0)
    own = tuning.plan_studies(p, SPACE, (2,), 0, 100, 0.2, 0)   # 0: each run's own schedule
    assert {s.settings["epochs"] for s, *_ in own} == {p.settings(s.ablation, s.value, s.method)["epochs"] for s, *_ in own}
    with pytest.raises(ValueError, match="tuning space"):
        tuning.plan_studies(p, {"lr": (1.0, 0.1)}, (2,), 2, 100, 0.2, 0)


# --- what a study reads -------------------------------------------------------------------------------------
def test_tuning_a_value_reads_only_its_own_training_rows_and_never_the_test_set(tmp_path, monkeypatch):
    """Every training row outside the fraction subsets and the whole test set are NaN (training on one would fail:
    train checks its data finite); each study's fit and validation rows are its replicate's subset exactly."""
    x, _ = data(n=160)
    ablations = {"fraction": Ablation(("fraction",), (0.25, 0.5))}
    p = protocol(ablations, methods=("pam", "sgd"), seeds=2)
    subsets = {(f, r): training_rows(160, f, replicate_seed(p.base_seed, r)) for f in (0.25, 0.5) for r in (0, 1)}
    used = torch.zeros(160, dtype=torch.bool)
    for rows in subsets.values():
        used[rows] = True
    assert 0 < int(used.sum()) < 160
    index = {tuple(row.tolist()): i for i, row in enumerate(x)}    # rows are distinct: a row names its index
    poisoned = x.clone()
    poisoned[~used] = math.nan
    calls = record_calls(monkeypatch)
    tuned = tune(p, tmp_path, budgets=(2,), x=poisoned, x_test=torch.full((40, 12), math.nan))
    assert len(tuned) == 2 * 2 * 2       # 2 values x 2 replicates x 2 methods, each its own study
    seen = set()
    for c in calls:
        study = c["study"]
        fit = [index[tuple(r.tolist())] for r in c["x_fit"]]
        val = [index[tuple(r.tolist())] for r in c["x_val"]]
        own = subsets[(study.value, study.replicate)]
        assert sorted(fit + val) == sorted(own.tolist()), study.label   # its subset, all of it, nothing else
        assert not set(fit) & set(val)
        seen.add((study.value, study.replicate, study.method))
    assert len(seen) == 8


# --- the stopping epoch -------------------------------------------------------------------------------------
def test_the_stopping_epoch_is_the_best_epoch_of_its_trial_and_the_judged_run_stops_there(tmp_path, monkeypatch):
    x, xt = data()
    p = protocol(methods=("pam",), epochs=4, lr_schedule="warmup_decay", warmup_steps=4)
    calls = record_calls(monkeypatch)
    tuned = tune(p, tmp_path / "tuning", space={"lr": (0.12, 0.3)}, budgets=(4,), epochs=4, x=x, x_test=xt)
    st = only_study(tmp_path / "tuning")
    curves = {json.dumps(c["values"], sort_keys=True): c["curve"] for c in calls if c["main"]}
    for t in st["trials"]:
        curve = curves[json.dumps(t["values"], sort_keys=True)]
        assert t["val_mse"] == min(curve) and t["stop_epoch"] == 1 + curve.index(min(curve)) and t["epochs"] == 4
    choice = st["choices"]["4"]
    best = min(st["trials"], key=lambda t: t["val_mse"])
    assert (choice["trial"], choice["values"], choice["stop_epoch"]) == (best["number"], best["values"],
                                                                          best["stop_epoch"])
    stop = choice["stop_epoch"]
    assert 1 < stop < 4, "this setting was chosen for a best epoch before the last (overfitting at a high lr)"
    assert choice["epochs"] == 4 and not choice["extended"] and not choice["edge"]
    settings = tuned[TunedKey("base", "-", "pam", 0, 4)]
    assert settings == {"lr": choice["values"]["lr"], "epochs": 4, "stop_epoch": stop, "batch_size": 16}

    # the judged run: trained on every training row, stopped at that epoch with the schedule of 4 epochs
    rows, hist, _ = experiment.execute(replace(p, tuned=tuned), x, xt, tmp_path / "judged", progress=False)
    (row,) = rows
    assert (row["budget"], row["epochs"], row["stop_epoch"], row["steps"]) == (4, 4, stop, stop * math.ceil(96 / 16))
    judged = hist["pam|base=-|rep0|budget4"]
    assert [e["epoch"] for e in judged] == list(range(stop + 1))

    def metrics(h):
        return [{k: v for k, v in e.items() if not k.endswith("_time")} for e in h]

    full = protocol(methods=("pam",), epochs=4, lr_schedule="warmup_decay", warmup_steps=4, lr=settings["lr"])
    _, hist_full, _ = experiment.execute(full, x, xt, tmp_path / "full", progress=False)
    assert metrics(judged) == metrics(hist_full["pam|base=-|rep0"][:stop + 1])   # the 4-epoch run, cut at stop
    short = replace(full, base=dict(full.base, epochs=stop))
    _, hist_short, _ = experiment.execute(short, x, xt, tmp_path / "short", progress=False)
    assert metrics(judged)[-1] != metrics(hist_short["pam|base=-|rep0"])[-1]     # not a schedule of `stop` epochs


def test_the_tuning_schedule_sizes_the_min_steps_batch_and_the_judged_run_trains_with_the_trials_batch(tmp_path):
    """MIN_STEPS (an ablation's ``then``) sizes the batch over the tuned schedule, not the run's own epochs: half of
    96 rows with a batch of 16 over a schedule of 2 epochs makes 6 steps; MIN_STEPS = 24 gives a batch of 4 (12
    per epoch); sized over the run's own 8 epochs it would keep 16 and make 6. The judged run trains with the
    trials' batch (recorded with the choice), whatever its own epochs."""
    x, xt = data()
    fraction = Ablation(("fraction",), (0.5,), then=lambda s, f: runner.min_steps_batch(s, f, [96], 24))
    p = protocol({"fraction": fraction}, epochs=8)
    assert p.settings("fraction", 0.5, "sgd")["batch_size"] == 16          # 3 steps per epoch over 8 epochs
    (study, *_), = tuning.plan_studies(p, SPACE, (2,), 2, n_train=96, val_fraction=0.25, seed=0)
    assert (study.settings["epochs"], study.settings["batch_size"]) == (2, 4)
    tuned = tune(p, tmp_path / "tuning", budgets=(2,), epochs=2, x=x, x_test=xt)
    settings = tuned[TunedKey("fraction", 0.5, "sgd", 0, 2)]
    assert settings["batch_size"] == 4 and settings["epochs"] in (2, 3)
    rows, _, _ = experiment.execute(replace(p, tuned=tuned), x, xt, tmp_path / "judged", progress=False)
    (row,) = rows
    assert row["batch_size"] == 4 and row["steps"] == row["stop_epoch"] * 12


def test_a_min_steps_no_batch_can_give_is_refused_not_run_short():
    """48 rows over a schedule of 2 epochs make at most 96 steps (a batch of one): MIN_STEPS = 97 is refused with
    what was asked and what is possible, for the judged runs and for the tuning's plan alike; 96 is met."""
    n_rows = []  # the scripts' rule waits for the data: the protocol is built before they are loaded

    def fraction(need):
        return Ablation(("fraction",), (0.5,), then=lambda s, f: runner.min_steps_batch(s, f, n_rows, need))

    met, short = protocol({"fraction": fraction(96)}, epochs=2), protocol({"fraction": fraction(97)}, epochs=8)
    n_rows.append(96)
    assert met.settings("fraction", 0.5, "sgd")["batch_size"] == 1
    with pytest.raises(ValueError, match=r"MIN_STEPS=97 cannot be met at fraction 0.5: its 48 training rows over "
                                         r"2 epochs make at most 96 steps"):
        tuning.plan_studies(short, SPACE, (2,), 2, n_train=96, val_fraction=0.25, seed=0)   # a schedule of 2
    assert short.settings("fraction", 0.5, "sgd")["batch_size"] == 3   # its own 8 epochs: 16 steps each, 128 >= 97
    with pytest.raises(ValueError, match="cannot be met"):
        short.settings("fraction", 0.5, "sgd", schedule=2)


def test_the_base_run_keeps_its_whole_schedule_and_its_epochs_are_no_edge(tmp_path, monkeypatch):
    """The scripts' base run (equal-epochs and equal-time claims): a trial scores its last epoch, not its best, the
    judged run trains every epoch, and a curve still falling at its end gets no longer schedule and no edge mark."""
    def fake(study, values, epochs, x_fit, x_val, report=None):
        curve = [1.0 + values["lr"], 0.1 + values["lr"], 2.0 - values["lr"]]  # best at epoch 2; the end ranks by lr
        return curve[:epochs]

    monkeypatch.setattr(S, "_train_trial", fake)
    for base, stop, last_wins in ((experiment.BASE, 3, True), (STOP_TUNED_BASE, 2, False)):
        out = tmp_path / str(stop)
        tuned = tune(protocol(ablations={"base": base}, epochs=3), out, space={"lr": (0.1, 0.9)}, budgets=(4,),
                     epochs=3)
        (st,) = tuning.json_record(out)["studies"]
        c = st["choices"]["4"]
        lrs = [t["values"]["lr"] for t in st["trials"]]
        assert all(t["stop_epoch"] == stop for t in st["trials"])
        # the last epoch's order is the reverse of the best epoch's
        assert st["trials"][c["trial"]]["values"]["lr"] == (max(lrs) if last_wins else min(lrs))
        assert (c["stop_epoch"], c["epochs"]) == (stop, 3)
        assert "epochs" not in [e["setting"] for e in c["extended"]] and "epochs" not in c["edge"]
        assert tuned[TunedKey("base", "-", "sgd", 0, 4)]["stop_epoch"] == stop
    # the flag is part of the study's name: a journal of the other kind is never continued
    names = {tuning.json_record(tmp_path / str(s))["studies"][0]["name"] for s in (2, 3)}
    assert len(names) == 2


# --- budgets ---------------------------------------------------------------------------------------------------
def test_the_choice_at_each_budget_is_the_best_of_its_first_trials_and_budgets_nest(tmp_path):
    p = protocol()
    tune(p, tmp_path / "four", budgets=(1, 2, 3, 4))
    st = only_study(tmp_path / "four")
    assert len(st["trials"]) == 4 and [t["number"] for t in st["trials"]] == [0, 1, 2, 3]
    for b in (1, 2, 3, 4):
        best = min(st["trials"][:b], key=lambda t: t["val_mse"])
        choice = st["choices"][str(b)]
        assert choice["trial"] == best["number"], b
        if not any(e["setting"] != "epochs" for e in choice["extended"]):
            assert choice["values"] == best["values"]
    # a larger budget continues the smaller: its first trials are the smaller study's (the same seed)
    tune(p, tmp_path / "two", budgets=(2,))
    tune(p, tmp_path / "three", budgets=(3,))

    def trials(name, n):
        return [(t["values"], t["val_mse"], t["stop_epoch"]) for t in only_study(tmp_path / name)["trials"][:n]]

    assert trials("two", 2) == trials("three", 2) == trials("four", 2)
    assert trials("three", 3) == trials("four", 3)
    assert len({c["trial"] for c in st["choices"].values()}) > 1, "a later trial must win for the test to bite"


def test_early_trials_draw_the_same_shared_values_for_every_method(tmp_path):
    """Before TPE's model starts (10 trials), trial i of every method draws the same learning rate (the draws are
    seeded by the study's value and replicate and the trial's place, not by the method), even when PAM draws
    settings of its own too."""
    space = {"lr": (1e-3, 1e-1), "pam": {"mu_nu": (1e-6, 1e-2), "solve_order": ("enc_first", "dec_first")}}
    tune(protocol(methods=("pam", "sgd")), tmp_path, space=space, budgets=(3,), epochs=1)
    pam, sgd = tuning.json_record(tmp_path)["studies"]
    assert (pam["method"], sgd["method"]) == ("pam", "sgd")
    assert [t["values"]["lr"] for t in pam["trials"]] == [t["values"]["lr"] for t in sgd["trials"]]
    assert all(set(t["values"]) == {"lr", "mu_nu", "solve_order"} for t in pam["trials"])
    assert len({t["values"]["lr"] for t in pam["trials"]}) == 3


# --- edges -------------------------------------------------------------------------------------------------
def test_a_choice_at_the_top_of_its_range_is_extended_and_an_outermost_best_is_marked_edge(tmp_path):
    """lr in (1e-6, 2e-6) for 2 epochs: a larger lr always does better, and so does a longer schedule."""
    lo, hi = 1e-6, 2e-6
    out = tmp_path / "tuning"
    tuned = tune(protocol(), out, space={"lr": (lo, hi)}, budgets=(3,), seed=4)
    record = tuning.json_record(out)
    (st,) = record["studies"]
    c = st["choices"]["3"]
    best = st["trials"][c["trial"]]
    assert best == min(st["trials"], key=lambda t: t["val_mse"])
    lr = best["values"]["lr"]
    assert math.log(lr / lo) / math.log(hi / lo) >= 0.95, "seed 4 draws one trial in the top 5% of the range"
    ext_lr, ext_epochs = c["extended"]
    assert (ext_lr["setting"], ext_lr["side"]) == ("lr", "high")
    assert [t["values"]["lr"] for t in ext_lr["trials"]] == pytest.approx([2 * lr, 4 * lr, 8 * lr], rel=1e-12)
    mses = [best["val_mse"]] + [t["val_mse"] for t in ext_lr["trials"]]
    assert mses == sorted(mses, reverse=True) and len(set(mses)) == 4       # every step past the end did better
    assert (ext_epochs["setting"], ext_epochs["side"]) == ("epochs", "high")
    (longer,) = ext_epochs["trials"]
    assert longer["epochs"] == 3 and longer["values"]["lr"] == pytest.approx(8 * lr)   # 2 epochs x 1.5
    assert longer["val_mse"] < mses[-1] and longer["stop_epoch"] == 3
    assert (c["values"]["lr"], c["epochs"], c["stop_epoch"], c["val_mse"]) == (
        pytest.approx(8 * lr), 3, 3, longer["val_mse"])
    assert sorted(c["edge"]) == ["epochs", "lr"]
    assert tuning.edges(record) == {("base", "-", "sgd", 3): ["epochs", "lr"]}
    assert tuned[TunedKey("base", "-", "sgd", 0, 3)] == {"lr": c["values"]["lr"], "epochs": 3, "stop_epoch": 3,
                                                      "batch_size": 16}
    assert "*edge*: lr, epochs" in (out / "tuning.md").read_text()
    assert "On the edge of its range" in runner.tuning_note(record, out)


def test_an_extension_that_wins_inside_is_no_edge_nor_a_longer_schedule_that_loses(tmp_path, monkeypatch):
    """Validation curves given (no training): the best lr is 2.5 times below the lowest trial, at the low end of
    the range; the extension's first step wins, its second loses and the walk stops there (the optimum is
    bracketed: no edge, and x8 is never trained). The 2-epoch curves still fall at
    their last epoch, but the 3-epoch schedule does worse: the stopping epoch is no edge either."""
    lo, hi = 1e-3, 1e-1
    target = {}

    def fake(study, values, epochs, x_fit, x_val, report=None):
        lr = target.setdefault("first", values["lr"])  # trial 0, the chosen one (budget 1)
        miss = math.log(values["lr"] / (lr / 2.5)) ** 2
        curve = [miss + 1 / e for e in range(1, epochs + 1)] if epochs == 2 else [miss + 1.0] * epochs
        for e, v in enumerate(curve, 1):
            if report is not None:
                report(e, {"test_mse": v})
        return curve

    monkeypatch.setattr(S, "_train_trial", fake)
    out = tmp_path / "tuning"
    tuned = tune(protocol(), out, space={"lr": (lo, hi)}, budgets=(1,), seed=4)
    record = tuning.json_record(out)
    c = record["studies"][0]["choices"]["1"]
    lr = target["first"]
    assert S.edge_of("lr", lr, (lo, hi)) == "low", "seed 4's first trial is in the bottom 5% of the range"
    ext_lr, ext_epochs = c["extended"]
    assert (ext_lr["setting"], ext_lr["side"]) == ("lr", "low")
    assert [t["values"]["lr"] for t in ext_lr["trials"]] == pytest.approx([lr / 2, lr / 4], rel=1e-12)
    assert ext_lr["trials"][1]["val_mse"] > ext_lr["trials"][0]["val_mse"]
    assert c["values"]["lr"] == pytest.approx(lr / 2) and (c["epochs"], c["stop_epoch"]) == (2, 2)
    (longer,) = ext_epochs["trials"]
    assert longer["epochs"] == 3 and longer["val_mse"] > c["val_mse"]
    assert c["edge"] == [] and tuning.edges(record) == {}
    assert tuned[TunedKey("base", "-", "sgd", 0, 1)] == {"lr": c["values"]["lr"], "epochs": 2, "stop_epoch": 2,
                                                      "batch_size": 16}


# --- resuming ------------------------------------------------------------------------------------------------
def test_an_interrupted_tuning_resumes_where_it_stopped_and_draws_what_an_uninterrupted_one_does(tmp_path,
                                                                                                  monkeypatch):
    p = protocol()
    out = tmp_path / "tuning"
    tune(p, out, budgets=(2,))
    # a larger budget, killed at the start of its second new trial: trial 3 is left running in the journal
    with monkeypatch.context() as m:
        calls = record_calls(m, interrupt_at=2)
        with pytest.raises(KeyboardInterrupt):
            tune(p, out, budgets=(2, 4))
        assert sum(c["main"] for c in calls) == 2          # trials 0 and 1 came from the journal
    (journal,) = (out / "studies").iterdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (left,) = optuna.get_all_study_names(storage)
    states = [t.state.name for t in optuna.load_study(study_name=left, storage=storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "RUNNING"]
    with monkeypatch.context() as m:
        calls = record_calls(m)
        tune(p, out, budgets=(2, 4))
        assert sum(c["main"] for c in calls) == 1          # only the trial that was lost
    st = only_study(out)
    assert [t["number"] for t in st["trials"]] == [0, 1, 2, 4]   # trial 3 failed: never counted
    assert all(t["state"] == "complete" for t in st["trials"])
    states = [t.state.name for t in optuna.load_study(study_name=left, storage=storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    # the same trials and choices as a tuning never interrupted
    tune(p, tmp_path / "whole", budgets=(2, 4))
    whole = only_study(tmp_path / "whole")
    assert [(t["values"], t["val_mse"]) for t in st["trials"]] == [(t["values"], t["val_mse"]) for t in whole["trials"]]
    assert st["choices"] == {b: dict(c, trial=c["trial"] + (c["trial"] >= 3)) for b, c in whole["choices"].items()}
    # everything is in the journal now, the trials past an edge too: nothing is trained again
    with monkeypatch.context() as m:
        calls = record_calls(m)
        tune(p, out, budgets=(2, 4))
        assert calls == []
    assert only_study(out) == st
    with monkeypatch.context() as m:                      # unless asked not to resume
        calls = record_calls(m)
        tune(p, out, budgets=(2,), resume=False)
        assert sum(c["main"] for c in calls) == 2


# --- pruning and divergence --------------------------------------------------------------------------------
def test_pruning_is_the_same_for_every_method_and_a_pruned_trial_counts(tmp_path, monkeypatch):
    pruners = {}
    real = optuna.create_study

    def create_study(*a, **kw):
        pruners[kw["study_name"]] = kw["pruner"]
        return real(*a, **kw)

    monkeypatch.setattr(optuna, "create_study", create_study)
    calls = record_calls(monkeypatch)
    p = protocol(methods=("pam", "sgd", "sgd_tied"))
    tune(p, tmp_path, space={"lr": (1e-5, 1e-1)}, budgets=(6,), epochs=4)
    record = tuning.json_record(tmp_path)
    assert len(pruners) == 3
    settings = [(type(pr), vars(pr)) for pr in pruners.values()]
    assert settings[0][0] is optuna.pruners.MedianPruner and all(s == settings[0] for s in settings)
    assert settings[0][1]["_n_startup_trials"] == S.PRUNE_STARTUP and settings[0][1]["_n_warmup_steps"] == 2
    for st in record["studies"]:
        pruned = [t for t in st["trials"] if t["state"] == "pruned"]
        assert pruned, f"{st['method']}: a trial worse than the median must be pruned for the test to bite"
        assert len(st["trials"]) == 6                      # finished = complete + pruned
        assert sum(c["main"] for c in calls if c["study"].method == st["method"]) == 6   # none run to make up
        assert all(t["val_mse"] is None and t["pruned_at"] >= 2 and t["stop_epoch"] is None for t in pruned)
        assert st["choices"]["6"]["trial"] not in {t["number"] for t in pruned}
        assert f"| 6 ({len(pruned)}, 0) |" in (tmp_path / "tuning.md").read_text()


def test_a_diverging_trial_counts_and_is_never_chosen_and_all_diverging_is_an_error(tmp_path):
    x, xt = data()
    tune(protocol(), tmp_path / "some", space={"lr": (1e-2, 1e38)}, budgets=(4,), x=x)
    st = only_study(tmp_path / "some")
    diverged = [t for t in st["trials"] if t["diverged"]]
    assert diverged and len(diverged) < 4 and len(st["trials"]) == 4
    assert all(t["val_mse"] is None and "lower the learning rate" in t["diverged"] for t in diverged)
    assert st["choices"]["4"]["trial"] not in {t["number"] for t in diverged}
    assert f"| 4 (0, {len(diverged)}) |" in (tmp_path / "some" / "tuning.md").read_text()
    with pytest.raises(RuntimeError, match="none of the first 2 trials finished with a finite validation MSE"):
        tune(protocol(), tmp_path / "all", space={"lr": (1e36, 1e38)}, budgets=(2,), x=x)


# --- reusing a tuning ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small real tuning: base (tuned once) and a fraction (tuned per replicate), pam and sgd, 2 replicates."""
    p = protocol({"base": experiment.BASE, "fraction": Ablation(("fraction",), (0.5,))}, methods=("pam", "sgd"),
                 seeds=2)
    out = tmp_path_factory.mktemp("tuned")
    x, xt = data()
    space = {"lr": (1e-3, 1e-1), "pam": {"mu_nu": (1e-6, 1e-2)}}
    chosen = tuning.tune(p, space, (2, 3), 2, x, xt, 0.25, out, 0, progress=False)
    return p, chosen, out, experiment.fingerprint(x, xt, p.base_seed)


def test_a_value_tuned_once_serves_every_replicate_and_a_per_replicate_one_its_own(tuned):
    p, chosen, out, _ = tuned
    record = tuning.json_record(out)
    assert sorted((s["ablation"], s["replicate"], s["method"]) for s in record["studies"]) == sorted(
        [("base", 0, m) for m in ("pam", "sgd")] + [("fraction", r, m) for r in (0, 1) for m in ("pam", "sgd")])
    assert len(chosen) == 2 * 2 * 2 * 2      # (base, fraction) x 2 methods x 2 replicates x 2 budgets
    for m in ("pam", "sgd"):
        for b in (2, 3):
            assert chosen[TunedKey("base", "-", m, 0, b)] == chosen[TunedKey("base", "-", m, 1, b)]
            assert chosen[TunedKey("fraction", 0.5, m, 0, b)] != chosen[TunedKey("fraction", 0.5, m, 1, b)]
    assert set(chosen[TunedKey("base", "-", "pam", 0, 3)]) == {"lr", "mu", "nu", "epochs", "stop_epoch",
                                                                     "batch_size"}
    assert set(chosen[TunedKey("base", "-", "sgd", 0, 3)]) == {"lr", "epochs", "stop_epoch", "batch_size"}


def forged(out, tmp_path, change, digest=True):
    """A copy of ``out``'s tuning.json changed by ``change(record)``, its sha256 recomputed when ``digest``."""
    record = tuning.json_record(out)
    change(record)
    if digest:
        record["sha256"] = tuning._digest(record)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(record))
    return path


def test_reuse_accepts_an_untouched_record_for_the_same_data_and_settings(tuned):
    p, chosen, out, stamp = tuned
    again, record = tuning.reuse(out / "tuning.json", p, stamp)
    assert again == chosen and record == tuning.json_record(out)
    # a protocol needing fewer studies: only what it needs; more replicates of a value tuned once are served
    base_only = replace(p, ablations={"base": experiment.BASE}, seeds=3)
    sub, _ = tuning.reuse(out / "tuning.json", base_only, stamp)
    assert set(sub) == {TunedKey("base", "-", m, r, b) for m in ("pam", "sgd") for r in range(3) for b in (2, 3)}


def test_reuse_refuses_other_data_other_settings_an_edited_record_and_missing_studies(tuned, tmp_path):
    p, chosen, out, stamp = tuned
    path = out / "tuning.json"
    x, xt = data()
    with pytest.raises(ValueError, match="tuned on other data"):
        tuning.reuse(path, p, experiment.fingerprint(x + 1e-3, xt, p.base_seed))
    with pytest.raises(ValueError, match="tuned on other data"):
        tuning.reuse(path, p, experiment.fingerprint(x, xt, p.base_seed + 1))
    with pytest.raises(ValueError, match=r"other base settings.*k 2 vs 3"):
        tuning.reuse(path, replace(p, base=dict(p.base, k=3)), stamp)
    edited = forged(out, tmp_path, lambda r: r["studies"][0]["trials"][0].update(val_mse=1e-9), digest=False)
    with pytest.raises(ValueError, match="changed after it was written"):       # edited, sha256 left
        tuning.reuse(edited, p, stamp)
    for ablations, seeds, methods in (({"base": experiment.BASE, "fraction": Ablation(("fraction",), (0.5, 0.25))}, 2,
                                       ("pam", "sgd")),
                                      (p.ablations, 3, ("pam", "sgd")),               # fraction: per replicate
                                      (p.ablations, 2, ("pam", "sgd", "sgd_tied"))):
        with pytest.raises(ValueError, match="no tuned choice for"):
            tuning.reuse(path, replace(p, ablations=ablations, seeds=seeds, methods=methods), stamp)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for broken in (bad, tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="not a tuning.json"):
            tuning.reuse(broken, p, stamp)


def test_reuse_refuses_a_choice_that_is_not_the_best_recorded_trial_even_with_its_sha256_recomputed(tuned, tmp_path):
    p, _, out, stamp = tuned
    record = tuning.json_record(out)
    st = record["studies"][1]                              # sgd at the base value
    choice = st["choices"]["3"]
    worse = next(t for t in st["trials"] if t["number"] != choice["trial"] and t["val_mse"] is not None)

    def values(r):      # another trial's values, the choice's score kept
        r["studies"][1]["choices"]["3"]["values"] = dict(worse["values"])

    def trial(r):       # another trial's values and score: not the lowest
        r["studies"][1]["choices"]["3"].update(values=dict(worse["values"]), val_mse=worse["val_mse"],
                                               trial=worse["number"])

    def lower(r):       # a lower score than any trial reached
        r["studies"][1]["choices"]["3"]["val_mse"] = choice["val_mse"] / 2

    def stop(r):        # another stopping epoch
        r["studies"][1]["choices"]["3"]["stop_epoch"] = choice["stop_epoch"] % 2 + 1

    def schedule(r):    # another schedule
        r["studies"][1]["choices"]["3"]["epochs"] = 2 * choice["epochs"]

    for change in (values, trial, lower, stop, schedule):
        with pytest.raises(ValueError, match="is not the best of its recorded trials"):
            tuning.reuse(forged(out, tmp_path, change), p, stamp)
    assert tuning.reuse(forged(out, tmp_path, lambda r: None), p, stamp)[0] == tuning.chosen_settings(record, p)


def test_a_longer_schedule_is_half_as_long_again_rounded_up_and_at_least_one_epoch_more():
    assert [S.longer_schedule(e) for e in (1, 2, 5, 10, 20)] == [2, 3, 8, 15, 30]
