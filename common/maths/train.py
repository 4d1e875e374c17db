"""Training: ``train`` runs SGD (untied or tied) or PAM-SGD with one loop shape, one evaluation path and
one history format.

Methods
    sgd       the untied SAE trained end to end by Adam (the fair baseline)
    sgd_tied  decoder atoms = encoder rows (the original scripts' baseline)
    pam       PAM-SGD (docs/DESIGN.md, section 3): per outer iteration (one epoch by default) an encoder
              phase of Adam steps with the decoder fixed, then the exact closed-form decoder solve

Objective (identical for every method; coefficients relative to the MSE, see ``common.maths.pam``):

    mse(x, recon) + l1 * mean_r ||z_r||_1 + l0 * mean_r ||z_r||_0 + alpha ||W_dec||^2 + beta ||b_dec||^2
        + mu ||W - W^t||^2 + nu ||b - b^t||^2     (proximal terms on every trained block)

with W^t, b^t the parameters at the start of the outer iteration (epoch); a learned threshold (jumprelu)
counts as a bias. The L0 term needs an activation with a learned threshold (jumprelu): its gradient, and the
threshold's, come from straight-through estimators with kernel width ``bandwidth`` (docs/DESIGN.md 3.10).
Training computes the codes with ``SAE.forward_train`` (batchtopk: the batch's k * batch_size largest values;
the evaluation and PAM's decoder solve use the inference codes, its running threshold). ``prox_form="l2"`` replaces
the proximal terms by the original scripts' plain L2, mu ||W_enc||^2 + nu ||b_enc||^2, on the encoder only.
``weight_decay`` is Adam's weight decay on the encoder.

The field's TopK recipe (``common.experiments.recipe``; each element its own setting, all off by default = the paper):
``b_dec_init`` ("zero", "mean", "median": b_dec set from the training data before training),
``centre_input`` (that same point subtracted from x before encoding), ``unit_norm_atoms`` (sgd: the
gradient component parallel to each atom removed before, and the atoms renormalised after, every step),
``aux_k`` / ``aux_coef`` / ``dead_after`` (the AuxK loss: the residual reconstructed by the aux_k
highest pre-activations among latents that have not fired in the last ``dead_after`` training samples,
0 = one epoch; TopK models), ``keep_dead_atoms`` (pam: a latent that never fired keeps its atom in the
solve), ``lr_schedule`` ("constant", or "warmup_decay": linear warm-up over min(warmup_steps, a tenth of
the run) then linear decay to 0).

Every epoch the loss and the parameters are checked finite (and after every decoder solve): a run that
diverges raises ``NonFiniteError`` naming the run, the method and the epoch.

The loop (``_epochs``) follows the paper's Algorithm 3.1 (docs/DESIGN.md, section 3.2); its gradient steps are
``common.maths.steps.Stepper``'s.

History: one dict per epoch (epoch 0 = at initialisation) with train_/test_ mse, fvu, l0, dead (at epoch 0, every
``eval_every``-th epoch and the last epoch run; the others have none),
``loss`` (mean training objective over the epoch's steps), ``epoch_time`` (training incl. the solve),
``eval_time``, ``samples_seen`` (samples through gradient steps) and ``grad_steps``; PAM adds
``objective_before_solve`` / ``objective_after_solve`` (decoder objective on the same statistics).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch._dynamo  # noqa: F401  torch.optim imports it with the first optimiser (~1 s); imported here, before the
#                      scripts fork their worker processes, every worker inherits it instead of importing it again
from tqdm.auto import tqdm

from ..experiments.recipe import centre_of
from ..infra import distributed as dist
from ..infra.data import check_finite
from ..infra.stream import Stream
from .metrics import EvalSums, data_sums, evaluate_sums, summarise
from .pam import STATS_DTYPES, collect_stats, decoder_objective, solve_decoder, sse_from_stats
from .sae import ACTIVATION_TABLE, SAE
from .steps import Stepper

METHODS = ("pam", "sgd", "sgd_tied")
B_DEC_INITS = ("zero", "mean", "median")
LR_SCHEDULES = ("constant", "warmup_decay")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or parameter."""


DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; accepted: {DEVICES}") from None
    check_device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available here; accepted: {DEVICES}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def device_available(name: str) -> bool:
    """Whether ``resolve_device(name)`` would succeed here."""
    try:
        resolve_device(name)
    except ValueError:
        return False
    return True


def check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: the metrics and PAM's statistics need "
                         f"float64 (mps has none); accepted: {DEVICES}")


@dataclass
class TrainConfig:
    method: str = "pam"
    epochs: int = 50                # the length of the run: the learning-rate schedule spans these epochs
    stop_epoch: int = 0             # stop after this epoch (0: after ``epochs``); chosen on a validation split
                                    # (common/experiments/tuning.py), the schedule still spans ``epochs``
    batch_size: int = 128
    lr: float = 3e-3
    updates_per_batch: int = 1      # Adam steps per mini-batch (the PAM ablation; 1 for the baselines)
    weight_decay: float = 0.0       # Adam weight decay on the encoder
    l1: float = 0.0                 # L1 penalty on codes
    l0: float = 0.0                 # L0 penalty on codes (jumprelu: straight-through estimator)
    bandwidth: float = 0.05         # jumprelu: width of the estimators' rectangle kernel (SAELens's default)
    mu: float = 0.0                 # proximal coefficient on weights
    nu: float = 0.0                 # proximal coefficient on biases
    prox_form: str = "proximal"     # "proximal" (ours) or "l2" (the original's plain L2 on the encoder)
    alpha: float = 0.0              # ridge on W_dec
    beta: float = 0.0               # ridge on b_dec
    solve_batch: int = 1024         # batch size for collecting the decoder statistics
    solve_order: str = "enc_first"  # "enc_first" or "dec_first" within an outer iteration
    solve_every: int = 1            # solve the decoder every this many epochs
    solve_samples: int = 0          # 0: statistics from all training data; m > 0: from m random samples, rescaled
    stats_dtype: str = "float64"    # "float32": statistics in float32, compensated (GPUs with slow float64; README)
    eval_batch: int = 1024
    eval_every: int = 1             # the train/test metrics every this many epochs (and always at the start and the
                                    # last epoch run); the epochs between record the loss and times only
    # the field's TopK recipe (common.experiments.recipe): every element off by default (the paper's protocol)
    b_dec_init: str = "zero"        # "zero", "mean" or "median" (geometric) of the training data
    centre_input: bool = False      # subtract that point from x before encoding (needs b_dec_init != "zero")
    unit_norm_atoms: bool = False   # sgd: unit-norm atoms kept through every step
    aux_k: int = 0                  # AuxK: dead latents used to reconstruct the residual (0 = off)
    aux_coef: float = 1 / 32        # AuxK loss coefficient (relative to the MSE)
    dead_after: int = 0             # AuxK: dead = not fired in this many training samples (0 = one epoch)
    keep_dead_atoms: bool = False   # pam: a latent that never fired keeps its atom in the solve
    lr_schedule: str = "constant"   # or "warmup_decay"
    warmup_steps: int = 1000        # warmup_decay: linear warm-up steps (at most a tenth of the run)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.prox_form in ("proximal", "l2"), f"prox_form must be 'proximal' or 'l2', got {self.prox_form!r}")
        need(self.solve_order in ("enc_first", "dec_first"),
             f"solve_order must be 'enc_first' or 'dec_first', got {self.solve_order!r}")
        need(self.stats_dtype in STATS_DTYPES, f"stats_dtype must be one of {STATS_DTYPES}, got {self.stats_dtype!r}")
        need(self.b_dec_init in B_DEC_INITS, f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(not (self.centre_input and self.b_dec_init == "zero"),
             "centre_input needs a centre: set b_dec_init to 'mean' or 'median'")
        for name in ("centre_input", "unit_norm_atoms", "keep_dead_atoms"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "updates_per_batch", "solve_batch", "solve_every", "eval_batch",
                     "eval_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= (0 if name == "epochs" else 1),
                 f"{name} must be an integer >= {0 if name == 'epochs' else 1}, got {v!r}")
        for name in ("solve_samples", "aux_k", "dead_after", "warmup_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "l1", "l0", "mu", "nu", "alpha", "beta", "aux_coef"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                 f"{name} must be a finite number >= 0, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(isinstance(self.stop_epoch, int) and not isinstance(self.stop_epoch, bool)
             and 0 <= self.stop_epoch <= self.epochs,
             f"stop_epoch must be an integer in [0, epochs = {self.epochs}] (0: no early stop), got {self.stop_epoch!r}")
        need(self.bandwidth > 0, f"bandwidth must be > 0, got {self.bandwidth!r}")


def _solve(model: SAE, x_train, cfg: TrainConfig, gen: torch.Generator, scored: bool = True):
    """Decoder phase: statistics, exact solve, parameters replaced.

    Returns (training-set metrics of the new model from the same statistics, or None for a mini-batch solve
    or when not ``scored``; record with the decoder objective before and after the solve, or only the ridge when
    not ``scored``: a tuning trial needs neither, and on an LLM dictionary they are a fifth of its epoch).
    """
    if cfg.solve_samples and cfg.solve_samples < x_train.shape[0]:
        pick = dist.shard(torch.randperm(x_train.shape[0], generator=gen)[:cfg.solve_samples]).to(x_train.device)
        stats = collect_stats(model, x_train[pick], cfg.solve_batch, cfg.stats_dtype)
        dist.sum_stats(stats)  # several processes: every rank's rows, summed (common/infra/distributed.py)
        stats = stats.scaled(x_train.shape[0] / cfg.solve_samples)
        exact = False
    else:
        stats = collect_stats(model, dist.shard(x_train), cfg.solve_batch, cfg.stats_dtype)
        dist.sum_stats(stats)
        exact = True
    prox = cfg.prox_form == "proximal"
    coefs = dict(alpha=cfg.alpha, beta=cfg.beta, mu=cfg.mu if prox else 0.0, nu=cfg.nu if prox else 0.0)
    D0, b0 = model.W_dec.detach().clone(), model.b_dec.detach().clone()
    gram = stats.gram()  # one d x d matrix: G D0 for the objective before, then A's storage in the solve
    before = decoder_objective(stats, D0, b0, D0, b0, gram=gram, **coefs) if scored else None
    D, b, info = solve_decoder(stats, D0, b0, gram=gram, keep_unfired=cfg.keep_dead_atoms, **coefs)
    with torch.no_grad():
        model.W_dec.copy_(D.to(model.W_dec.dtype))
        model.b_dec.copy_(b.to(model.b_dec.dtype))
    if not scored:
        return None, {"ridge": info["ridge"]}
    sse = sse_from_stats(stats, D, b, gram_atoms=info["gram_atoms"])
    after = decoder_objective(stats, D, b, D0, b0, sse=sse, **coefs)
    rec = {"objective_before_solve": before, "objective_after_solve": after, "ridge": info["ridge"]}
    if not exact:
        return None, rec
    return summarise(EvalSums(int(stats.n), stats.n_features, sse, stats.sum_x, stats.sum_xx, stats.nnz,
                              stats.fired)), rec


def train(model: SAE, x_train: torch.Tensor, x_test: torch.Tensor, cfg: TrainConfig, seed: int = 0,
          progress: bool = True, desc: str = "", position: int | None = None, report=None,
          score_train: bool = True) -> list[dict]:
    """Train ``model`` in place on x_train (n_samples, n_features); evaluate on x_test every epoch.

    Everything runs on the model's device (``model.to(device)`` first; the data are moved there once);
    PAM's statistics and solve stay float64 there. ``seed`` drives the mini-batch order only (drawn on the
    cpu, so every device sees the same batches; the model's initialisation has its own seed), so two
    methods given the same seed see the same batches.

    x_train and x_test may be ``common.infra.stream.Stream`` views of a folder of shards (activations larger than
    memory): rows are then read a shuffle buffer at a time, in the batch order ``Stream.batches`` defines
    (the in-memory order when the buffer holds the whole view: the same batches, the same numbers).

    ``report(epoch, row)``, when given, is called after each epoch's record (a tuner's pruning hook: an
    exception it raises ends the run); ``score_train=False`` skips the training-set metrics and PAM's decoder
    objective before and after each solve (tuning trials need the validation numbers only).
    ``cfg.stop_epoch`` ends the run early with the schedule of ``cfg.epochs`` (docs/DESIGN.md, section 5).
    """
    device = model.W_enc.device
    check_device(device)
    x_train, x_test = x_train.to(device), x_test.to(device)
    _check_inputs(model, cfg, x_train, x_test)
    _initialise(model, cfg, x_train)
    trained, opt, params, named = _optimiser(model, cfg)
    gen = torch.Generator().manual_seed(int(seed))
    record = _recorder(model, cfg, x_train, x_test, score_train)
    with _frozen([p for p in model.parameters() if not any(p is q for q in params)]):
        return _epochs(model, x_train, cfg, opt, params, named, trained, gen, record, progress, desc, position,
                       report, score_train)


def _check_inputs(model: SAE, cfg: TrainConfig, x_train, x_test) -> None:
    """ValueError when the method, the penalties or the data do not fit the model (the data also checked finite)."""
    if cfg.method == "sgd_tied" and not model.tied:
        raise ValueError("method 'sgd_tied' needs a tied model (SAE(..., tied=True))")
    if cfg.method != "sgd_tied" and model.tied:
        raise ValueError(f"method {cfg.method!r} needs an untied model (SAE(..., tied=False))")
    if cfg.l0 and model.act.threshold != "learned":
        learned = [n for n, a in ACTIVATION_TABLE.items() if a.threshold == "learned"]
        raise ValueError(f"l0={cfg.l0}: an L0 penalty needs an activation with a learned threshold "
                         f"({', '.join(learned)}); this model uses {model.activation!r}")
    if model.act.trains_on_batch and dist.active():
        raise ValueError(f"activation {model.activation!r} selects over the whole batch; several processes hold "
                         "parts of it: train it in one process")
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if len(x.shape) != 2 or x.shape[1] != model.n_features:
            raise ValueError(f"{name} must have shape (n_samples, {model.n_features}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if isinstance(x, Stream):
            if x.dtype != model.W_enc.dtype:
                raise ValueError(f"{name}: a stream of {x.dtype} rows for a model of {model.W_enc.dtype}")
            x.check_finite()  # one pass over its folder, once
        else:
            check_finite(x, name)


def _initialise(model: SAE, cfg: TrainConfig, x_train) -> None:
    """The recipe's starting point: b_dec from the training data (and the input centre), unit-norm atoms (sgd)."""
    with torch.no_grad():
        if cfg.b_dec_init != "zero":
            if isinstance(x_train, Stream):  # streamed: float64 accumulation (common/infra/stream.py)
                if cfg.b_dec_init != "mean":
                    raise ValueError(f"b_dec_init={cfg.b_dec_init!r} needs the training data in memory; a "
                                     "stream supports 'zero' and 'mean'")
                point = sum(xb.sum(0, dtype=torch.float64) for xb in x_train.chunks(cfg.eval_batch)) / len(x_train)
            else:
                point = centre_of(x_train, cfg.b_dec_init)
            point = point.to(model.b_dec.dtype)
            model.b_dec.copy_(point)
            if cfg.centre_input:
                model.set_centre(point)
        if cfg.unit_norm_atoms and cfg.method == "sgd":
            model.W_dec.div_(model.W_dec.norm(dim=1, keepdim=True))


def _optimiser(model: SAE, cfg: TrainConfig):
    """(the blocks trained by gradient, Adam over their parameters, those parameters, their names): PAM steps the
    encoder only (its decoder is solved), SGD every parameter; weight decay on the encoder only."""
    trained = {"encoder"} if cfg.method == "pam" else {"encoder", "decoder"}
    enc, dec = model.encoder_parameters(), ([] if cfg.method == "pam" else model.decoder_parameters())
    groups = [{"params": enc, "weight_decay": cfg.weight_decay}]
    if dec:
        groups.append({"params": dec, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups, lr=cfg.lr, fused=True)  # fused: ~20% faster epochs on CPU (bench/)
    params = enc + dec
    name_of = {id(p): n for n, p in model.named_parameters()}
    named = [name_of[id(p)] for p in params]  # in the order of params (the anchors pair them)
    return trained, opt, params, named


def _recorder(model: SAE, cfg: TrainConfig, x_train, x_test, score_train: bool):
    """``record(epoch, loss, epoch_time, samples, steps, train_metrics=None, extra=None)``: one history row, with the
    train (unless given or not scored) and test metrics of an evaluation pass."""
    # several processes (common/infra/distributed.py): each evaluates its rows and the sums are added
    eval_train, eval_test = dist.shard(x_train), dist.shard(x_test)
    sums_train, sums_test = data_sums(eval_train, cfg.eval_batch), data_sums(eval_test, cfg.eval_batch)

    def metrics(x, sums_of_x):
        sums = evaluate_sums(model, x, cfg.eval_batch, sums_of_x)
        dist.sum_eval(sums)
        return summarise(sums)

    last = cfg.stop_epoch or cfg.epochs

    def record(epoch, loss, epoch_time, samples, steps, train_metrics=None, extra=None):
        t0 = time.perf_counter()
        row = {"epoch": epoch, "loss": loss, "epoch_time": epoch_time, "samples_seen": samples, "grad_steps": steps}
        if epoch % cfg.eval_every == 0 or epoch == last:  # the others: no evaluation pass (TrainConfig.eval_every)
            if train_metrics is None:
                train_metrics = metrics(eval_train, sums_train) if score_train else {}
            row.update({f"train_{k}": v for k, v in train_metrics.items()})
            row.update({f"test_{k}": v for k, v in metrics(eval_test, sums_test).items()})
        row["eval_time"] = time.perf_counter() - t0
        row.update(extra or {})
        return row
    return record


@contextmanager
def _frozen(tensors):
    """No gradient for these parameters while training (PAM's decoder is solved, not stepped)."""
    was = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(False)
    try:
        yield
    finally:
        for t, w in zip(tensors, was):
            t.requires_grad_(w)


def _check_finite(model: SAE, loss: float, where: str) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not math.isfinite(loss) or bad:
        raise NonFiniteError(f"{where}: {'loss ' + repr(loss) if not math.isfinite(loss) else ''}"
                             f"{' and ' if bad and not math.isfinite(loss) else ''}"
                             f"{'non-finite parameters ' + ', '.join(bad) if bad else ''}; "
                             "lower the learning rate or check the data's scale")


def _batches(x_train, batch_size: int, gen: torch.Generator, device):
    """One epoch's mini-batches: (global batch size, this rank's rows of it). In memory: the batches of
    ``torch.randperm(n, generator=gen)``; a Stream: its ``batches`` (common/infra/stream.py)."""
    if isinstance(x_train, Stream):
        yield from x_train.batches(batch_size, gen, dist.shard)
        return
    perm = torch.randperm(x_train.shape[0], generator=gen).to(device)
    for s in range(0, x_train.shape[0], batch_size):
        batch = perm[s:s + batch_size]
        mine = dist.shard(batch)                       # several processes: this rank's rows of the global batch
        yield len(batch), x_train.index_select(0, mine)  # 3x faster than x[idx]


def _gradient_phase(stepper: Stepper, x_train, cfg: TrainConfig, gen: torch.Generator, anchors: dict):
    """One epoch of gradient steps, ``updates_per_batch`` per mini-batch (PAM: the encoder phase, the decoder
    fixed; SGD: the whole model). Returns (this rank's sum of each batch's last loss times its rows, samples seen)."""
    loss_sum, samples = 0.0, 0
    for n_batch, xb in _batches(x_train, cfg.batch_size, gen, stepper.device):
        if xb.shape[0] == 0:
            for _ in range(cfg.updates_per_batch):
                stepper.idle_step(n_batch)
        else:
            for _ in range(cfg.updates_per_batch):
                loss = stepper.step(xb, n_batch, anchors)
            loss_sum += loss.item() * xb.shape[0]
        samples += n_batch
    return loss_sum, samples


def _solve_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether PAM solves the decoder in this outer iteration: the solve closes (enc_first) or opens (dec_first)
    every solve_every-th one."""
    offset = 0 if cfg.solve_order == "enc_first" else 1
    return cfg.method == "pam" and (epoch - offset) % cfg.solve_every == 0


def _decoder_phase(model: SAE, x_train, cfg: TrainConfig, gen: torch.Generator, where: str, scored: bool):
    """PAM's exact decoder solve (``_solve``), the parameters then checked finite: (training metrics or None,
    record of the decoder objective)."""
    train_metrics, extra = _solve(model, x_train, cfg, gen, scored)
    _check_finite(model, 0.0, f"{where}, after the decoder solve")
    return train_metrics, extra


def _epochs(model, x_train, cfg, opt, params, named, trained, gen, record, progress, desc, position, report,
            scored=True):
    """Algorithm 3.1 (docs/DESIGN.md, section 3.2), one outer iteration per epoch: the gradient phase from anchors
    at the epoch's start and, for PAM when due, the exact decoder solve (after it: enc_first; before: dec_first);
    then the epoch's record, the tuner's report, the early stop."""
    n = x_train.shape[0]
    history = [record(0, None, 0.0, 0, 0)]  # no training loss before the first epoch
    samples = 0
    where = f"{desc or 'training'} ({cfg.method})"
    stepper = Stepper(model, cfg, opt, params, trained, n)
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc or cfg.method, leave=False, disable=not progress,
               position=position)
    for epoch in bar:
        t0 = time.perf_counter()
        due = _solve_due(cfg, epoch)
        extra, train_metrics = {}, None
        if due and cfg.solve_order == "dec_first":
            _, extra = _decoder_phase(model, x_train, cfg, gen, f"{where}, epoch {epoch}", scored)
        anchors = {nm: p.detach().clone() for nm, p in zip(named, params)}
        loss_sum, seen = _gradient_phase(stepper, x_train, cfg, gen, anchors)
        samples += seen
        loss_sum = dist.total(loss_sum, stepper.device)
        _check_finite(model, loss_sum, f"{where}, epoch {epoch}")
        if due and cfg.solve_order == "enc_first":
            train_metrics, extra = _decoder_phase(model, x_train, cfg, gen, f"{where}, epoch {epoch}", scored)
        row = record(epoch, loss_sum / n, time.perf_counter() - t0, samples, stepper.steps, train_metrics, extra)
        history.append(row)
        if "test_mse" in row:
            bar.set_postfix(test_mse=f"{row['test_mse']:.4f}", l0=f"{row['test_l0']:.1f}")
        if report is not None:
            report(epoch, row)  # may raise to end the run (a pruned tuning trial)
        if epoch == cfg.stop_epoch:
            break
    bar.close()
    return history
