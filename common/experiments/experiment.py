"""The SGD-vs-PAM-SGD protocol shared by the MNIST (E2) and language-model (E3) experiments.

A protocol is a base setting plus ablations; every ablation value is run for every method it concerns
and every replicate seed. Fairness rules, enforced here rather than in each script:

- within a replicate, every method and every ablation value starts from the *same* initial encoder
  (the PAM and untied-SGD decoders too) and sees the same mini-batch order;
- a training-fraction ablation uses the same subset for every method;
- runs whose full configuration coincides (e.g. the base run and ``weight_decay=0``) are run once and
  reported in both places, marked ``shared_with``;
- the reported numbers are reconstruction metrics on held-out data; the test set picks nothing.

Every finished run is written at once to ``<out>/runs/<run id>_<config hash>.json`` (atomically), so a protocol that is
interrupted (hours for E3) can be started again and goes on where it stopped: a run file is reused
only when its configuration, the data, the base seed and the training code (TRAINING_SOURCES) are all
the same.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..infra import distributed as dist
from ..infra.data import subset_indices
from ..infra.outputs import atomic_write, derive_seed, write_json
from ..infra.stream import Stream
from ..maths.sae import SAE, SAEConfig
from ..maths.train import METHODS, TrainConfig, train
from .report import uninformative, write_table


@dataclass(frozen=True)
class Ablation:
    """One ablation, owned by the script that runs it (data, not code here): the settings it gives each of
    its values (``sets``: e.g. ("mu", "nu") both take the value), the values, the methods it concerns
    (None: all) and ``then(settings, value)``, what else follows from a value (e.g. a fraction's epochs),
    changing the settings in place. The base run is the ablation that sets nothing. ``tunes_stop``: whether tuning
    chooses its runs' stopping epoch (docs/DESIGN.md, section 5); the base run's claims compare the methods at the
    end of one schedule (equal epochs, equal time), so it keeps the whole schedule."""

    sets: tuple
    values: tuple
    methods: tuple | None = None
    then: Callable | None = None
    tunes_stop: bool = True

    @property
    def is_base(self) -> bool:
        return not self.sets


BASE = Ablation((), ("-",), tunes_stop=False)


@dataclass(frozen=True)
class RunSpec:
    """Which run: its method, the ablation and value it runs, its replicate index. ``id`` is its one name
    (run files, histories, models, progress); code that needs a part reads the field, never the id."""

    method: str
    ablation: str
    value: object
    replicate: int
    budget: int = 0      # the tuning budget (trials per study) its settings were chosen with; 0: not tuned here

    @property
    def id(self) -> str:
        tail = f"|budget{self.budget}" if self.budget else ""
        return f"{self.method}|{self.ablation}={self.value}|rep{self.replicate}{tail}"


@dataclass(frozen=True)
class Run:
    """A planned run: its spec, its full settings (``Protocol.settings``), the key its configuration is
    compared on, the id of the run it is reported from when an earlier one has the same key (None: it trains)
    and the tuned settings it uses (JSON, for the table)."""

    spec: RunSpec
    settings: dict
    key: str
    shared_with: str | None = None
    tuned: str = ""


# a run's settings: the model's (SAEConfig: n_features comes from the data, tied from the method), the
# training's (TrainConfig: the method is the run's) and the share of the training data it uses
MODEL_KEYS = tuple(f.name for f in fields(SAEConfig) if f.name not in ("n_features", "tied"))
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "method")
SETTINGS = (*MODEL_KEYS, *TRAIN_KEYS, "fraction")
# unset settings take these defaults (the dataclasses' own: defaults live in one place), so e.g. the base
# run and weight_decay=0 are recognised as the same run
DEFAULTS = {f.name: f.default for f in (*fields(TrainConfig), *fields(SAEConfig))
            if f.name in SETTINGS and f.default is not MISSING} | {"fraction": 1.0}


def check_settings(names, where: str) -> None:
    """ValueError naming every name in ``names`` that is not a setting, and the accepted ones; ``where``
    says whose names they are ("base has", "ablation 'k' sets")."""
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{where} unknown settings {unknown}; accepted: {', '.join(sorted(SETTINGS))}")


def configs(settings: dict, method: str, n_features: int) -> tuple[SAEConfig, TrainConfig]:
    """A run's settings split into the model's and the training's configuration (each validated; ``fraction``
    is the data's): the model is tied for ``sgd_tied``."""
    check_settings(settings, "the run's settings have")
    model = SAEConfig(n_features, tied=method == "sgd_tied", **{k: settings[k] for k in MODEL_KEYS if k in settings})
    return model, TrainConfig(method=method, **{k: settings[k] for k in TRAIN_KEYS if k in settings})


@dataclass
class Protocol:
    """What to run. ``base``: settings (SETTINGS: the model's, MODEL_KEYS; the training's, TRAIN_KEYS; and
    ``fraction``, default 1.0).
    ``ablations``: {name: Ablation}, the script's own. ``ablation_overrides`` apply to every run but the
    base (e.g. fewer epochs); ``method_settings``: {method: settings of that method only}.
    ``tuned``: {TunedKey(ablation, value, method, replicate, budget): settings} chosen on a validation split
    where the run is judged (common/experiments/tuning.py); when given, every run of ``plan`` is a tuned run, once per
    budget, and its tuned settings come last (after what follows from the ablation's value).
    """

    base: dict
    ablations: dict
    methods: tuple = METHODS
    seeds: int = 1
    base_seed: int = 0
    ablation_overrides: dict = field(default_factory=dict)
    method_settings: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, ablation in self.ablations.items():
            if not isinstance(ablation, Ablation):
                raise ValueError(f"ablation {name!r} must be an experiment.Ablation, got {type(ablation).__name__}")
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ValueError(f"unknown methods {bad}; accepted: {', '.join(METHODS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")
        check_settings(self.base, "base has")
        check_settings(self.ablation_overrides, "ablation_overrides has")
        for method, settings in self.method_settings.items():
            if method not in METHODS:
                raise ValueError(f"method_settings: unknown method {method!r}; accepted: {', '.join(METHODS)}")
            check_settings(settings, f"method_settings[{method!r}] has")
        for name, ablation in self.ablations.items():
            check_settings(ablation.sets, f"ablation {name!r} sets")
            for v in ablation.values:
                for m in self.methods:
                    self.settings(name, v, m)  # raises on a bad value before anything runs

    def settings(self, ablation: str, value, method: str | None = None, tuned: dict | None = None,
                 schedule: int = 0) -> dict:
        """The full settings of one ablation value (for ``method``: with its own settings), validated.
        Order: defaults, base, the method's settings, ablation overrides (not for the base), the ablation's
        value, ``schedule`` (> 0: the epochs of a tuned protocol's schedule), what follows from them (the
        ablation's ``then``, e.g. a batch sized to the schedule), then ``tuned`` (settings chosen on a validation
        split for this value). A ReLU model has no k (SAEConfig drops it)."""
        abl = self.ablations.get(ablation, BASE if ablation == "base" else None)
        if abl is None:
            raise ValueError(f"unknown ablation {ablation!r}; this protocol runs {', '.join(self.ablations)}")
        s = dict(DEFAULTS, **self.base)
        s.update(self.method_settings.get(method, {}))
        if not abl.is_base:
            s.update(self.ablation_overrides)
        for key in abl.sets:
            s[key] = value
        if schedule:
            s["epochs"] = schedule
        if abl.then is not None:
            abl.then(s, value)
        if tuned:
            check_settings(tuned, f"tuned settings of {ablation}={value} have")
            s.update(tuned)
        if not 0.0 < s["fraction"] <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {s['fraction']!r}")
        model, _ = configs(s, method or "pam", n_features=1)  # validated; n_features is the data's, known later
        s["k"] = model.k
        return s

    @property
    def budgets(self) -> tuple:
        """The tuning budgets the runs were chosen with (sorted), () when nothing was tuned per value."""
        return tuple(sorted({k.budget for k in self.tuned}))

    def plan(self) -> list[Run]:
        """Every run, in order (replicate, ablation, value, method, budget); shared configurations marked.
        With ``tuned`` settings every run is planned once per tuning budget; a missing choice is an error."""
        runs, seen = [], {}
        for rep in range(self.seeds):
            for ablation, abl in self.ablations.items():
                methods = abl.methods or self.methods
                for value in abl.values:
                    for method in (m for m in self.methods if m in methods):
                        for budget in self.budgets or (0,):
                            chosen = None
                            if budget:
                                k = TunedKey(ablation, value, method, rep, budget)
                                if k not in self.tuned:
                                    raise ValueError(f"no tuned settings for {k}: every run of a tuned protocol "
                                                     "needs its own choice")
                                chosen = self.tuned[k]
                            s = self.settings(ablation, value, method, chosen)
                            spec = RunSpec(method, ablation, value, rep, budget)
                            key = json.dumps([method, rep, sorted(s.items())], default=str)
                            tuned = chosen if budget else self.method_settings.get(method)
                            runs.append(Run(spec, s, key, shared_with=seen.get(key),
                                            tuned=json.dumps(tuned, sort_keys=True, default=str) if tuned else ""))
                            seen.setdefault(key, spec.id)
        return runs


@dataclass(frozen=True)
class TunedKey:
    """Where a choice of settings applies: one ablation value, method, replicate and tuning budget."""

    ablation: str
    value: object
    method: str
    replicate: int
    budget: int


def replicate_seed(base_seed: int, rep: int) -> int:
    return derive_seed(base_seed, "replicate", rep)


def training_rows(n_samples: int, fraction: float, rseed: int):
    """The rows of the training data a run of replicate seed ``rseed`` trains on: all of them, or a seeded subset
    of ``fraction`` of them (the same for every method of the replicate; the tuning of that run splits these)."""
    if fraction >= 1.0:
        return slice(None)
    return subset_indices(n_samples, fraction, derive_seed(rseed, "subset", fraction))


def run_one(run: Run, x_train: torch.Tensor, x_test: torch.Tensor, base_seed: int, progress: bool = True,
            position: int | None = None, device: str = "cpu"):
    """Train one run on ``device``; returns (row, history, model). ``position``: the line of its progress bar."""
    s, spec = run.settings, run.spec
    rseed = replicate_seed(base_seed, spec.replicate)
    if s["fraction"] < 1.0:
        x_train = x_train[training_rows(x_train.shape[0], s["fraction"], rseed)]
    model_cfg, cfg = configs(s, spec.method, x_train.shape[1])
    model = SAE(**asdict(model_cfg), seed=derive_seed(rseed, "init")).to(device)
    t0 = time.perf_counter()
    hist = train(model, x_train, x_test, cfg, seed=derive_seed(rseed, "batches"), progress=progress, desc=spec.id,
                 position=position)
    last = hist[-1]
    row = {"method": spec.method, "activation": s["activation"], "ablation": spec.ablation, "value": spec.value,
           "replicate": spec.replicate, "budget": spec.budget, "train_mse": last["train_mse"],
           "test_mse": last["test_mse"], "train_fvu": last["train_fvu"], "test_fvu": last["test_fvu"],
           "l0": last["test_l0"], "dead": last["test_dead"], "uninformative": uninformative(last["test_fvu"]),
           "epochs": cfg.epochs, "stop_epoch": last["epoch"], "steps": last["grad_steps"],
           "batch_size": cfg.batch_size, "samples_seen": last["samples_seen"], "n_train": x_train.shape[0], "wall_time": time.perf_counter() - t0,
           "train_time": sum(e["epoch_time"] for e in hist), "tuned": run.tuned, "shared_with": ""}
    return row, hist, model


# what a forked worker trains on: set by ``execute`` just before the pool forks (shared copy-on-write)
_WORKER_DATA: tuple = ()


_WORKER_SLOT = 0


def _die_with_parent(parent: int) -> None:
    """Linux: this forked worker is killed when the process that forked it ends (SIGKILL, SIGTERM or any exit), so
    a killed protocol leaves no worker training (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return   # not Linux: workers end when the pool's pipes close
    if os.getppid() != parent:   # the parent ended before the request took effect
        os._exit(1)


def _worker_init(lock, counter, parent=None) -> None:
    global _WORKER_SLOT
    if parent is not None:
        _die_with_parent(parent)
    torch.set_num_threads(1)  # one thread per worker: small matmuls scale poorly across threads
    tqdm.set_lock(lock)
    with counter.get_lock():
        counter.value += 1
        _WORKER_SLOT = counter.value  # this worker's progress-bar line (0 is the protocol's bar)


def _worker_run(run: Run):
    x_train, x_test, base_seed, progress = _WORKER_DATA
    row, hist, model = run_one(run, x_train, x_test, base_seed, progress, position=_WORKER_SLOT)
    return run.spec.id, row, hist, model.checkpoint() if model is not None else None


def _results(todo, x_train, x_test, base_seed, progress, workers, device="cpu"):
    """Yield (run id, row, history, model) for every run in ``todo``, in completion order.

    ``workers > 1`` trains that many runs at once in forked processes of one thread each: on this
    2-core machine two single-threaded runs at once give at least as many epochs per second as one
    two-threaded run at a time, and vary less (figures: README, bench/bench_train.py).
    Every run's seeds come from its plan entry, so the results do not depend on the order in which
    runs finish.
    """
    if workers <= 1 or len(todo) <= 1 or dist.active():  # under torchrun each run is spread over the ranks
        for run in todo:
            yield (run.spec.id, *run_one(run, x_train, x_test, base_seed, progress, device=device))
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"workers > 1 fork cpu processes; on {device} train one run at a time (workers=1)")
    global _WORKER_DATA
    ctx = mp.get_context("fork")  # the scripts are not import-safe; fork shares the data without copies
    _WORKER_DATA = (x_train, x_test, base_seed, progress)
    try:
        with ctx.Pool(min(workers, len(todo)), initializer=_worker_init,
                      initargs=(ctx.RLock(), ctx.Value("i", 0), os.getpid())) as pool:
            for rid, row, hist, ckpt in pool.imap_unordered(_worker_run, todo):
                yield rid, row, hist, SAE.from_checkpoint(ckpt) if ckpt is not None else None
    finally:
        _WORKER_DATA = ()


# the modules a run's numbers depend on (the data enter by content, so extraction code is not among them)
TRAINING_SOURCES = ("experiments/experiment.py", "experiments/recipe.py", "experiments/report.py",
                    "experiments/study.py", "infra/data.py", "infra/distributed.py", "infra/outputs.py",
                    "infra/shards.py", "infra/stream.py", "maths/metrics.py", "maths/pam.py", "maths/sae.py",
                    "maths/steps.py", "maths/train.py")


def fingerprint(x_train: torch.Tensor, x_test: torch.Tensor, base_seed: int) -> str:
    """What a finished run depends on besides its configuration: the data, the seed, the training code."""
    h = hashlib.sha256()
    for t in (x_train, x_test):
        if isinstance(t, Stream):  # a view of a folder of shards: named by the shards' sha256 and the view
            h.update(f"stream {t.shape}: {t.digest()}".encode())
            continue
        a = t.detach().to("cpu").contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    h.update(str(int(base_seed)).encode())
    for name in TRAINING_SOURCES:
        h.update(name.encode())
        h.update((Path(__file__).resolve().parents[1] / name).read_bytes())  # common/<folder>/<module>.py
    return h.hexdigest()


def run_file(out: Path, run: Run) -> Path:
    """Where a finished run is kept: named by its id and a hash of its full configuration, so runs of the
    same id with other settings (e.g. a --quick run in the same folder) never overwrite each other."""
    digest = hashlib.sha256(run.key.encode()).hexdigest()[:10]
    return Path(out) / "runs" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', run.spec.id)}_{digest}.json"


def _checkpoint_path(out: Path, run: Run) -> Path:
    spec = run.spec
    tag = "" if spec.ablation == "base" else re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"_{spec.ablation}={spec.value}")
    budget = f"_budget{spec.budget}" if spec.budget else ""
    return Path(out) / "models" / f"{spec.method}{tag}_rep{spec.replicate}{budget}.pt"


def kept(keep_models) -> tuple:
    """The ablations whose models are kept: ``keep_models`` is one ablation's name, several, or None."""
    return () if keep_models is None else (keep_models,) if isinstance(keep_models, str) else tuple(keep_models)


def _finished(out: Path, run: Run, stamp: str, need_model: bool):
    """(row, history, model or None) of an earlier invocation's identical run, or None."""
    path = run_file(out, run)
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != run.key or saved["fingerprint"] != stamp:
            return None
        model = None
        if need_model:
            # the checkpoint path is per method, ablation value and repeat, not per configuration: another setting
            # run in the same folder overwrites it, so it must carry the same run key and fingerprint
            ckpt = torch.load(_checkpoint_path(out, run), weights_only=True)
            if ckpt.get("key") != run.key or ckpt.get("fingerprint") != stamp:
                return None
            model = SAE.from_checkpoint(ckpt)
        return saved["row"], saved["history"], model
    except FileNotFoundError:
        return None
    except Exception as e:  # unreadable leftovers are retrained, never trusted
        tqdm.write(f"  ignoring {path.name} ({type(e).__name__}: {e}); retraining")
        return None


def execute(protocol: Protocol, x_train, x_test, out: Path, progress: bool = True,
            keep_models: str | tuple | None = "base", workers: int = 1, resume: bool = True, device: str = "cpu",
            extra_metrics: Callable | None = None):
    """Run the protocol; write table.csv, table.json, histories.json and the base models' checkpoints.

    ``workers``: runs trained at once (forked processes, one thread each; 1 = in this process).
    ``resume``: reuse the runs an earlier invocation finished with the same configuration, data, seed and
    code (``runs/*.json``); False trains everything again. ``device``: where every run trains (a run's
    numbers may differ across devices by float rounding; the run files do not record it).
    ``extra_metrics(model) -> {name: number}``: more columns for every run's row, computed from its trained
    model (``train_runs``). Returns (rows in plan order, histories {run id: history}, models {run id: model}
    for runs of ablation ``keep_models``: one name, several or None; a row shared with such a run names it in
    ``shared_with``).
    """
    runs = protocol.plan()
    done, histories, models = train_runs([r for r in runs if r.shared_with is None], x_train, x_test, out,
                                         protocol.base_seed, progress, keep_models, workers, resume, device,
                                         extra_metrics)
    rows = []
    for run in runs:
        if run.shared_with is None:
            rows.append(done[run.spec.id])
        else:
            rows.append(dict(done[run.shared_with], ablation=run.spec.ablation, value=run.spec.value,
                             budget=run.spec.budget, tuned=run.tuned, shared_with=run.shared_with))
            histories[run.spec.id] = histories[run.shared_with]
    write_table(rows, out)
    write_json(out / "histories.json", histories)
    return rows, histories, models


def train_runs(runs: list[Run], x_train, x_test, out: Path, base_seed: int, progress: bool = True,
               keep_models: str | tuple | None = "base", workers: int = 1, resume: bool = True, device: str = "cpu",
               extra_metrics: Callable | None = None):
    """Train every run, reusing finished ones; each is written to ``runs/`` when it ends.

    ``extra_metrics(model) -> {name: finite number}`` is added to each trained run's row
    (and run file; a name the row already has is an error). A finished run is reused with the values it was
    saved with, so they must depend only on the model and on what the run's fingerprint covers (the data and
    TRAINING_SOURCES: e.g. ``metrics.recovery`` against a dictionary the data were drawn from).
    Returns (rows {id: row}, histories {id: history}, models {id: model} for runs of ablation ``keep_models``:
    one name, several or None).
    """
    keep = kept(keep_models)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out)
    stamp = fingerprint(x_train, x_test, base_seed)
    histories, models, done = {}, {}, {}
    todo = []
    # under torchrun rank 0 reads the finished runs and sends them to the others: every rank trains the same list
    finished = dist.on_main(lambda: [_finished(out, r, stamp, r.spec.ablation in keep) if resume else None
                                     for r in runs])
    for run, found in zip(runs, finished):
        if found is None:
            todo.append(run)
            continue
        done[run.spec.id], histories[run.spec.id], model = found
        if model is not None:
            models[run.spec.id] = model
    if done:
        tqdm.write(f"  resuming: {len(done)} runs finished earlier with the same settings, data and code "
                   f"({out / 'runs'}); {len(todo)} to train")
    by_id = {r.spec.id: r for r in todo}
    bar = tqdm(total=len(todo), desc=f"runs {out.name}", disable=not progress)
    for rid, row, hist, model in _results(todo, x_train, x_test, base_seed, progress, workers, device):
        run = by_id[rid]
        histories[rid], done[rid] = hist, row
        bar.update(1)
        if extra_metrics is not None:
            row.update(_extra_columns(extra_metrics(model.cpu()), row, rid))
        if run.spec.ablation in keep:
            models[rid] = model.cpu()  # figures and checkpoints are made on the cpu
            state = {**model.checkpoint(), "key": run.key, "fingerprint": stamp}
            atomic_write(_checkpoint_path(out, run), lambda tmp: torch.save(state, tmp))
        # after the checkpoint: a run file implies everything it needs is on disk
        write_json(run_file(out, run), {"key": run.key, "fingerprint": stamp, "row": row, "history": hist})
        tqdm.write(f"  {rid:<42} test mse {row['test_mse']:.5f}  fvu {row['test_fvu']:.4f}  "
                   f"l0 {row['l0']:.1f}  dead {row['dead']:.2f}  {row['wall_time']:.1f}s")
    bar.close()
    return done, histories, models


def _extra_columns(extra, row: dict, rid: str) -> dict:
    """``extra_metrics``' result checked: a dict of new names to finite numbers."""
    if not isinstance(extra, dict):
        raise ValueError(f"{rid}: extra_metrics must return a dict of name -> number, got {type(extra).__name__}")
    clash = sorted(set(extra) & set(row))
    if clash:
        raise ValueError(f"{rid}: extra_metrics returned names the row already has: {clash}")
    bad = {k: v for k, v in extra.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (int, float)) or not np.isfinite(v)}
    if bad:
        raise ValueError(f"{rid}: extra_metrics must map names to finite numbers; got {bad}")
    return extra


def parse_only(only, available) -> list[str]:
    """Validate an --only list against the available ablations."""
    chosen = [o for o in only if o]
    bad = sorted(set(chosen) - set(available))
    if bad:
        raise ValueError(f"--only: unknown {bad}; accepted: {', '.join(available)}")
    return chosen or list(available)
