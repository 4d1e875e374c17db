"""Hyperparameter tuning on a validation split held out from the training data (never the test set).

Fairness (docs/DESIGN.md, section 5): every method gets the same number of trials, the same epochs, the
same split and the same seeds; each trial is one configuration drawn without replacement from that
method's own grid (which must have at least that many points), and the settings that every method's grid offers
with the same values (e.g. ``lr``) take the same values in every method's trial ``i`` (``shared_draw``: distinct
ones while the shared grid has enough), so no method samples a shared setting more thinly because its grid has
more dimensions. The winner is the trial with the lowest validation MSE. A trial that diverges counts
as a failed trial (its error is recorded), never as a result. The chosen values are then used to
retrain on the whole training set, and only that model is evaluated on the test set.

``tuning.json`` records the protocol's base settings beside the chosen values, so a later run can reuse
them (``reuse``: a script's ``TUNED`` option) only for the same base settings; a mismatch is an error.

A grid maps a setting name to its candidate values; ``mu_nu`` sets ``mu`` and ``nu`` together:

    {"sgd": {"lr": (3e-4, 1e-3, 3e-3), "weight_decay": (0.0, 1e-4)},
     "pam": {"lr": (3e-4, 1e-3, 3e-3), "mu_nu": (0.0, 1e-4, 1e-3), "solve_order": ("enc_first", "dec_first")}}
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

from .config import at_least, boolean, derive_seed, in_range, satisfies, write_json, write_text
from .data import subset_indices
from .experiment import Protocol, Run, RunSpec, train_runs

ALIASES = {"mu_nu": ("mu", "nu")}
ACCEPT = {  # what a script's tuning constants accept (E2 and E3 include these in their ACCEPT)
    "TUNE": boolean(),
    "TUNE_TRIALS": at_least(1) & satisfies(
        lambda n, c: not c["TUNE"] or all(n <= math.prod(map(len, c["TUNE_GRID"][m].values())) for m in c["METHODS"]),
        "at most the number of points of every method's TUNE_GRID"),
    "TUNE_EPOCHS": at_least(0),
    "TUNE_VAL_FRACTION": in_range(0, 1, lo_open=True, hi_open=True),
    "TUNE_GRID": satisfies(lambda g, c: all(m in g for m in c["METHODS"]), "a grid for every method of --METHODS"),
    "TUNED": satisfies(lambda p, c: p == "" or (Path(p).is_dir() and not c["TUNE"]),
                       "empty, or the output folder of an earlier run of this script with --TUNE=True, whose chosen "
                       "values are reused (with --TUNE=False)"),
}


def expand(values: dict) -> dict:
    """Grid names -> settings (``mu_nu`` -> ``mu`` and ``nu``)."""
    out = {}
    for name, v in values.items():
        for key in ALIASES.get(name, (name,)):
            out[key] = v
    return out


def validation_split(n_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, validation indices): a seeded random ``fraction`` of the training samples held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    val = subset_indices(n_samples, fraction, seed)
    mask = torch.ones(n_samples, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().flatten(), val.sort().values


def _points(grid: dict) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _check_grid(grid: dict) -> None:
    if not grid:
        raise ValueError("an empty grid has nothing to tune")
    for name, values in grid.items():
        if not isinstance(values, (tuple, list)) or not values:
            raise ValueError(f"grid entry {name!r} must be a non-empty tuple of values, got {values!r}")


def shared_settings(grids: dict) -> list[str]:
    """The settings that every method's grid offers with the same values, in any order (e.g. ``lr``), in name
    order."""
    grids = list(grids.values())
    return sorted(n for n in grids[0] if all(n in g and set(g[n]) == set(grids[0][n]) for g in grids[1:]))


def shared_draw(grids: dict, n_trials: int, seed: int) -> list[dict]:
    """The values of the shared settings for trials 0 .. n_trials - 1, the same for every method: distinct points of
    their grid while there are enough, otherwise every point equally often (one more for some), in a seeded order."""
    names = shared_settings(grids)
    if not names:
        return [{} for _ in range(n_trials)]
    points = _points({n: next(iter(grids.values()))[n] for n in names})
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(points)) for _ in range(math.ceil(n_trials / len(points)))])
    return [points[i] for i in order[:n_trials]]


def trials(grid: dict, n_trials: int, seed: int, shared: list[dict] | None = None) -> list[dict]:
    """``n_trials`` distinct configurations of ``grid``, drawn with a seed (a grid smaller than that is an error).

    ``shared``: for each trial, the values some of its settings must take (``shared_draw``: the same for every
    method); the other settings are drawn from the grid, distinct among the trials that share those values."""
    _check_grid(grid)
    n_points = math.prod(len(v) for v in grid.values())
    if n_points < n_trials:
        raise ValueError(f"a grid of {n_points} points cannot give {n_trials} trials: every method gets the "
                         f"same number of trials, so each grid needs at least that many points")
    shared = shared if shared is not None else [{} for _ in range(n_trials)]
    if len(shared) != n_trials:
        raise ValueError(f"{len(shared)} shared values for {n_trials} trials")
    rest = _points({n: v for n, v in grid.items() if n not in shared[0]}) or [{}]
    rng = np.random.default_rng(seed)
    out, groups = [None] * n_trials, {}
    for i, fixed in enumerate(shared):
        groups.setdefault(json.dumps(fixed, sort_keys=True, default=str), []).append(i)
    for members in groups.values():
        fixed = shared[members[0]]
        if len(members) > len(rest):
            raise ValueError(f"{len(members)} trials share {fixed}, but the grid has {len(rest)} points with them")
        pick = rng.choice(len(rest), size=len(members), replace=False)
        for i, j in zip(members, sorted(pick)):
            point = {**fixed, **rest[j]}
            out[i] = {n: point[n] for n in grid}  # the grid's order of names
    return out


def plan_trials(protocol: Protocol, grids: dict, n_trials: int, epochs: int, seed: int) -> list[tuple[Run, dict]]:
    """Every tuning trial as (its run, its grid values), validated before any data is loaded. The run has the
    protocol's base settings, the method's trial values and ``epochs``; trial i is RunSpec(method, "tune", i, 0)."""
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"tuning trials must be a positive integer, got {n_trials!r}")
    unknown = sorted(set(grids) - set(protocol.methods))
    if unknown:
        raise ValueError(f"tuning grid names methods {unknown} that the protocol does not run "
                         f"({', '.join(protocol.methods)})")
    for method in protocol.methods:
        if method not in grids:
            raise ValueError(f"tuning: no grid for method {method!r}; every method is tuned with the same effort")
        _check_grid(grids[method])
    # the settings every grid shares (e.g. lr) take the same values in every method's trial i: equal coverage
    shared = shared_draw({m: grids[m] for m in protocol.methods}, n_trials, derive_seed(seed, "trials", "shared"))
    runs = []
    for method in protocol.methods:
        for i, values in enumerate(trials(grids[method], n_trials, derive_seed(seed, "trials", method), shared)):
            tuned = Protocol(base=protocol.base, ablations={}, methods=(method,), base_seed=protocol.base_seed,
                             method_settings={method: dict(expand(values), epochs=epochs)})
            s = tuned.settings("base", "-", method)
            key = json.dumps([method, "tune", sorted(s.items())], default=str)
            runs.append((Run(RunSpec(method, "tune", i, 0), s, key, may_diverge=True), values))
    return runs


def tune(protocol: Protocol, grids: dict, n_trials: int, epochs: int, x_train: torch.Tensor, val_fraction: float,
         out: Path, seed: int, workers: int = 1, progress: bool = True, resume: bool = True, device: str = "cpu") -> dict:
    """Choose each method's settings by validation MSE; returns {method: chosen grid values}.

    Writes ``<out>/tuning.json`` (every trial: values, validation MSE / FVU / dead, or its divergence)
    and ``<out>/tuning.md``. The trials are resumable runs under ``<out>/runs``.
    """
    planned = plan_trials(protocol, grids, n_trials, epochs, seed)
    fit, val = validation_split(x_train.shape[0], val_fraction, derive_seed(seed, "validation"))
    x_fit, x_val = x_train[fit], x_train[val]
    done, histories, _ = train_runs([run for run, _ in planned], x_fit, x_val, out, protocol.base_seed, progress,
                                    keep_models=None, workers=workers, resume=resume, device=device)
    table, chosen = [], {}
    for method in protocol.methods:
        best = None
        for run, values in ((r, v) for r, v in planned if r.spec.method == method):
            row = done[run.spec.id]
            entry = {"method": method, "trial": run.spec.value, "values": values}
            if row is None:
                entry.update(val_mse=math.inf, diverged=histories[run.spec.id])
            else:
                entry.update(val_mse=row["test_mse"], val_fvu=row["test_fvu"], val_dead=row["dead"], diverged="")
                if best is None or row["test_mse"] < best[0]:
                    best = (row["test_mse"], values)
            table.append(entry)
        if best is None:
            raise RuntimeError(f"tuning: every trial of {method} diverged; see {out / 'tuning.json'}")
        chosen[method] = best[1]
    counts = {m: sum(e["method"] == m for e in table) for m in protocol.methods}
    write_json(out / "tuning.json", {"base": protocol.base, "trials_per_method": counts, "epochs": epochs,
                                     "val_fraction": val_fraction,
                                     "n_fit": int(x_fit.shape[0]), "n_val": int(x_val.shape[0]),
                                     "grids": grids, "chosen": chosen,
                                     "trials": [dict(e, val_mse=e["val_mse"] if math.isfinite(e["val_mse"]) else None)
                                                for e in table]})
    lines = [f"# Tuning: {n_trials} trials per method at most, {epochs} epochs, validation = {val_fraction:g} of the "
             f"training data ({x_val.shape[0]} samples; fit on {x_fit.shape[0]})", "",
             "| method | trial | values | val MSE | val FVU | val dead | chosen |", "|---|---|---|---|---|---|---|"]
    for e in table:
        mark = "**yes**" if e["values"] == chosen[e["method"]] else ""
        if e["diverged"]:
            lines.append(f"| {e['method']} | {e['trial']} | {e['values']} | diverged | – | – | |")
        else:
            lines.append(f"| {e['method']} | {e['trial']} | {e['values']} | {e['val_mse']:.5f} | {e['val_fvu']:.4f} | "
                         f"{100 * e['val_dead']:.1f}% | {mark} |")
    write_text(out / "tuning.md", "\n".join(lines) + "\n")
    return chosen


def reuse(path, protocol: Protocol) -> dict:
    """The chosen values of an earlier ``tune`` (its ``tuning.json``) for ``protocol``'s methods;
    ValueError when the file is unreadable, lacks a method, or was tuned for other base settings."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        chosen, base = record["chosen"], record["base"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tuning.json written by --TUNE=True ({type(err).__name__}: {err})") from None
    missing = [m for m in protocol.methods if m not in chosen]
    if missing:
        raise ValueError(f"{path}: no tuned values for {', '.join(missing)} (it has {', '.join(chosen) or 'none'}); "
                         f"tune every method of --METHODS")
    now = json.loads(json.dumps(protocol.base, default=str))
    differ = {k: (base.get(k), now.get(k)) for k in sorted(set(base) | set(now)) if base.get(k) != now.get(k)}
    if differ:
        raise ValueError(f"{path} was tuned for other base settings; reuse needs the same ones. Differences "
                         "(tuned, now): " + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items()))
    return {m: chosen[m] for m in protocol.methods}


def tuned_protocol(protocol: Protocol, chosen: dict) -> Protocol:
    """The protocol with each method's chosen values as its own settings."""
    from dataclasses import replace
    return replace(protocol, method_settings={m: expand(v) for m, v in chosen.items()})
