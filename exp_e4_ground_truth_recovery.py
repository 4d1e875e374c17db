"""E4: ground truth. SGD vs PAM-SGD on synthetic data whose features are known, against the number of training samples.

The data (common/infra/synthetic.py, docs/DESIGN.md section 10): N_TRUE unit-norm atoms in N_FEATURES dimensions,
sparse non-negative codes with Zipf firing frequencies and heavy-tailed magnitudes, optional co-firing groups,
Gaussian noise. One draw of the largest training set (the pool) and a fixed test set; a run with n samples
trains on a seeded subset of n of the pool (the same subset for every method within a replicate). Every run
takes about STEPS Adam steps whatever n (epochs = ceil(STEPS / batches per epoch)), so fewer samples means more
epochs, never less optimisation. Each run's row has, beside test MSE / FVU / L0 / dead, the recovery of the
true atoms by the learned decoder atoms (common/maths/metrics.py ``recovery``): recovered_fraction (|cosine| >=
metrics.RECOVERY_THRESHOLD = 0.9), mmcs_true_to_learned and mmcs_learned_to_true.

Outputs under results/exp_e4_ground_truth_recovery/: recovery_vs_samples.png (+ .json: means, sd and 95%
intervals over seeds, every seed's value), ablation_n_train.png (+ .json), synthetic.json (the generator's
settings, each feature's firing probability and its frequency in the pool), table.csv / table.json (a row per
run), histories.json, summary.md (MSE and recovery per method and sample count, and whether the two rankings agree).

    python exp_e4_ground_truth_recovery.py                       # the default sweep (a few minutes on 2 cores)
    python exp_e4_ground_truth_recovery.py --quick               # tiny, seconds
    python exp_e4_ground_truth_recovery.py --N_TRAINS=256,4096 --SEEDS=3 --CORRELATION=0.5 --GROUP_SIZE=4
    python exp_e4_ground_truth_recovery.py --TUNE=True           # each method's settings chosen on a validation split
"""
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from common.experiments import experiment, runner
from common.experiments.config import at_least, configure, each, in_range, one_of, satisfies
from common.experiments.plotting import save
from common.experiments.recipe import recipe_settings
from common.infra.outputs import write_json, write_text
from common.infra.synthetic import MAGNITUDES, SyntheticConfig, generate
from common.maths import train
from common.maths.metrics import RECOVERY_THRESHOLD, recovery
from common.maths.sae import TOPK_ACTIVATIONS

# --- the synthetic data (common/infra/synthetic.py) ------------------------------------------------------
N_FEATURES = 64                  # dimensions of x
N_TRUE = 128                     # true features (atoms): twice the dimensions, in superposition
MEAN_ACTIVE = 5.0                # expected number of active true features per sample
ZIPF_EXPONENT = 1.0              # firing probability of the feature of rank i ~ (i + 1)^-ZIPF_EXPONENT
MAGNITUDE = "exponential"        # "exponential" (mean 1) or "lognormal" (median 1, LOGNORMAL_SIGMA)
LOGNORMAL_SIGMA = 1.0            # "lognormal" only
GROUP_SIZE = 1                   # features co-fire within consecutive groups of this size (1: independent)
CORRELATION = 0.0                # the Gaussian copula's correlation within a group (GROUP_SIZE >= 2)
NOISE_STD = 0.05                 # additive Gaussian noise per dimension (the clean x has per-dimension sd ~0.4)
N_TRAINS = (64, 256, 1024, 4096, 16384)  # the training-set sizes swept (the ablation "n_train"); pool = the largest
N_TEST = 512                     # the fixed test set, drawn after the pool
# --- the SAE and its training --------------------------------------------------------------------------
RECIPE = "modern"                # "modern" (the field's TopK recipe, common/experiments/recipe.py) or "paper"
N_LATENTS = 256
K = 8
TOPK_VARIANT = "topk"            # "topk" (signed), "topk_relu" or "topk_abs"
LR = 0.0                         # 0: the recipe's (modern: 2e-4 / sqrt(N_LATENTS / 2^14) = 1.6e-3; paper 3e-3)
STEPS = 1000                     # Adam steps per run, whatever its number of samples
BATCH_SIZE = 128
SOLVE_BATCH = 1024               # PAM: batch for collecting the decoder statistics only
STATS_DTYPE = "float64"          # PAM: "float32": statistics in float32, compensated
METHODS = ("sgd", "pam")
SEEDS = 5                        # replicate seeds (initialisation, subset, batch order), derived from SEED
SEED = 42                        # also draws the data (derive_seed(SEED, "data"))
WORKERS = 0                      # runs trained at once in single-thread processes; 0: one per core this process may use
DEVICE = "cpu"                   # auto (cuda if present), cpu, cuda or cuda:N; on a GPU one run at a time
RESUME = True                    # reuse the runs an interrupted invocation finished (same settings, data, code)
# --- tuning where each claim is judged (common/experiments/tuning.py; docs/DESIGN.md, section 5) ------------------
TUNE = False                     # each method tuned at each sample count (and replicate) on validation rows of its own
TUNE_BUDGETS = (8, 32)           # trials per method and study (Optuna TPE); results are reported at each budget
TUNE_EPOCHS = 0                  # the tuned runs' schedule length; 0: each run's own (about STEPS steps)
TUNE_VAL_FRACTION = 0.2          # of each sample count's training rows, held out for choosing (never the test set)
TUNE_PER_REPLICATE = ("n_train",)  # tuned again for every replicate (its own subset and split)
TUNED = ""                       # or the output folder of an earlier --TUNE=True run: reuse its choices
TUNE_SPACE = {                   # log-uniform ranges (lo, hi) shared by every method, then each method's own
    "lr": (1e-4, 3e-2), "weight_decay": (1e-6, 1e-2),
    "pam": {"mu_nu": (1e-6, 1e-2), "alpha": (1e-8, 1e-4), "solve_order": ("enc_first", "dec_first")},
}


def _correlation_ok(r, c) -> bool:
    g = c["GROUP_SIZE"]
    return r == 0 if g == 1 else -1 / (g - 1) < r < 1


ACCEPT = runner.accept(  # the rules shared by the SAE protocols (common/experiments/runner.py), then this script's own
    globals(),
    N_FEATURES=at_least(1),
    N_TRUE=at_least(1),
    MEAN_ACTIVE=in_range(0, "N_TRUE", lo_open=True),
    ZIPF_EXPONENT=at_least(0),
    MAGNITUDE=one_of(*MAGNITUDES),
    LOGNORMAL_SIGMA=in_range(0, None, lo_open=True),
    GROUP_SIZE=in_range(1, "N_TRUE"),
    CORRELATION=satisfies(_correlation_ok, "0 when --GROUP_SIZE is 1 (= {GROUP_SIZE}); otherwise a number in "
                                           "(-1 / (GROUP_SIZE - 1), 1) (a positive definite copula)"),
    NOISE_STD=at_least(0),
    N_TRAINS=each(at_least(1)),
    N_TEST=at_least(1),
    TOPK_VARIANT=one_of(*TOPK_ACTIVATIONS),
    STEPS=at_least(1),
    TUNE_PER_REPLICATE=each(one_of("n_train")),
)
QUICK = dict(N_FEATURES=16, N_TRUE=24, MEAN_ACTIVE=3.0, N_TRAINS=(32, 256), N_TEST=64, N_LATENTS=32, K=3, STEPS=24,
             BATCH_SIZE=32, SEEDS=2, WORKERS=1, TUNE_BUDGETS=(2, 3))

run = configure(globals(), quick=QUICK)
device = train.resolve_device(DEVICE)
workers = 1 if device.type != "cpu" else WORKERS or len(os.sched_getaffinity(0))
POOL = max(N_TRAINS)


def epochs_for(n: int) -> int:
    """Epochs that give about STEPS Adam steps on n samples (a last, smaller batch counts as a step)."""
    return math.ceil(STEPS / math.ceil(n / BATCH_SIZE))


def n_train(settings, n):
    """The ablation's value is a number of training samples: that share of the pool, and its epochs."""
    settings["fraction"] = n / POOL
    settings["epochs"] = epochs_for(n)


# --- the protocol (validated here, before any data is drawn) ---------------------------------------------
synthetic = SyntheticConfig(N_FEATURES, N_TRUE, mean_active=MEAN_ACTIVE, zipf_exponent=ZIPF_EXPONENT,
                            magnitude=MAGNITUDE, lognormal_sigma=LOGNORMAL_SIGMA, group_size=GROUP_SIZE,
                            correlation=CORRELATION, noise_std=NOISE_STD)  # ACCEPT has checked what it checks
recipe = recipe_settings(RECIPE, N_LATENTS, paper_lr=3e-3)
if LR:
    recipe["lr"] = LR
protocol = experiment.Protocol(
    base=dict(recipe, n_latents=N_LATENTS, activation=TOPK_VARIANT, k=K, epochs=epochs_for(POOL),
              batch_size=BATCH_SIZE, solve_batch=SOLVE_BATCH, stats_dtype=STATS_DTYPE),
    ablations={"n_train": experiment.Ablation(("fraction",), N_TRAINS, then=n_train)},
    methods=METHODS, seeds=SEEDS, base_seed=run.seed)
how = runner.Tuning(TUNE_SPACE, TUNE_BUDGETS, TUNE_EPOCHS, TUNE_VAL_FRACTION, TUNE_PER_REPLICATE) if TUNE else None
try:
    runner.prepare(protocol, how, POOL, run.seed)
except ValueError as err:
    run.fail(f"tuning: {err}")
if TUNED and not (Path(TUNED) / "tuning" / "tuning.json").is_file():
    run.fail(f"--TUNED={TUNED}: no tuning/tuning.json there (the output folder of a --TUNE=True run)")

# --- data (after every setting is validated) ------------------------------------------------------------
data = generate(synthetic, POOL + N_TEST, run.seed_for("data"))
x_train, x_test = data.x[:POOL], data.x[POOL:]
out = run.out
write_json(out / "synthetic.json", {"config": asdict(synthetic), "seed": run.seed_for("data"), "pool": POOL,
                                    "n_test": N_TEST, "firing_prob": data.firing_prob,
                                    "pool_frequency": (data.codes[:POOL] > 0).double().mean(0),
                                    "pool_mean_active": float((data.codes[:POOL] > 0).sum(1).double().mean())})


def recovery_of(model) -> dict:
    """The learned decoder atoms (a tied model's: the encoder rows) against the true dictionary."""
    return recovery(model.atoms.detach(), data.dictionary)


# --- runs, figures, summary ---------------------------------------------------------------------------------
label = (f"synthetic ({N_TRUE} true features in {N_FEATURES} dims), {N_LATENTS} latents, k {K}, {RECIPE} recipe"
         + (", tuned" if TUNE or TUNED else ""))
try:
    result = runner.run(protocol, x_train, x_test, out, f"E4, {label}: SGD vs PAM-SGD against training samples", label,
                        run.seed, how=how, tuned_from=Path(TUNED) / "tuning" / "tuning.json" if TUNED else None,
                        workers=workers, resume=RESUME, device=device, keep_models=None, extra_metrics=recovery_of)
except ValueError as err:
    run.fail(f"--TUNED={TUNED}: {err}" if TUNED else str(err))
rows = [r for r in result.rows if r.get("budget", 0) == result.budget]  # the figures' budget: the largest

RECOVERY_KEYS = ("recovered_fraction", "mmcs_true_to_learned", "mmcs_learned_to_true")


def spread(values) -> dict:
    """mean, sd (ddof 1), the 95% Student-t interval of the mean over seeds (the mean itself with one seed)."""
    v = np.asarray(values, dtype=np.float64)
    mean, sd = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(student_t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": len(v), "values": v.tolist()}


methods = [m for m in train.METHODS if m in METHODS]  # in training's order
stats = {m: {key: [spread([r[key] for r in rows if r["method"] == m and r["value"] == n]) for n in N_TRAINS]
             for key in (*RECOVERY_KEYS, "test_mse", "test_fvu")} for m in methods}


def recovery_figure():
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = ((axes[0], ("recovered_fraction",), f"true atoms recovered (fraction, |cos| >= {RECOVERY_THRESHOLD:g})"),
              (axes[1], ("mmcs_true_to_learned", "mmcs_learned_to_true"), "mean max |cosine| (MMCS)"),
              (axes[2], ("test_mse",), "test MSE (per entry)"))
    for ax, keys, ylabel in panels:
        for i, m in enumerate(methods):
            for key, style in zip(keys, ("-", "--")):
                s = stats[m][key]
                mean = [e["mean"] for e in s]
                tag = m if len(keys) == 1 else f"{m}, {'true->learned' if key.endswith('learned') else 'learned->true'}"
                ax.plot(N_TRAINS, mean, style, marker="o", color=f"C{i}", label=tag)
                ax.fill_between(N_TRAINS, [e["ci95"][0] for e in s], [e["ci95"][1] for e in s], color=f"C{i}",
                                alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(N_TRAINS, [str(n) for n in N_TRAINS])
        ax.set_xlabel("training samples (log scale)")
        ax.set_ylabel(ylabel)
        if keys == ("test_mse",):  # a log axis: an interval reaching below 0 is cut at half the smallest mean
            ax.set_yscale("log")
            means = [e["mean"] for m in methods for e in stats[m]["test_mse"]]
            ax.set_ylim(0.5 * min(means), 2 * max(e["ci95"][1] for m in methods for e in stats[m]["test_mse"]))
        else:
            ax.set_ylim(0, 1.02)
        ax.axvline(N_LATENTS, color="0.5", lw=0.8, ls=":", label=f"{N_LATENTS} latents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{label}: recovery of the true features vs training samples "
                 f"(mean and 95% interval over {SEEDS} seeds)", fontsize=10)
    fig.tight_layout()
    save(fig, out / "recovery_vs_samples.png",
         {"n_train": list(N_TRAINS), "threshold": RECOVERY_THRESHOLD, "seeds": SEEDS, "interval": "95% Student t",
          "methods": {m: {k: dict(zip(map(str, N_TRAINS), v)) for k, v in stats[m].items()} for m in methods}})


def ranking(key: str, i: int, lower_better: bool) -> str:
    """The method with the best mean at N_TRAINS[i] ('tie' when several share it)."""
    means = {m: stats[m][key][i]["mean"] for m in methods}
    best = (min if lower_better else max)(means.values())
    winners = [m for m, v in means.items() if v == best]
    return winners[0] if len(winners) == 1 else "tie"


recovery_figure()
lines = ["", f"## Recovery of the true features (learned decoder atoms vs the {N_TRUE} true atoms)", "",
         f"Mean ± sd over {SEEDS} seeds. recovered = fraction of true atoms with a learned atom at |cosine| >= "
         f"{RECOVERY_THRESHOLD:g}; MMCS t->l = mean over true atoms of the best |cosine|; l->t = over learned atoms. "
         "Rankings: the best mean test MSE and the best mean recovered fraction.", "",
         "| n_train | " + " | ".join(f"{m} recovered | {m} MMCS t->l | {m} MMCS l->t | {m} test MSE" for m in methods)
         + " | MSE best | recovery best | agree |", "|---" * (1 + 4 * len(methods) + 3) + "|"]
for i, n in enumerate(N_TRAINS):
    cells = []
    for m in methods:
        cells += [f"{stats[m][k][i]['mean']:.3f} ± {stats[m][k][i]['sd']:.3f}" for k in RECOVERY_KEYS]
        cells.append(f"{stats[m]['test_mse'][i]['mean']:.5f} ± {stats[m]['test_mse'][i]['sd']:.5f}")
    by_mse, by_rec = ranking("test_mse", i, True), ranking("recovered_fraction", i, False)
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {by_mse} | {by_rec} | {'yes' if by_mse == by_rec else 'no'} |")
text = (out / "summary.md").read_text() + "\n".join(lines) + "\n"
write_text(out / "summary.md", text)
print(text)
run.finish(data={"fingerprint": experiment.fingerprint(x_train, x_test, run.seed), "pool": POOL, "n_test": N_TEST})
