"""E2: SGD vs PAM-SGD on MNIST, for TopK then ReLU, with every ablation of the paper.

Methods: pam (PAM-SGD, the paper's Algorithm 3.1), sgd (the same untied SAE trained end to end by Adam,
the fair baseline), sgd_tied (decoder = encoder^T, the original scripts' baseline).
Outputs per activation under results/exp_e2_MNIST_SGD_PAM_ablations/<activation>/: curves_base.png,
ablation_<name>.png (+ .json), reconstructions.png, filters_<method>.png, latent_stems.png,
table.csv / table.json (a row per run), histories.json, summary.md, models/*.pt.

    python exp_e2_MNIST_SGD_PAM_ablations.py                     # the paper's protocol
    python exp_e2_MNIST_SGD_PAM_ablations.py --only=base,fraction --seeds=3 --EPOCHS=20
    python exp_e2_MNIST_SGD_PAM_ablations.py --RECIPE=modern --TUNE=True   # the field's recipe, tuned per method

With --TUNE=True each method's hyperparameters are first chosen on a validation split of the training
images (TUNE_GRID, the same number of trials per method; <activation>/tuning/tuning.md), then every run
uses them and is reported on the test set.
"""
import math
import os
from pathlib import Path

import torch

from common.experiments import experiment, figures, runner
from common.experiments.config import above, configure, each, in_range, one_of
from common.experiments.plotting import image_grid, save
from common.infra import distributed
from common.infra.data import load_mnist
from common.maths.sae import ACTIVATIONS as SAE_ACTIVATIONS
from common.maths.sae import TOPK_ACTIVATIONS
from common.maths.train import resolve_device

# --- the paper's / original settings -------------------------------------------------------------
RECIPE = "paper"                 # "paper" (the original settings) or "modern" (the field's TopK recipe, common/experiments/recipe.py)
ACTIVATIONS = ("topk", "relu")   # run in this order; any of common/maths/sae.py's table ("topk" runs TOPK_VARIANT)
N_LATENTS = 256
K = 15
L1 = 0.0                         # L1 on codes for relu (the MNIST original used none)
L0 = 1e-3                        # L0 on codes for jumprelu (straight-through estimator; docs/DESIGN.md 3.10; untuned)
TOPK_VARIANT = "topk"            # "topk" (signed, the theory's) or "topk_abs" (the original script's)
LR = 0.0                         # 0: the recipe's (paper: PAPER_LR; modern 2e-4 / sqrt(N_LATENTS / 2^14) = 1.6e-3)
PAPER_LR = 3e-3                  # the original MNIST script's learning rate (the paper recipe's)
EPOCHS = 50
BATCH_SIZE = 128
EVAL_EVERY = 1                   # train/test metrics every this many epochs (and at the last); the curves
                                 # show those epochs, the tables the last
SOLVE_BATCH = 1024               # batch for collecting the decoder statistics only
ENC_INIT_SCALE = 0.1             # W_enc ~ 0.1 N(0, 1)
DEC_INIT_SCALE = 0.01            # W_dec ~ 0.01 N(0, 1) (PAM and untied SGD)
MU = 0.0                         # proximal coefficients in the base runs
NU = 0.0
ALPHA = 0.0                      # decoder ridge (a tiny ridge is added when ALPHA = MU = 0)
BETA = 0.0
PROX_FORM = "proximal"           # "proximal" (ours) or "l2" (the original's plain L2 on the encoder)
SOLVE_EVERY = 1                  # PAM: solve the decoder every this many epochs (outer iterations)
SOLVE_SAMPLES = 0                # PAM: 0: all training samples; m > 0: statistics of m random ones, sums x N / m
STATS_DTYPE = "float64"          # PAM: "float32": statistics in float32, compensated (README, Devices)
METHODS = ("pam", "sgd", "sgd_tied")
UPDATES = (1, 3, 5, 10)
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
MU_NUS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
SEEDS = 1                        # replicate seeds, derived from SEED
SEED = 42
WORKERS = 0                      # runs trained at once in single-thread processes; 0: one per core this process
                                 # may use (small matmuls scale poorly across threads: README, bench/bench_train.py)
DEVICE = "cpu"                   # auto (cuda if present), cpu, cuda or cuda:N; on a GPU one run at a time
MIN_STEPS = 0                    # >0: a training fraction whose rows make fewer optimiser steps than this over its
                                 # schedule takes a smaller batch (at most BATCH_SIZE) that gives it this many (0: the paper)
RESUME = True                    # reuse the runs an interrupted invocation finished (same settings, data, code)
N_TRAIN = 0                      # 0: all 60,000 training images
N_TEST = 0                       # 0: all 10,000 test images
# --- tuning where each claim is judged (common/experiments/tuning.py; docs/DESIGN.md, section 5) ------------------
TUNE = False                     # each method tuned at each ablation value on validation rows of its own data
TUNE_BUDGETS = (8, 32)           # trials per method and study (Optuna TPE); results are reported at each budget
TUNE_EPOCHS = 20                 # the tuned runs' schedule length; the stopping epoch (<= this) is tuned too
TUNE_VAL_FRACTION = 0.2          # of each ablation value's training rows, held out for choosing (never the test set)
TUNE_PER_REPLICATE = ("fraction",)  # ablations tuned again for every replicate (their own split); others once
TUNED = ""                       # or the output folder of an earlier --TUNE=True run: reuse its choices
                                 # (<folder>/<activation>/tuning/tuning.json; the same data and settings required)
TUNE_SPACE = {                   # log-uniform ranges (lo, hi) shared by every method, then each method's own
    "lr": (1e-4, 3e-2), "weight_decay": (1e-6, 1e-2),
    "pam": {"mu_nu": (1e-6, 1e-2), "alpha": (1e-8, 1e-4), "solve_order": ("enc_first", "dec_first")},
}


def fraction_settings(settings, f):
    """The original's epoch rule for a training-fraction run (capped by EPOCHS for --quick; a tuned protocol's
    schedule is TUNE_EPOCHS when that is set), then MIN_STEPS over the schedule."""
    if not (TUNE and TUNE_EPOCHS):
        settings["epochs"] = min(EPOCHS, min(20, max(10, math.floor(20 * f))))
    runner.min_steps_batch(settings, f, n_rows, MIN_STEPS)


n_rows = []  # the training rows, set once the data are loaded (MIN_STEPS)


# the paper's ablations, each declared once: the settings it sets, the constant holding its values, the methods it
# concerns, what else follows from a value. ONLY (default: all) and TUNE_PER_REPLICATE accept these names.
ABLATIONS = {"updates": experiment.Ablation(("updates_per_batch",), "UPDATES", methods=("pam",)),
             "fraction": experiment.Ablation(("fraction",), "FRACTIONS", then=fraction_settings),
             "weight_decay": experiment.Ablation(("weight_decay",), "WEIGHT_DECAYS"),
             "mu_nu": experiment.Ablation(("mu", "nu"), "MU_NUS")}
ONLY = ("base", *ABLATIONS)
ACCEPT = runner.accept(globals(),  # the rules shared by the SAE protocols (common/experiments/runner.py), then this script's own
                       ACTIVATIONS=each(one_of(*SAE_ACTIVATIONS)), TOPK_VARIANT=one_of(*TOPK_ACTIVATIONS),
                       PAPER_LR=above(0), ONLY=runner.only_rule(ABLATIONS),
                       TUNE_PER_REPLICATE=runner.only_rule(ABLATIONS), N_TRAIN=in_range(0, 60_000),
                       N_TEST=in_range(0, 10_000))
QUICK = dict(N_TRAIN=400, N_TEST=200, EPOCHS=2, UPDATES=(1, 3), FRACTIONS=(0.1, 1.0), WEIGHT_DECAYS=(0.0, 1e-3),
             MU_NUS=(0.0, 1e-3), N_LATENTS=32, K=4, TUNE_BUDGETS=(2, 3), TUNE_EPOCHS=2)

run = configure(globals(), quick=QUICK)


def base_figures(base, digits, out, label):
    """The base runs' figures: the 10 test digits and each method's reconstructions on one intensity scale, each
    model's first encoder filters and decoder atoms, and the stem plots of their codes."""
    with torch.no_grad():
        recons = {m: model(digits)[0] for m, model in base.items()}
    stack = torch.cat([digits] + list(recons.values())).numpy()
    lo, hi = float(stack.min()), float(stack.max())   # one intensity scale for originals and every method
    fig = image_grid(stack, 10, row_labels=["original"] + list(recons), vmin=lo, vmax=hi,
                     suptitle=f"{label}: 10 test digits and their reconstructions")
    save(fig, out / "reconstructions.png",
         {"rows": ["original"] + list(recons), "vmin": lo, "vmax": hi,
          "mse_per_digit": {m: ((r - digits) ** 2).mean(1).tolist() for m, r in recons.items()}})
    for m, model in base.items():
        n_show = min(64, model.n_latents)
        enc = model.W_enc.detach()[:n_show].numpy()
        fig = image_grid(enc, 16, cmap="RdBu_r", cell=0.7, suptitle=f"{label} {m}: encoder filters (first {n_show})")
        save(fig, out / f"filters_{m}_encoder.png", {"latents": list(range(n_show))})
        if not model.tied:
            dec = model.W_dec.detach()[:n_show].numpy()
            fig = image_grid(dec, 16, cmap="RdBu_r", cell=0.7, suptitle=f"{label} {m}: decoder atoms (first {n_show})")
            save(fig, out / f"filters_{m}_decoder.png", {"latents": list(range(n_show))})
    figures.stem_plots(base, digits, out, label)


def main():
    device = resolve_device(DEVICE)
    workers = 1 if device.type != "cpu" else WORKERS or len(os.sched_getaffinity(0))
    ablations = runner.ablations(ABLATIONS, globals(), ONLY)
    how = runner.Tuning(TUNE_SPACE, TUNE_BUDGETS, TUNE_EPOCHS, TUNE_VAL_FRACTION, TUNE_PER_REPLICATE) if TUNE else None
    # --- the protocol per activation (validated here, before any data is loaded) -----------------------
    protocols = {}
    for act in ACTIVATIONS:
        base = runner.base_settings(globals(), TOPK_VARIANT if act == "topk" else act, PAPER_LR)
        protocols[act] = experiment.Protocol(base=base, ablations=ablations, methods=METHODS, seeds=SEEDS,
                                             base_seed=run.seed)
        try:
            runner.prepare(protocols[act], how, N_TRAIN or 60_000, run.seed)
        except ValueError as err:
            run.fail(f"tuning: {err}")
        if TUNED and not (Path(TUNED) / act / "tuning" / "tuning.json").is_file():
            run.fail(f"--TUNED={TUNED}: no {act}/tuning/tuning.json there (the output folder of a --TUNE=True run)")

    # --- data (after every setting is validated) ------------------------------------------------------
    with distributed.main_first():             # under torchrun rank 0 fetches MNIST if missing, then the others
        x_train, _, x_test, _ = load_mnist()
    if N_TRAIN:
        x_train = x_train[:N_TRAIN]
    if N_TEST:
        x_test = x_test[:N_TEST]
    n_rows.append(x_train.shape[0])
    digits = x_test[:10]                       # 10 fixed test digits for the reconstruction figure

    # --- runs, figures, summary -----------------------------------------------------------------------
    for act, protocol in protocols.items():
        out = run.dir(act)
        label = f"MNIST {protocol.base['activation']}, {RECIPE} recipe" + (", tuned" if TUNE or TUNED else "")
        try:
            result = runner.run(protocol, x_train, x_test, out, f"E2, {label}: SGD vs PAM-SGD", label, run.seed, how=how,
                                tuned_from=Path(TUNED) / act / "tuning" / "tuning.json" if TUNED else None,
                                workers=workers, resume=RESUME, device=device)
        except ValueError as err:
            run.fail(f"--TUNED={TUNED}: {err}" if TUNED else str(err))
        if "base" in ablations:
            ids = {m: experiment.RunSpec(m, "base", "-", 0, result.budget).id for m in METHODS}
            base_figures({m: result.models[i] for m, i in ids.items() if i in result.models}, digits, out, label)
    run.finish(data={"fingerprint": experiment.fingerprint(x_train, x_test, run.seed),
                     "n_train": len(x_train), "n_test": len(x_test)})


if __name__ == "__main__":
    main()
