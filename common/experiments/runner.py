"""The SGD-vs-PAM-SGD protocol run end to end: tune where judged (or reuse a tuning), train, figures, summary.

E2 and E3 (and any script built like them) declare their constants, ablations and data, then call
``prepare`` before loading any data (every setting of the tuning checked) and ``run`` once the data are in
memory. The steps, in order: each method tuned at each ablation value on validation rows of that value's own
training data (common/experiments/tuning.py), or an earlier tuning reused (``tuned_from``); every run trained (once per
tuning budget, common/experiments/experiment.py); the ablation figures and base curves of the largest budget; the summary
with every budget. docs/DESIGN.md, section 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..infra.outputs import write_text
from ..maths.pam import STATS_DTYPES
from ..maths.sae import activation_spec
from ..maths.train import METHODS, device_available
from . import experiment, figures, report, tuning
from .config import above, at_least, boolean, each, in_range, one_of, satisfies
from .recipe import RECIPES, recipe_settings

# The constants every SAE-protocol script (E2, E3, E4) may declare, each mapped once to the setting it sets
# (experiment.SETTINGS) and checked once by the rule below. A script declares the ones it has, ACCEPT's rules apply
# to those, and ``base_settings`` builds the protocol's base settings from them.
SETTING_OF = {"N_LATENTS": "n_latents", "K": "k", "EPOCHS": "epochs", "BATCH_SIZE": "batch_size",
              "SOLVE_BATCH": "solve_batch", "ENC_INIT_SCALE": "enc_init_scale", "DEC_INIT_SCALE": "dec_init_scale",
              "MU": "mu", "NU": "nu", "ALPHA": "alpha", "BETA": "beta", "PROX_FORM": "prox_form",
              "SOLVE_EVERY": "solve_every", "SOLVE_SAMPLES": "solve_samples", "STATS_DTYPE": "stats_dtype",
              "EVAL_EVERY": "eval_every"}
ACCEPT = {
    "RECIPE": one_of(*RECIPES),
    "N_LATENTS": at_least(1),
    "K": in_range(1, "N_LATENTS"),
    "L1": at_least(0),
    "L0": at_least(0),
    "LR": at_least(0),
    "EPOCHS": at_least(1),
    "EVAL_EVERY": at_least(1),
    "BATCH_SIZE": at_least(1),
    "SOLVE_BATCH": at_least(1),
    "ENC_INIT_SCALE": above(0),
    "DEC_INIT_SCALE": at_least(0),
    "MU": at_least(0),
    "NU": at_least(0),
    "ALPHA": at_least(0),
    "BETA": at_least(0),
    "PROX_FORM": one_of("proximal", "l2"),
    "SOLVE_EVERY": at_least(1),
    "SOLVE_SAMPLES": at_least(0),
    "STATS_DTYPE": one_of(*STATS_DTYPES),
    "METHODS": each(one_of(*METHODS)),
    "UPDATES": each(at_least(1)),
    "FRACTIONS": each(in_range(0, 1, lo_open=True)),
    "WEIGHT_DECAYS": each(at_least(0)),
    "MU_NUS": each(at_least(0)),
    "SEEDS": at_least(1),
    "SEED": at_least(0),
    "WORKERS": at_least(0),
    "DEVICE": satisfies(lambda d, c: device_available(d), "auto, cpu, cuda or cuda:N (a CUDA device present)"),
    "RESUME": boolean(),
    "MIN_STEPS": at_least(0),
    **tuning.ACCEPT,
}


def accept(constants: dict, **own) -> dict:
    """A script's ACCEPT: the shared rules of the constants it declares, then its own (``own`` wins)."""
    return {k: v for k, v in ACCEPT.items() if k in constants} | own


def base_settings(constants: dict, activation: str, paper_lr: float) -> dict:
    """The protocol's base settings from a script's constants: the recipe's (``RECIPE``, ``LR`` when > 0, the paper's
    learning rate ``paper_lr``), every constant of SETTING_OF the script declares, the activation and the penalty
    its table entry takes (``L1`` or ``L0``)."""
    base = recipe_settings(constants["RECIPE"], constants["N_LATENTS"], paper_lr=paper_lr)
    if constants.get("LR"):
        base["lr"] = constants["LR"]
    base.update({setting: constants[c] for c, setting in SETTING_OF.items() if c in constants})
    penalty = activation_spec(activation).penalty
    base.update(activation=activation, l1=constants.get("L1", 0.0) if penalty == "l1" else 0.0,
                l0=constants.get("L0", 0.0) if penalty == "l0" else 0.0)
    return base


def ablations(table: dict, constants: dict, only) -> dict:
    """The ablations to run: ``table`` declares each once ({name: Ablation whose ``values`` names the constant
    holding them}); ``only`` picks them (every name when empty); "base" is the base run."""
    chosen = experiment.parse_only(only, ["base", *table])
    out = {}
    for name in chosen:
        if name == "base":
            out[name] = experiment.BASE
        else:
            a = table[name]
            out[name] = experiment.Ablation(a.sets, tuple(constants[a.values]), a.methods, a.then, a.tunes_stop)
    return out


def min_steps_batch(settings: dict, fraction: float, n_rows: list, min_steps: int) -> None:
    """A script's MIN_STEPS rule for a training fraction (an ablation's ``then``): with ``min_steps`` > 0, a
    fraction whose rows make fewer than ``min_steps`` optimiser steps over its schedule (``settings["epochs"]``)
    takes the largest batch (at most its own) that gives it ``min_steps``; ValueError when even a batch of one
    cannot (fewer rows times epochs than ``min_steps``). ``n_rows``: [the training rows], empty until the data are
    loaded (the rule then waits for them)."""
    if min_steps and n_rows:
        rows = max(1, math.floor(fraction * n_rows[0])) if fraction < 1.0 else n_rows[0]
        if rows * settings["epochs"] < min_steps:
            raise ValueError(f"--MIN_STEPS={min_steps} cannot be met at fraction {fraction:g}: its {rows} training "
                             f"rows over {settings['epochs']} epochs make at most {rows * settings['epochs']} steps "
                             "(a batch of one); lower MIN_STEPS or raise the epochs")
        per_epoch = math.ceil(min_steps / settings["epochs"])
        settings["batch_size"] = max(1, min(settings["batch_size"], rows // per_epoch))


def only_rule(table: dict):
    """ACCEPT's rule for ONLY and TUNE_PER_REPLICATE: the base run and the declared ablations."""
    return each(one_of("base", *table))


@dataclass(frozen=True)
class Tuning:
    """How a protocol is tuned (a script's TUNE_* constants)."""

    space: dict
    budgets: tuple
    epochs: int
    val_fraction: float
    per_replicate: tuple = ("fraction",)


@dataclass
class Result:
    rows: list
    histories: dict
    models: dict
    record: dict | None        # the tuning record (tuning.json), None when nothing was tuned
    budget: int                # the budget of the main figures (the largest; 0 untuned)
    protocol: experiment.Protocol  # the protocol that ran (with its tuned settings)


def prepare(protocol: experiment.Protocol, how: Tuning | None, n_train: int, seed: int) -> None:
    """Check a tuning plan before any data is loaded (ValueError naming what is wrong)."""
    if how is not None:
        tuning.plan_studies(protocol, how.space, how.budgets, how.epochs, n_train, how.val_fraction, seed,
                            how.per_replicate)


def tuning_note(record: dict | None, where: Path | None) -> str:
    if record is None:
        return ""
    edge = tuning.edges(record)
    note = (f"Settings chosen per ablation value, method{' and replicate (' + ', '.join(record['per_replicate']) + ')' if record['per_replicate'] else ''}"
            f" on validation rows of that value's own training data ({record['val_fraction']:g} held out; Optuna "
            f"TPE, budgets {', '.join(map(str, record['budgets']))} trials per study, the stopping epoch chosen "
            f"too); every trial and choice in {where}/tuning.md.")
    if edge:
        note += " **On the edge of its range after one extension**: " + "; ".join(
            f"{m} at {a}={v} (budget {b}): {', '.join(names)}" for (a, v, m, b), names in sorted(edge.items(), key=str))
    return note


def run(protocol: experiment.Protocol, x_train, x_test, out: Path, title: str, label: str, seed: int,
        how: Tuning | None = None, tuned_from: Path | None = None, workers: int = 1, resume: bool = True,
        device: str = "cpu", keep_models: str | None = "base", extra_metrics=None) -> Result:
    """Tune (``how``) or reuse (``tuned_from``: a tuning.json), train every run, write figures and summary.md.
    ``extra_metrics(model) -> dict``: more numbers for every trained run's row (experiment.execute)."""
    out = Path(out)
    record, where = None, None
    if how is not None:
        where = out / "tuning"
        print(f"== {label}: tuning each method at each ablation value on its own training rows")
        tuned = tuning.tune(protocol, how.space, how.budgets, how.epochs, x_train, x_test, how.val_fraction, where,
                            seed, per_replicate=how.per_replicate, workers=workers, resume=resume)
        record = tuning.json_record(where)
        protocol = replace(protocol, tuned=tuned)
    elif tuned_from is not None:
        where = Path(tuned_from).parent
        tuned, record = tuning.reuse(tuned_from, protocol, experiment.fingerprint(x_train, x_test,
                                                                                  protocol.base_seed))
        protocol = replace(protocol, tuned=tuned)
    print(f"== {label}: {len(protocol.plan())} runs ({x_train.shape[0]} train / {x_test.shape[0]} test samples)")
    rows, histories, models = experiment.execute(protocol, x_train, x_test, out, workers=workers, resume=resume,
                                                 device=device, keep_models=keep_models, extra_metrics=extra_metrics)
    budget = max(protocol.budgets, default=0)
    main = [r for r in rows if r.get("budget", 0) == budget]
    figures.ablation_figures(main, histories, out, label + (f", budget {budget}" if budget else ""))
    if any(r["ablation"] == "base" for r in main):
        figures.base_curves(histories, out, label, budget=budget)
    text = report.summary(rows, title, tuning_note(record, where))
    write_text(out / "summary.md", text)
    print(text)
    return Result(rows, histories, models, record, budget, protocol)
