"""One study: one method's tuning at one ablation value and replicate (the rules: common/experiments/tuning.py and
docs/DESIGN.md, section 5). The search space, the trials (an Optuna study in a journal, resumable), their record
and the choice at each budget with its edge extensions. ``tuning.tune`` plans and runs every study of a protocol.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..infra.outputs import derive_seed
from ..maths.sae import SAE
from ..maths.train import NonFiniteError, train
from .experiment import configs

ALIASES = {"mu_nu": ("mu", "nu")}
NONE_AT_LOW = ("weight_decay", "mu_nu", "mu", "nu", "alpha", "beta", "l1")  # a range's low end means "none"
EDGE = 0.05            # the outer share of a log-range (each end) that counts as its edge
EXTEND = (2.0, 4.0, 8.0)  # the values tried past an edge, as multiples of the chosen one (in turn, while each wins)
EXTEND_SCHEDULE = 1.5     # a stopping epoch at its schedule's end: the schedule tried this many times as long
PRUNE_STARTUP = 4      # trials per study before median pruning starts

# --- the search space ------------------------------------------------------------------------------------
def is_range(spec) -> bool:
    return (isinstance(spec, (tuple, list)) and len(spec) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec))


def space_error(space, methods) -> str | None:
    if not isinstance(space, dict) or not space:
        return "the space must be a non-empty dict"
    for name, spec in space.items():
        if isinstance(spec, dict):
            if name not in ("sgd", "sgd_tied", "pam"):
                return f"{name!r}: a dict entry must be a method's own ranges"
            err = space_error(spec, methods) if spec else None
            if err:
                return f"{name}: {err}"
        elif is_range(spec):
            lo, hi = spec
            if not (0 < lo < hi and math.isfinite(hi)):
                return f"{name}: a range needs 0 < lo < hi, got {spec}"
        elif not (isinstance(spec, (tuple, list)) and spec and all(isinstance(v, str) for v in spec)):
            return f"{name}: expected a range (lo, hi) or a tuple of choices (strings), got {spec!r}"
    return None


def method_space(space: dict, method: str, fixed=()) -> dict:
    """The ranges a method's study draws from: the shared ones, then its own; settings in ``fixed`` (set by the
    ablation being tuned) left out."""
    err = space_error(space, (method,))
    if err:
        raise ValueError(f"tuning space: {err}")
    out = {n: tuple(v) for n, v in space.items() if not isinstance(v, dict)}
    out.update({n: tuple(v) for n, v in space.get(method, {}).items()})
    return {n: v for n, v in out.items() if not set(ALIASES.get(n, (n,))) & set(fixed)}


def expand(values: dict) -> dict:
    """Space names -> settings (``mu_nu`` -> ``mu`` and ``nu``)."""
    out = {}
    for name, v in values.items():
        for key in ALIASES.get(name, (name,)):
            out[key] = v
    return out


def edge_of(name: str, value, spec) -> str | None:
    """"low" or "high" when a chosen number lies in the outer EDGE of its log-range (a low end that means none
    excepted), else None."""
    if not is_range(spec):
        return None
    lo, hi = spec
    pos = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    if pos >= 1 - EDGE:
        return "high"
    if pos <= EDGE and name not in NONE_AT_LOW:
        return "low"
    return None


# --- one study ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """One method's tuning at one ablation value and replicate: what it trains and where it is kept."""

    ablation: str
    value: object
    method: str
    replicate: int
    settings: dict        # the run's settings before tuning (epochs = the schedule length)
    space: dict
    budgets: tuple
    seed: int             # the sampler's
    rseed: int            # the replicate's (initialisation and batch order, as the judged run)
    split_seed: int
    name: str             # a hash of everything above and the data
    tunes_stop: bool = True  # False: a trial scores its last epoch and the run keeps the whole schedule

    @property
    def label(self) -> str:
        return f"{self.method}|{self.ablation}={self.value}|rep{self.replicate}"


def _train_trial(study: Study, values: dict, epochs: int, x_fit, x_val, report=None) -> list[float]:
    """Validation MSE after each epoch of one trial (trained as the judged run would be)."""
    s = dict(study.settings, **expand(values), epochs=epochs, stop_epoch=0, eval_every=1)  # every epoch scored
    model_cfg, cfg = configs(s, study.method, x_fit.shape[1])
    model = SAE(**asdict(model_cfg), seed=derive_seed(study.rseed, "init"))
    hist = train(model, x_fit, x_val, cfg, seed=derive_seed(study.rseed, "batches"), progress=False,
                 report=report, score_train=False)
    return [e["test_mse"] for e in hist[1:]]


def longer_schedule(epochs: int) -> int:
    """The schedule tried past a stopping epoch at the end of ``epochs`` (at least one epoch more)."""
    return max(epochs + 1, math.ceil(EXTEND_SCHEDULE * epochs))


def _best_epoch(curve: list[float], tunes_stop: bool = True) -> tuple[float, int]:
    """(score, stopping epoch) of a validation curve: its lowest point, or its end when the stop is not tuned."""
    i = int(np.argmin(curve)) if tunes_stop else len(curve) - 1
    return float(curve[i]), i + 1


def _open_study(study: Study, path: Path):
    """The Optuna study of ``study`` in its journal at ``path``: created, or resumed (a trial an interrupted run left
    running or waiting is marked failed, so it is never counted)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs = study.settings["epochs"]
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    opt = optuna.create_study(study_name=study.name, storage=storage, direction="minimize", load_if_exists=True,
                              sampler=optuna.samplers.TPESampler(seed=study.seed,
                                                                 n_startup_trials=study.budgets[0]),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP,
                                                                 n_warmup_steps=max(1, epochs // 2)))
    for t in opt.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        opt.tell(t.number, state=TrialState.FAIL)  # left by an interrupted run: never counted
    return opt


def _finished(opt) -> list:
    """The study's counted trials (completed or pruned), in the order they were asked."""
    from optuna.trial import TrialState

    return [t for t in opt.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _run_trials(study: Study, opt, x_fit, x_val) -> None:
    """Ask, train and tell trials until the largest budget of them is counted (pruned by the median rule; a
    diverged trial scores +inf)."""
    import optuna
    from optuna.trial import TrialState

    epochs = study.settings["epochs"]
    while len(_finished(opt)) < study.budgets[-1]:
        # seeded by the trial's place among the counted ones: a sampler's generator lives in this process, so a
        # resumed study seeded once would repeat its first draws; this way it draws what an uninterrupted one does
        opt.sampler = optuna.samplers.TPESampler(seed=derive_seed(study.seed, "trial", len(_finished(opt))))
        trial = opt.ask()
        values = {}
        for name, spec in study.space.items():
            values[name] = (trial.suggest_float(name, spec[0], spec[1], log=True) if is_range(spec)
                            else trial.suggest_categorical(name, list(spec)))

        def report(epoch, row, trial=trial):
            trial.report(row["test_mse"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            curve = _train_trial(study, values, epochs, x_fit, x_val, report)
        except optuna.TrialPruned:
            opt.tell(trial, state=TrialState.PRUNED)
            continue
        except NonFiniteError as err:
            trial.set_user_attr("diverged", str(err))
            opt.tell(trial, math.inf)
            continue
        trial.set_user_attr("curve", curve)
        opt.tell(trial, _best_epoch(curve, study.tunes_stop)[0])


def _trial_records(study: Study, opt) -> list[dict]:
    """The record of the first (largest budget) counted trials: values, state, validation MSE and stopping epoch
    (completed ones), the epoch a pruned one stopped at, why one diverged."""
    from optuna.trial import TrialState

    epochs = study.settings["epochs"]
    trials = []
    for t in _finished(opt)[:study.budgets[-1]]:
        curve = t.user_attrs.get("curve")
        best = _best_epoch(curve, study.tunes_stop) if curve else (None, None)
        trials.append({"number": t.number, "values": dict(t.params), "state": t.state.name.lower(),
                       "val_mse": best[0] if t.state == TrialState.COMPLETE and curve else None,
                       "stop_epoch": best[1], "epochs": epochs,
                       "pruned_at": max(t.intermediate_values) if t.state == TrialState.PRUNED else None,
                       "diverged": t.user_attrs.get("diverged", "")})
    return trials


def _extension_score(study: Study, opt, values: dict, n_epochs: int, x_fit, x_val) -> tuple[float, int | None]:
    """(val_mse, stop_epoch) of a trial past an edge: trained once, kept in the study's journal (shared by the
    budgets, and not trained again when the tuning is resumed)."""
    key = "extension " + json.dumps([sorted(values.items()), n_epochs])
    if key not in opt.user_attrs:
        try:
            mse, stop = _best_epoch(_train_trial(study, values, n_epochs, x_fit, x_val), study.tunes_stop)
        except NonFiniteError:
            mse, stop = math.inf, None
        opt.set_user_attr(key, [mse if math.isfinite(mse) else None, stop])
    mse, stop = opt.user_attrs[key]
    return (math.inf if mse is None else mse), stop


def _extend_edges(study: Study, choice: dict, score) -> None:
    """Past each chosen number in the outer EDGE of its range, walk the EXTEND steps further out (``score(values,
    epochs)``), keeping each that scores better and stopping at the first that does not (the optimum is then
    bracketed); a setting whose last step is kept is on the edge."""
    for name, spec in study.space.items():
        side = edge_of(name, choice["values"][name], spec)
        if side is None:
            continue
        start = choice["values"][name]
        tried = []
        for f in EXTEND:
            v = start * f if side == "high" else start / f
            vals = dict(choice["values"], **{name: v})
            mse, stop = score(vals, choice["epochs"])
            tried.append({"values": vals, "val_mse": mse if math.isfinite(mse) else None, "stop_epoch": stop})
            if not mse < choice["val_mse"]:
                break
            choice.update(values=vals, val_mse=mse, stop_epoch=stop)
        choice["extended"].append({"setting": name, "side": side, "trials": tried})
        if choice["values"][name] == tried[-1]["values"][name]:
            choice["edge"].append(name)


def _extend_schedule(choice: dict, epochs: int, score) -> None:
    """A choice that stops at its schedule's last epoch: try a schedule EXTEND_SCHEDULE times as long
    (``score(values, epochs)``), kept when it scores better."""
    longer = longer_schedule(epochs)
    mse, stop = score(choice["values"], longer)
    choice["extended"].append({"setting": "epochs", "side": "high", "trials": [
        {"values": dict(choice["values"]), "epochs": longer, "val_mse": mse if math.isfinite(mse) else None,
         "stop_epoch": stop}]})
    if mse < choice["val_mse"]:
        choice.update(epochs=longer, stop_epoch=stop, val_mse=mse)
    # on the edge when the longer schedule wins and again stops at its last epoch (when it loses, the
    # validation MSE rose after the last epoch of the shorter one: that stopping epoch is no edge)
    if choice["epochs"] == longer and choice["stop_epoch"] == choice["epochs"]:
        choice["edge"].append("epochs")


def _choose(study: Study, trials: list[dict], budget: int, score, path: Path) -> dict:
    """The choice at one budget: the best of its first ``budget`` trials, then its edge extensions."""
    epochs = study.settings["epochs"]
    scored = [t for t in trials[:budget] if t["val_mse"] is not None]
    if not scored:
        raise RuntimeError(f"tuning {study.label}: none of the first {budget} trials finished with a finite "
                           f"validation MSE (all pruned or diverged); see {path}")
    best = min(scored, key=lambda t: t["val_mse"])
    choice = {"values": dict(best["values"]), "epochs": epochs, "stop_epoch": best["stop_epoch"],
              "val_mse": best["val_mse"], "trial": best["number"], "batch_size": study.settings["batch_size"],
              "edge": [], "extended": []}
    _extend_edges(study, choice, score)
    if study.tunes_stop and choice["stop_epoch"] == choice["epochs"]:
        _extend_schedule(choice, epochs, score)
    return choice


def run_study(study: Study, x_fit, x_val, path: Path) -> dict:
    """One study, kept in the Optuna journal at ``path`` (resumed where it stopped): its trials, their record, and
    the choice at each budget."""
    opt = _open_study(study, path)
    _run_trials(study, opt, x_fit, x_val)
    trials = _trial_records(study, opt)

    def score(values, n_epochs):
        return _extension_score(study, opt, values, n_epochs, x_fit, x_val)

    choices = {str(b): _choose(study, trials, b, score, path) for b in study.budgets}
    return {"ablation": study.ablation, "value": study.value, "method": study.method, "replicate": study.replicate,
            "name": study.name, "n_fit": int(x_fit.shape[0]), "n_val": int(x_val.shape[0]), "space": study.space,
            "seed": study.seed, "trials": trials, "choices": choices}
