"""Hyperparameter tuning where each claim is judged, on validation rows of the run's own training data.

The rules (docs/DESIGN.md, section 5), the same for every method:

- **Where.** A *study* chooses one method's settings for one ablation value, on validation rows held out from
  that value's own training rows (``experiment.training_rows``: at 1% of the data, that 1%); the ablations in
  ``per_replicate`` (the training fractions) are tuned again for every replicate on its own split, so the
  interval over replicates includes the tuning's variation; the others are tuned once (replicate 0's split)
  and that choice serves every replicate. The split (``val_fraction`` of the rows, at least one row on each
  side) is seeded by the replicate and the ablation value, the same for every method. The test set is never
  read.
- **What.** Optuna's TPE sampler (seeded; random draws for the first budget's trials, TPE after) draws each
  trial from ranges (``space``): a pair ``(lo, hi)`` of
  positive numbers is a log-uniform range, a tuple of strings a choice. Settings every method shares (the
  learning rate, the weight decay) have the same range for every method; a method's own settings (PAM:
  ``mu_nu``, ``alpha``, ``solve_order``) come on top. Settings the ablation fixes (e.g. the weight decay in
  the weight-decay ablation) are not tuned.
- **How a trial trains.** Exactly as the judged run: the same settings, batch, epochs (``epochs``: the length
  of the learning-rate schedule; 0: each run's own) on the fit rows; validation MSE is recorded after every epoch. A trial's
  score is its lowest validation MSE and its *stopping epoch* the epoch that reached it: the stopping point
  is a tuned setting, and the judged run stops there (``TrainConfig.stop_epoch``, same schedule). A trial
  that diverges scores +inf (it counts as a trial). An ablation declared with ``tunes_stop=False`` (the base run,
  whose claims compare the methods at the end of one schedule: equal epochs, equal time) scores a trial by its
  last epoch and keeps the whole schedule; its epoch count is no edge. Median pruning (Optuna's ``MedianPruner``, after
  ``study.PRUNE_STARTUP`` trials and half the epochs) stops trials worse than the median of earlier ones at the
  same epoch, for every method alike.
- **Budgets.** Each study runs ``max(budgets)`` trials; the choice at budget ``b`` is the best of its first
  ``b`` trials (a larger budget continues the smaller: same sampler seed, same first trials), so a verdict
  can be shown at each budget.
- **Edges.** A chosen number in the outer ``study.EDGE`` of its log-range (an end that means "none" excepted:
  ``study.NONE_AT_LOW``), or a stopping epoch equal to ``epochs``, is *on the edge*: the range is extended past it
  once (the value times 2, then 4, then 8 beyond the end while each step wins, the other settings kept; for the
  epoch, a trial with a schedule half as long again, ``study.EXTEND_SCHEDULE``). If the best is then the outermost extension (for the epoch: the longer schedule,
  stopping at its last epoch), the setting is marked *edge* in the record and a claim that rests on it is at most
  inconclusive.
- **Resuming.** Every study is kept in an Optuna journal file (``<out>/studies/``); an interrupted tuning goes
  on where it stopped (trials left running are marked failed and do not count; the trials past an edge are kept
  there too), and draws what an uninterrupted one would (the sampler is seeded by the trial's place). A study is
  named by a hash of everything it depends on (settings, ranges, data, seeds, training code), not by the budgets:
  a larger budget continues the journal of a smaller one.

``tuning.json`` records, for every study, the data fingerprint, the settings, every trial and the choices;
``reuse`` (a script's ``TUNED`` option) accepts a record only for the same data and settings, and only when
every recorded choice is the best of its recorded trials.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..infra.outputs import derive_seed, write_json, write_text
from .config import at_least, boolean, in_range, satisfies
from .experiment import Protocol, TunedKey, fingerprint, replicate_seed, training_rows
from .study import Study, expand, method_space, run_study, space_error

ACCEPT = {  # what a script's tuning constants accept (E2 and E3 include these in their ACCEPT)
    "TUNE": boolean(),
    "TUNE_BUDGETS": satisfies(lambda b, c: isinstance(b, tuple) and len(b) > 0 and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in b) and list(b) == sorted(set(b)),
        "increasing positive integers: trials per study, the choice judged at each"),
    "TUNE_EPOCHS": at_least(0),
    "TUNE_VAL_FRACTION": in_range(0, 1, lo_open=True, hi_open=True),
    "TUNE_SPACE": satisfies(lambda s, c: space_error(s, c["METHODS"]) is None,
                            "ranges (lo, hi) with 0 < lo < hi and choices (tuples of strings), shared at the top "
                            "level and per method under the method's name"),
    "TUNED": satisfies(lambda p, c: p == "" or (Path(p).is_dir() and not c["TUNE"]),
                       "empty, or the output folder of an earlier run of this script with --TUNE=True, whose chosen "
                       "values are reused (with --TUNE=False)"),
}


# --- the validation split --------------------------------------------------------------------------------
def validation_split(n_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit positions, validation positions) of ``n_samples`` rows: a seeded ``fraction`` held out, at least one
    row on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if n_samples < 2:
        raise ValueError(f"a validation split needs at least 2 rows, got {n_samples}")
    n_val = min(n_samples - 1, max(1, round(fraction * n_samples)))
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# --- every study of a protocol -------------------------------------------------------------------------
_POOL_DATA: tuple = ()


def _pool_init() -> None:
    torch.set_num_threads(1)


def _pool_study(job):
    study, rows, fit, val, path = job
    x = _POOL_DATA[0]
    x_rows = x[rows] if not isinstance(rows, slice) else x
    return run_study(study, x_rows[fit], x_rows[val], path)


def plan_studies(protocol: Protocol, space: dict, budgets, epochs: int, n_train: int, val_fraction: float, seed: int,
                 per_replicate=("fraction",), stamp: str = "") -> list[tuple]:
    """Every study of the protocol on ``n_train`` training rows, as (Study, training rows, fit positions,
    validation positions); ValueError for a bad setting (checked before any data is loaded)."""
    budgets = tuple(budgets)
    if not budgets or list(budgets) != sorted(set(budgets)) or budgets[0] < 1:
        raise ValueError(f"budgets must be increasing positive integers, got {budgets!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"tuning epochs must be an integer >= 0 (0: each run's own), got {epochs!r}")
    jobs = []
    n = int(n_train)
    for ablation, abl in protocol.ablations.items():
        methods = [m for m in protocol.methods if m in (abl.methods or protocol.methods)]
        reps = range(protocol.seeds) if ablation in per_replicate else (0,)
        for value in abl.values:
            for rep in reps:
                rseed = replicate_seed(protocol.base_seed, rep)
                for method in methods:
                    # the schedule before what follows from the value (a batch sized to give MIN_STEPS over it)
                    s = dict(protocol.settings(ablation, value, method, schedule=epochs), stop_epoch=0)
                    rows = training_rows(n, s["fraction"], rseed)
                    n_rows = n if isinstance(rows, slice) else len(rows)
                    split_seed = derive_seed(rseed, "validation", ablation, value)
                    fit, val = validation_split(n_rows, val_fraction, split_seed)
                    sp = method_space(space, method, fixed=abl.sets)
                    sseed = derive_seed(seed, "study", ablation, value, rep)
                    name = hashlib.sha256(json.dumps([sorted(s.items()), sp, sseed, rseed, split_seed,
                                                      val_fraction, method, stamp, abl.tunes_stop],
                                                     default=str).encode()).hexdigest()[:16]
                    jobs.append((Study(ablation, value, method, rep, s, sp, budgets, sseed, rseed, split_seed, name,
                                       abl.tunes_stop), rows, fit, val))
    return jobs


def tune(protocol: Protocol, space: dict, budgets, epochs: int, x_train, x_test, val_fraction: float, out: Path,
         seed: int, per_replicate=("fraction",), workers: int = 1, progress: bool = True,
         resume: bool = True) -> dict:
    """Run every study of the protocol (resumable); write ``<out>/tuning.json`` and ``tuning.md``; return
    {TunedKey: settings} for ``Protocol(tuned=...)``. ``x_test`` only enters the data fingerprint."""
    out = Path(out)
    stamp = fingerprint(x_train, x_test, protocol.base_seed)
    jobs = plan_studies(protocol, space, budgets, epochs, x_train.shape[0], val_fraction, seed, per_replicate, stamp)
    todo = []
    for study, rows, fit, val in jobs:
        path = out / "studies" / f"{study.name}.journal"
        if not resume and path.exists():
            path.unlink()
        todo.append((study, rows, fit, val, path))
    global _POOL_DATA
    results = []
    bar = tqdm(total=len(todo), desc=f"tuning {out.parent.name}", disable=not progress)
    if workers > 1 and len(todo) > 1:
        ctx = mp.get_context("fork")
        _POOL_DATA = (x_train,)
        try:
            with ctx.Pool(min(workers, len(todo)), initializer=_pool_init) as pool:
                for r in pool.imap(_pool_study, todo):
                    results.append(r)
                    bar.update(1)
        finally:
            _POOL_DATA = ()
    else:
        _POOL_DATA = (x_train,)
        try:
            for job in todo:
                results.append(_pool_study(job))
                bar.update(1)
        finally:
            _POOL_DATA = ()
    bar.close()
    record = {"fingerprint": stamp, "base": protocol.base, "space": space, "budgets": list(budgets), "epochs": epochs,
              "val_fraction": val_fraction, "per_replicate": list(per_replicate), "seeds": protocol.seeds,
              "studies": results}
    record["sha256"] = _digest(record)
    write_json(out / "tuning.json", record)
    write_text(out / "tuning.md", tuning_markdown(record))
    return chosen_settings(record, protocol)


def json_record(folder: Path) -> dict:
    """The record ``tune`` wrote in ``folder``."""
    return json.loads((Path(folder) / "tuning.json").read_text())


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def chosen_settings(record: dict, protocol: Protocol) -> dict:
    """{TunedKey: settings} from a tuning record: the choice of each study at each budget, as settings
    (``epochs``, ``stop_epoch`` and the expanded values); a study tuned once serves every replicate."""
    tuned = {}
    for st in record["studies"]:
        reps = [st["replicate"]] if st["ablation"] in record["per_replicate"] else range(protocol.seeds)
        for b, choice in st["choices"].items():
            settings = dict(expand(choice["values"]), epochs=choice["epochs"], stop_epoch=choice["stop_epoch"])
            if "batch_size" in choice:  # the trials' batch (sized to the tuning schedule): the run trains as they did
                settings["batch_size"] = choice["batch_size"]
            for rep in reps:
                tuned[TunedKey(st["ablation"], _value(st["value"]), st["method"], rep, int(b))] = settings
    return tuned


def _value(v):
    return tuple(v) if isinstance(v, list) else v


def edges(record: dict) -> dict:
    """{(ablation, value, method, budget): [settings on the edge]} for every choice that stayed on an edge."""
    out = {}
    for st in record["studies"]:
        for b, choice in st["choices"].items():
            if choice["edge"]:
                key = (st["ablation"], _value(st["value"]), st["method"], int(b))
                out[key] = sorted(set(out.get(key, [])) | set(choice["edge"]))
    return out


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def tuning_markdown(record: dict) -> str:
    lines = [f"# Tuning: {', '.join(map(str, record['budgets']))} trials per study (TPE, seeded), schedules of "
             f"{record['epochs']} epochs, validation = {record['val_fraction']:g} of each value's own training rows",
             "", "Tuned per replicate: " + (", ".join(record["per_replicate"]) or "none") + "; the other ablations "
             "once (replicate 0's split). *edge*: still on the edge of its range after one extension.", "",
             "| ablation | value | method | rep | budget | chosen | stop epoch / epochs | val MSE | fit / val rows "
             "| trials (pruned, diverged) | edge |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in record["studies"]:
        pruned = sum(t["state"] == "pruned" for t in st["trials"])
        diverged = sum(bool(t["diverged"]) for t in st["trials"])
        for b, c in st["choices"].items():
            vals = ", ".join(f"{k} {_fmt(v)}" for k, v in c["values"].items())
            lines.append(f"| {st['ablation']} | {st['value']} | {st['method']} | {st['replicate']} | {b} | {vals} | "
                         f"{c['stop_epoch']} / {c['epochs']} | {c['val_mse']:.5f} | {st['n_fit']} / {st['n_val']} | "
                         f"{len(st['trials'])} ({pruned}, {diverged}) | {'*edge*: ' + ', '.join(c['edge']) if c['edge'] else ''} |")
    return "\n".join(lines) + "\n"


def reuse(path, protocol: Protocol, stamp: str) -> tuple[dict, dict]:
    """(tuned settings, record) of an earlier ``tune`` (its ``tuning.json``) for ``protocol`` on the data named by
    ``stamp`` (``experiment.fingerprint``). ValueError when the file is unreadable or altered, was made on other
    data or for other base settings, lacks a study the protocol needs, or records a choice that is not the best
    of its recorded trials."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        studies, base, fp, epochs = record["studies"], record["base"], record["fingerprint"], record["epochs"]
        ok = record.get("sha256") == _digest(record)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tuning.json written by --TUNE=True ({type(err).__name__}: {err})") from None
    if not ok:
        raise ValueError(f"{path} was changed after it was written (its sha256 does not match its content); "
                         "tune again")
    if fp != stamp:
        raise ValueError(f"{path} was tuned on other data (or another seed or training code); reuse needs the same "
                         "data: tune on these with --TUNE=True")
    now = json.loads(json.dumps(protocol.base, default=str))
    differ = {k: (base.get(k), now.get(k)) for k in sorted(set(base) | set(now)) if base.get(k) != now.get(k)}
    if differ:
        raise ValueError(f"{path} was tuned for other base settings; reuse needs the same ones. Differences "
                         "(tuned, now): " + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items()))
    for st in studies:
        for b, c in st["choices"].items():
            # (val MSE, values, stopping epoch, schedule) of every recorded trial: the choice must be the best one
            # whole (a value trial past an edge ran the study's schedule)
            cands = [(t["val_mse"], t["values"], t["stop_epoch"], t["epochs"]) for t in st["trials"][:int(b)]
                     if t["val_mse"] is not None]
            cands += [(t["val_mse"], t["values"], t["stop_epoch"], t.get("epochs", epochs))
                      for e in c["extended"] for t in e["trials"] if t["val_mse"] is not None]
            best = min(cands, key=lambda cv: cv[0], default=None)
            if best is None or (c["val_mse"], c["values"], c["stop_epoch"], c["epochs"]) != best:
                raise ValueError(f"{path}: the choice of {st['method']} at {st['ablation']}={st['value']} (budget {b}) "
                                 "is not the best of its recorded trials; tune again")
    tuned = chosen_settings(record, protocol)
    need = {(k.ablation, k.value, k.method, k.replicate) for k in _needed(protocol, record["budgets"])}
    have = {(k.ablation, k.value, k.method, k.replicate) for k in tuned}
    missing = sorted(map(str, need - have))
    if missing:
        raise ValueError(f"{path}: no tuned choice for {len(missing)} runs of this protocol (e.g. {missing[0]}); it "
                         f"was tuned for other ablations or values")
    return {k: v for k, v in tuned.items() if (k.ablation, k.value, k.method, k.replicate) in need}, record


def _needed(protocol: Protocol, budgets) -> list[TunedKey]:
    keys = []
    for ablation, abl in protocol.ablations.items():
        for value in abl.values:
            for method in (m for m in protocol.methods if m in (abl.methods or protocol.methods)):
                for rep in range(protocol.seeds):
                    keys += [TunedKey(ablation, value, method, rep, b) for b in budgets]
    return keys
