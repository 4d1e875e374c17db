"""train(): SGD, tied SGD and PAM-SGD lower the loss; one history format; options do what they say."""
import math

import pytest
import torch

from common.infra.data import DataError
from common.maths.metrics import evaluate
from common.maths.sae import SAE
from common.maths.train import TrainConfig, train


def toy(n=600, n_features=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, n_features, generator=g)
    codes = torch.randn(n, 6, generator=g).clamp(min=0)
    x = codes @ basis + 0.05 * torch.randn(n, n_features, generator=g)
    return x[: n * 5 // 6], x[n * 5 // 6:]


def run(method, activation="topk", **kw):
    xtr, xte = toy()
    model = SAE(10, 16, activation, k=None if activation == "relu" else 3, tied=method == "sgd_tied", seed=1)
    cfg = TrainConfig(method=method, epochs=kw.pop("epochs", 6), batch_size=32, lr=1e-2, **kw)
    return model, train(model, xtr, xte, cfg, seed=2, progress=False), xtr, xte


@pytest.mark.parametrize("method", ["sgd", "sgd_tied", "pam"])
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_training_lowers_the_loss(method, activation):
    _, hist, _, _ = run(method, activation, l1=1e-4 if activation == "relu" else 0.0)
    assert hist[-1]["train_mse"] < 0.5 * hist[0]["train_mse"]
    assert hist[-1]["test_mse"] < 0.5 * hist[0]["test_mse"]
    keys = set(hist[0]) - {"objective_before_solve", "objective_after_solve", "ridge"}
    for row in hist:
        assert keys <= set(row)
        assert all(math.isfinite(row[k]) for k in keys if k != "loss" or row["epoch"] > 0)
    assert hist[-1]["samples_seen"] == 6 * 500 and hist[-1]["grad_steps"] == 6 * math.ceil(500 / 32)


def test_pam_history_format_equals_sgd_and_train_metrics_from_stats_are_exact():
    model, hist, xtr, _ = run("pam", mu=1e-3, nu=1e-3)
    _, hist_sgd, _, _ = run("sgd", mu=1e-3, nu=1e-3)
    assert set(hist_sgd[-1]) <= set(hist[-1])
    direct = evaluate(model, xtr)
    for key in ("mse", "fvu", "l0", "dead"):
        assert abs(hist[-1][f"train_{key}"] - direct[key]) < 1e-6 * max(1, direct[key])
    for row in hist[1:]:  # the exact decoder step never raises its objective
        assert row["objective_after_solve"] <= row["objective_before_solve"] + 1e-12


def test_pam_decoder_is_solved_not_stepped_and_stays_trainable():
    model, hist, _, _ = run("pam", epochs=1)
    assert model.W_dec.requires_grad and model.W_dec.grad is None
    ref = SAE(10, 16, "topk", 3, seed=1)
    assert not torch.equal(model.W_dec, ref.W_dec)  # the solve replaced the decoder


@pytest.mark.parametrize("opts", [dict(solve_order="dec_first"), dict(solve_every=2), dict(solve_samples=100),
                                  dict(updates_per_batch=3), dict(prox_form="l2", mu=1e-3, nu=1e-3),
                                  dict(weight_decay=1e-3), dict(alpha=1e-4, beta=1e-4)])
def test_pam_options_run_and_learn(opts):
    _, hist, _, _ = run("pam", **opts)
    assert hist[-1]["test_mse"] < 0.5 * hist[0]["test_mse"]
    if opts.get("updates_per_batch") == 3:
        assert hist[-1]["grad_steps"] == 3 * 6 * math.ceil(500 / 32)
    if opts.get("solve_every") == 2:
        assert "objective_after_solve" in hist[2] and "objective_after_solve" not in hist[1]


def watch_solves(monkeypatch):
    """Record every decoder solve of train(): the decoder before and after it, the rows its statistics came
    from, and the statistics the solve used."""
    import common.maths.train as T
    solves = []
    real_solve, real_collect, real_decoder = T._solve, T.collect_stats, T.solve_decoder

    def solve(model, x_train, cfg, gen, scored=True):
        solves.append({"before": model.W_dec.detach().clone()})
        out = real_solve(model, x_train, cfg, gen, scored)
        solves[-1]["after"] = model.W_dec.detach().clone()
        return out

    def collect(model, x, *args):
        stats = real_collect(model, x, *args)
        solves[-1].update(rows=x.clone(), collected=stats)
        return stats

    def decoder(stats, *args, **kwargs):
        solves[-1]["used"] = stats
        return real_decoder(stats, *args, **kwargs)

    monkeypatch.setattr(T, "_solve", solve)
    monkeypatch.setattr(T, "collect_stats", collect)
    monkeypatch.setattr(T, "solve_decoder", decoder)
    return solves


@pytest.mark.parametrize("order,due", [("enc_first", [2, 4, 6]), ("dec_first", [1, 3, 5])])
def test_solve_every_solves_on_due_epochs_only(monkeypatch, order, due):
    """solve_every = 2: a solve closes epochs 2, 4, 6 (enc_first) or opens epochs 1, 3, 5 (dec_first); the
    decoder is unchanged through every epoch without one, and the history records exactly the solves."""
    solves = watch_solves(monkeypatch)
    model, hist, _, _ = run("pam", solve_every=2, solve_order=order)
    assert [r["epoch"] for r in hist if "objective_after_solve" in r] == due and len(solves) == 3
    init = SAE(10, 16, "topk", 3, seed=1).W_dec.detach()
    assert torch.equal(solves[0]["before"], init)                 # no solve due before the first: untouched
    for done, nxt in zip(solves, solves[1:]):
        assert torch.equal(done["after"], nxt["before"])          # nothing moves the decoder between solves
        assert not torch.equal(done["before"], done["after"])     # a solve does
    assert torch.equal(solves[-1]["after"], model.W_dec.detach())  # (dec_first: epoch 6 has no solve)
    for r in hist:
        if r["epoch"] in due:
            assert r["objective_after_solve"] <= r["objective_before_solve"] + 1e-12


def test_solve_samples_takes_the_statistics_of_m_samples_rescaled(monkeypatch):
    """solve_samples = m < N: each solve's statistics come from m distinct training rows, a new draw each
    time, with every sum multiplied by N / m (so N counts as the training set's size); the history records
    the decoder objective before and after, and the training metrics come from an evaluation pass."""
    solves = watch_solves(monkeypatch)
    model, hist, xtr, _ = run("pam", solve_samples=100)
    n = xtr.shape[0]
    assert n == 500 and len(solves) == 6
    for sv in solves:
        rows, collected, used = sv["rows"], sv["collected"], sv["used"]
        assert rows.shape[0] == 100 == collected.n and used.n == 100 * (n / 100) == n
        match = (rows[:, None] == xtr[None]).all(-1)              # every row is one training row, none twice
        assert torch.equal(match.sum(1), torch.ones(100, dtype=torch.long)) and match.any(0).sum() == 100
        torch.testing.assert_close(used.sum_x, rows.double().sum(0) * (n / 100))
        torch.testing.assert_close(used.zx, collected.zx * (n / 100))
    assert not torch.equal(solves[0]["rows"], solves[1]["rows"])
    for r in hist[1:]:
        assert r["objective_after_solve"] <= r["objective_before_solve"] + 1e-12
    direct = evaluate(model, xtr)
    assert abs(hist[-1]["train_mse"] - direct["mse"]) < 1e-6 * max(1, direct["mse"])


def test_solve_samples_of_at_least_n_is_the_full_solve():
    full, hist_full, _, _ = run("pam")
    timing = ("epoch_time", "eval_time")
    for m in (500, 10_000):
        model, hist, _, _ = run("pam", solve_samples=m)
        assert torch.equal(model.W_dec, full.W_dec) and torch.equal(model.W_enc, full.W_enc)
        assert [{k: v for k, v in r.items() if k not in timing} for r in hist] == \
            [{k: v for k, v in r.items() if k not in timing} for r in hist_full]


def test_proximal_term_holds_parameters_near_anchor():
    free, _, _, _ = run("sgd", epochs=2)
    held, _, _, _ = run("sgd", epochs=2, mu=10.0, nu=10.0)
    init = SAE(10, 16, "topk", 3, seed=1)
    assert (held.W_enc - init.W_enc).norm() < 0.5 * (free.W_enc - init.W_enc).norm()


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="adam"), "method must be one of"), (dict(lr=0.0), "lr must be > 0"),
    (dict(solve_order="sideways"), "solve_order"), (dict(updates_per_batch=0), "updates_per_batch"),
    (dict(mu=-1.0), "mu must be"), (dict(prox_form="l3"), "prox_form"), (dict(batch_size=2.5), "batch_size"),
    (dict(epochs=3, stop_epoch=4), r"stop_epoch must be an integer in \[0, epochs = 3\]"),
    (dict(stop_epoch=-1), "stop_epoch"), (dict(stop_epoch=True), "stop_epoch"), (dict(stop_epoch=1.0), "stop_epoch")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_data_fails_before_training():
    xtr, xte = toy()
    xtr[3, 2] = float("nan")
    with pytest.raises(DataError, match="x_train holds 1 NaN/Inf"):
        train(SAE(10, 16, "topk", 3), xtr, xte, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"shape \(n_samples, 10\)"):
        train(SAE(10, 16, "topk", 3), torch.randn(5, 4), xte, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="needs a tied model"):
        train(SAE(10, 16, "topk", 3), *toy(), TrainConfig(method="sgd_tied", epochs=1), progress=False)


# --- jumprelu and batchtopk (docs/DESIGN.md 3.10) ------------------------------------------------------------
@pytest.mark.parametrize("method", ["sgd", "pam"])
@pytest.mark.parametrize("activation,opts", [("jumprelu", dict(l0=1e-3)), ("batchtopk", {})])
def test_thresholded_activations_train_and_lower_the_mse(method, activation, opts):
    _, hist, _, _ = run(method, activation, **opts)
    assert hist[-1]["train_mse"] < 0.5 * hist[0]["train_mse"]
    assert hist[-1]["test_mse"] < 0.5 * hist[0]["test_mse"]
    if method == "pam":
        for row in hist[1:]:  # the solve is exact on the inference codes, whatever the activation
            assert row["objective_after_solve"] <= row["objective_before_solve"] + 1e-12


def test_jumprelu_threshold_is_learned_kept_non_negative_and_the_l0_penalty_lowers_l0():
    free, hist_free, _, _ = run("sgd", "jumprelu")
    sparse, hist_sparse, _, _ = run("sgd", "jumprelu", l0=3e-2)
    assert (sparse.threshold >= 0).all() and (free.threshold >= 0).all()
    assert sparse.threshold.max() > 0.05  # moved from 0 by the L0 estimator
    assert hist_sparse[-1]["train_l0"] < 0.7 * hist_free[-1]["train_l0"]
    pam, _, _, _ = run("pam", "jumprelu", l0=3e-2)
    assert pam.threshold.max() > 0.05  # an encoder parameter: PAM's encoder phase trains it


def test_batchtopk_training_sets_its_inference_threshold():
    model, hist, xtr, _ = run("sgd", "batchtopk")
    assert float(model.threshold) > 0
    # at inference about k non-zeros per row on average (the threshold is the batches' smallest kept value)
    assert 1.5 < hist[-1]["train_l0"] < 6


def test_thresholded_activation_settings_are_checked():
    with pytest.raises(ValueError, match="an L0 penalty needs an activation with a learned threshold \\(jumprelu\\)"):
        run("sgd", "relu", l0=1e-3, epochs=1)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        TrainConfig(bandwidth=0.0)
    with pytest.raises(ValueError, match="l0 must be a finite number >= 0"):
        TrainConfig(l0=-1.0)


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_jumprelu_threshold_pushed_down_stops_at_zero(method):
    """Without an L0 penalty the reconstruction pulls thresholds down; each step projects them back onto >= 0."""
    xtr, xte = toy()
    model = SAE(10, 16, "jumprelu", seed=1)
    with torch.no_grad():
        model.threshold.fill_(0.02)
    train(model, xtr, xte, TrainConfig(method=method, epochs=3, batch_size=32, lr=1e-2), seed=2, progress=False)
    assert (model.threshold >= 0).all() and (model.threshold == 0).sum() >= 4


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_jumprelu_threshold_takes_the_bias_proximal_term(method):
    """The proximal anchors pair every trained parameter with its own start (the threshold, an encoder
    parameter, with nu like a bias): huge nu pins it, mu leaves it free."""
    pinned, _, _, _ = run(method, "jumprelu", l0=3e-2, mu=1e-3, nu=1e3, epochs=2)
    free, _, _, _ = run(method, "jumprelu", l0=3e-2, mu=1e3, nu=1e-3, epochs=2)
    assert pinned.threshold.abs().max() < 1e-3 < free.threshold.max()


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_stop_epoch_ends_the_run_on_the_schedule_of_its_epochs(method):
    """stop_epoch cuts the run; the learning-rate schedule still spans ``epochs`` (the same history as the whole
    run up to there, another one than a run of stop_epoch epochs)."""
    def strip(hist):
        return [{k: v for k, v in e.items() if not k.endswith("_time")} for e in hist]

    sched = dict(lr_schedule="warmup_decay", warmup_steps=20)
    _, whole, _, _ = run(method, epochs=4, **sched)
    _, stopped, _, _ = run(method, epochs=4, stop_epoch=2, **sched)
    _, short, _, _ = run(method, epochs=2, **sched)
    assert [e["epoch"] for e in stopped] == [0, 1, 2] and stopped[-1]["grad_steps"] == 2 * math.ceil(500 / 32)
    assert strip(stopped) == strip(whole[:3])
    assert strip(stopped)[-1] != strip(short)[-1]
    _, full, _, _ = run(method, epochs=3, stop_epoch=3)      # stop_epoch = epochs: the whole run
    assert len(full) == 4


def test_report_sees_every_epoch_and_can_end_the_run_and_score_train_false_skips_training_metrics():
    xtr, xte = toy()
    seen = []

    class Stop(Exception):
        pass

    def report(epoch, row):
        seen.append((epoch, row["test_mse"]))
        if epoch == 2:
            raise Stop

    model = SAE(10, 16, "topk", 3, seed=1)
    with pytest.raises(Stop):
        train(model, xtr, xte, TrainConfig(method="sgd", epochs=4, batch_size=32, lr=1e-2), seed=2, progress=False,
              report=report)
    assert [e for e, _ in seen] == [1, 2]
    _, hist, _, _ = run("sgd", epochs=2)
    assert [mse for _, mse in seen] == [e["test_mse"] for e in hist[1:3]]
    for method in ("sgd", "pam"):
        _, scored, _, _ = run(method, epochs=2)
        unscored = train(SAE(10, 16, "topk", 3, seed=1), xtr, xte,
                         TrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2), seed=2, progress=False,
                         score_train=False)
        for a, b in zip(scored, unscored):
            assert {k: v for k, v in a.items() if k.startswith("test_")} == \
                   {k: v for k, v in b.items() if k.startswith("test_")}
        # the training metrics are skipped, and PAM's decoder objective around each solve (a diagnostic): the
        # validation curve above is the same, and so is the trained decoder (PAM's ridge recorded alike)
        assert not any("train_mse" in e or "objective_after_solve" in e or "objective_before_solve" in e
                       for e in unscored)
        assert [e.get("ridge") for e in scored] == [e.get("ridge") for e in unscored]
        if method == "pam":
            assert all("objective_after_solve" in e for e in scored[1:])


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_eval_every_evaluates_some_epochs_and_always_the_last_without_changing_training(method):
    """eval_every: the train/test metrics at epoch 0, every eval_every-th epoch and the last epoch run (its stop
    epoch when it stops early), each equal to an every-epoch run's; the training (loss, PAM's objective) unchanged."""
    def strip(e):
        return {k: v for k, v in e.items() if not k.endswith("_time")}

    _, every, _, _ = run(method, epochs=7)
    for kw, evaluated in ((dict(epochs=7, eval_every=3), [0, 3, 6, 7]), (dict(epochs=7, eval_every=3, stop_epoch=5),
                                                                         [0, 3, 5]), (dict(epochs=7, eval_every=9), [0, 7])):
        _, some, _, _ = run(method, **kw)
        assert [e["epoch"] for e in some if "test_mse" in e] == evaluated
        assert [e["epoch"] for e in some if "train_mse" in e] == evaluated
        for e in some:
            full = strip(every[e["epoch"]])
            if "test_mse" in e:
                assert strip(e) == full
            else:  # the loss, steps and PAM's objective as before; no metric
                assert strip(e) == {k: v for k, v in full.items() if not k.startswith(("train_", "test_"))}
    with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
        TrainConfig(eval_every=0)
