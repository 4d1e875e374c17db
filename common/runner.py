"""The SGD-vs-PAM-SGD protocol run end to end: tune where judged (or reuse a tuning), train, figures, summary.

E2 and E3 (and any script built like them) declare their constants, ablations and data, then call
``prepare`` before loading any data (every setting of the tuning checked) and ``run`` once the data are in
memory. The steps, in order: each method tuned at each ablation value on validation rows of that value's own
training data (common/tuning.py), or an earlier tuning reused (``tuned_from``); every run trained (once per
tuning budget, common/experiment.py); the ablation figures and base curves of the largest budget; the summary
with every budget. docs/DESIGN.md, section 5.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import experiment, tuning
from .config import write_text


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
    experiment.ablation_figures(main, histories, out, label + (f", budget {budget}" if budget else ""))
    if any(r["ablation"] == "base" for r in main):
        experiment.base_curves(histories, out, label, budget=budget)
    text = experiment.summary(rows, title, tuning_note(record, where))
    write_text(out / "summary.md", text)
    print(text)
    return Result(rows, histories, models, record, budget)
