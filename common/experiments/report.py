"""What a protocol's rows become: table.json and table.csv, the means over replicate seeds per tuning budget, and
summary.md (docs/DESIGN.md, section 5). A row is one run's final numbers (``experiment.run_one``).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..infra.outputs import atomic_write, write_json
from ..maths.train import METHODS

TABLE_COLUMNS = ("method", "activation", "ablation", "value", "replicate", "budget", "train_mse", "test_mse",
                 "train_fvu", "test_fvu", "l0", "dead", "uninformative", "epochs", "stop_epoch", "steps", "batch_size",
                 "samples_seen", "n_train", "wall_time", "train_time", "tuned", "shared_with",
                 # the loss recovered on the language model (E3 with LM_EVAL_TOKENS; common/maths/lm_eval.py): blank elsewhere
                 "ce_loss_score", "kl_div_score", "ce_sae", "kl_sae", "ce_loss_score_mean", "kl_div_score_mean")


def evaluated(history: list[dict], key: str, at=None) -> tuple[list, list]:
    """(x, values) of ``key`` over the epochs of a history that were evaluated (``TrainConfig.eval_every``); x is the
    epoch, or ``at[i]`` for epoch i."""
    pts = [(e["epoch"] if at is None else at[i], e[key]) for i, e in enumerate(history) if key in e]
    return [x for x, _ in pts], [v for _, v in pts]


def uninformative(test_fvu: float) -> bool:
    """A model with test FVU >= 1 reconstructs no better than the test set's mean: it never counts as a win."""
    return not test_fvu < 1.0


def write_table(rows: list[dict], out: Path) -> None:
    """table.json (every key of every row) and table.csv (TABLE_COLUMNS, then any other keys, e.g. a run's
    extra metrics, in order of first appearance)."""
    out = Path(out)
    write_json(out / "table.json", rows)
    columns = list(TABLE_COLUMNS) + list(dict.fromkeys(k for r in rows for k in r if k not in TABLE_COLUMNS))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in columns})
    atomic_write(out / "table.csv", write_csv)


def aggregate(rows: list[dict], metric: str = "test_mse") -> dict:
    """{(ablation, value, method): (mean, std, n)} over replicate seeds (std with ddof=0 when n = 1); rows of one
    tuning budget at a time (``by_budget``)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["ablation"], r["value"], r["method"]), []).append(float(r[metric]))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def by_budget(rows: list[dict]) -> dict:
    """{tuning budget: its rows}, largest budget first (0: runs not tuned where they are judged)."""
    out = {}
    for r in rows:
        out.setdefault(int(r.get("budget", 0)), []).append(r)
    return dict(sorted(out.items(), reverse=True))


def summary(rows: list[dict], title: str, tuning_note: str = "") -> str:
    """Markdown: per tuning budget, ablation and value, each method's test MSE, FVU, dead fraction, L0, stopping
    epoch and optimiser steps, and which method has the lowest test MSE and by how much. A method whose mean test
    FVU is >= 1 is marked "uninformative" and never wins. ``tuning_note``: how the settings were chosen."""
    lines = [f"# {title}", "", "Final test MSE (mean ± std over seeds; lower is better), test FVU, dead fraction "
             "(latents that never fire on the test set), test L0, the epoch the run stopped at / its schedule's "
             "epochs, and optimiser steps (means over seeds). 'margin' = how much higher the runner-up's mean test "
             "MSE is, relative to the winner's. A method with test FVU >= 1 (no better than predicting the mean) is "
             "marked *uninformative* and never wins.", ""]
    if tuning_note:
        lines += [tuning_note, ""]
    groups = by_budget(rows)
    for budget, brows in groups.items():
        if budget:
            lines += [f"## Tuning budget: {budget} trials per method and study", ""]
        lines += _summary_tables(brows, "###" if budget else "##")
    return "\n".join(lines)


def _summary_tables(rows: list[dict], level: str) -> list[str]:
    agg = {m: aggregate(rows, m) for m in ("test_mse", "test_fvu", "dead", "l0")}
    steps = {k: aggregate(rows, k) for k in ("stop_epoch", "epochs", "steps") if all(k in r for r in rows)}
    order = []
    for r in rows:
        if (r["ablation"], r["value"]) not in order:
            order.append((r["ablation"], r["value"]))
    present = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = []
    for ablation in dict.fromkeys(a for a, _ in order):
        lines += [f"{level} {ablation}", "", "| value | " + " | ".join(
            f"{m} test MSE | FVU | dead | L0 | epoch | steps" for m in present) + " | winner | margin |",
                  "|---" * (2 + 6 * len(present) + 1) + "|"]
        for a, v in order:
            if a != ablation:
                continue
            cells, means = [], {}
            for m in present:
                if (a, v, m) not in agg["test_mse"]:
                    cells.append("– | – | – | – | – | –")
                    continue
                mean, std, n = agg["test_mse"][(a, v, m)]
                fvu = agg["test_fvu"][(a, v, m)][0]
                if uninformative(fvu):
                    mark = " *uninformative*"
                else:
                    mark = ""
                    means[m] = mean
                ep = (f"{steps['stop_epoch'][(a, v, m)][0]:.1f} / {steps['epochs'][(a, v, m)][0]:.0f}"
                      if "stop_epoch" in steps and "epochs" in steps else "–")
                st = f"{steps['steps'][(a, v, m)][0]:.0f}" if "steps" in steps else "–"
                cells.append(f"{mean:.5f}" + (f" ± {std:.5f}" if n > 1 else "") + mark
                             + f" | {fvu:.4f} | {100 * agg['dead'][(a, v, m)][0]:.1f}% | {agg['l0'][(a, v, m)][0]:.1f}"
                             + f" | {ep} | {st}")
            ranked = sorted(means, key=means.get)
            winner = ranked[0] if ranked else "–"
            margin = "–"
            if len(ranked) > 1:
                margin = f"{(means[ranked[1]] - means[ranked[0]]) / means[ranked[0]] * 100:.1f}%"
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {winner} | {margin} |")
        lines.append("")
    return lines
