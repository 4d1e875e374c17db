"""Several processes or machines (torch.distributed, started by torchrun): what training shares across ranks.

Every rank holds the same training data and draws the same global batch order (the same seed); rank ``r``
of ``w`` trains on rows ``r, r + w, ...`` of each global batch (docs/DESIGN.md, section 3.9):

- SGD (and PAM's encoder phase): each rank scales its gradients by its share of the global batch
  (``n_r / n``) and the ranks sum them (``all_reduce``), so every rank steps with the gradient of the global
  batch's mean loss, exactly as one process would (up to the order of float additions; an uneven last batch
  is weighted correctly, which equal-weight averaging would not do);
- PAM's decoder phase: each rank accumulates the float64 statistics (``N, sum z, sum x, sum z z^T, sum z x^T,
  sum ||x||^2``) of its rows of the training set; they are summed across ranks (sums add exactly), and every
  rank then solves the same system, so the decoders agree;
- evaluation: the metric sums of each rank's rows are summed;
- AuxK's "fired" record is or-ed across ranks each step, so "dead" means the same everywhere.

Start it with torchrun (one node: ``torchrun --nproc_per_node=2 script.py``; several:
``torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=G script.py``),
then call ``init()`` (the experiment scripts do it in ``common.experiments.config.configure``). Backends: gloo on CPUs;
with CUDA, nccl for CUDA tensors and gloo for CPU ones, each rank on the GPU ``LOCAL_RANK``. Every collective
has a timeout, so a rank that dies makes the others fail with an error instead of hanging forever.

A script under torchrun (docs/DESIGN.md, section 3.9): every rank runs it whole, on the same settings and
data, and trains the same runs one at a time; only rank 0 writes files (``common.infra.outputs.is_writer``), prints
and shows progress (``quiet_others``); what depends on the file system (the output folder's lock and
records, the runs finished earlier) is decided by rank 0 and sent to the others (``on_main``); data that
may have to be fetched or extracted is prepared by rank 0 first (``main_first``).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
import sys

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("SPLINTERP_DIST_TIMEOUT", 120))
# how long the other ranks wait while rank 0 prepares data (an LLM extraction takes minutes; a failure of
# rank 0 there is reported to them at once, so this bounds only a rank 0 that is stuck or killed)
PREPARE_TIMEOUT_S = float(os.environ.get("SPLINTERP_DIST_PREPARE_TIMEOUT", 3600))


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one of several ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def init(backend: str | None = None, timeout_s: float = TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
    environment); nothing to do (False) when started without torchrun. Backend: gloo, and with CUDA
    "cpu:gloo,cuda:nccl" (nccl for CUDA tensors), this rank's GPU being LOCAL_RANK. The group is left at exit
    (however the process ends), so the exit status is the script's."""
    if not launched() or dist.is_initialized():
        return dist.is_initialized()
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if "nccl" in backend and local < torch.cuda.device_count():
        torch.cuda.set_device(local)   # "cuda" then means this rank's GPU
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # with gloo, torch 2.13 sometimes aborts at interpreter exit ("terminate called without an active
    # exception", status 134 instead of the script's) unless the group is destroyed first
    atexit.register(_leave)
    return True


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_others() -> None:
    """On ranks other than 0, send stdout and stderr to /dev/null: prints, progress bars, warnings and an error
    that every rank meets alike (a bad setting: rank 0 reports it) appear once. An uncaught exception's
    traceback still reaches the terminal (a failure that only this rank meets)."""
    if not active() or is_main():
        return
    hook, devnull = sys.excepthook, open(os.devnull, "w")

    def loud(*exc):
        sys.stderr = sys.__stderr__
        hook(*exc)
    sys.stdout = sys.stderr = devnull
    sys.excepthook = loud


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (or of the whole set): every ``world()``-th, from ``rank()``."""
    return indices[rank()::world()] if active() else indices


def _collective(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(f"rank {rank()} of {world()}: a collective failed or timed out after {TIMEOUT_S:g} s "
                           f"(another rank died or is stuck?): {err}") from None


def _sum(t: torch.Tensor, op=None) -> None:
    _collective(dist.all_reduce, t, op=op or dist.ReduceOp.SUM)


def on_main(fn):
    """``fn()`` run on rank 0 only; its result, or the exception it raised, is sent to every rank (through
    pickle). What depends on the file system (the output folder's lock and records, finished runs) is thus
    decided once, and the ranks never diverge, even when nodes do not share the folder."""
    if not active():
        return fn()
    box = [None, None]
    if is_main():
        try:
            box[0] = fn()
        except Exception as err:  # noqa: BLE001 (every rank raises it)
            try:
                pickle.loads(pickle.dumps(err))
                box[1] = err
            except Exception:  # noqa: BLE001 (an exception that does not survive pickle: its text)
                box[1] = RuntimeError(f"rank 0: {type(err).__name__}: {err}")
            _collective(dist.broadcast_object_list, box, src=0)
            raise
    _collective(dist.broadcast_object_list, box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


@contextlib.contextmanager
def main_first(timeout_s: float = PREPARE_TIMEOUT_S):
    """Rank 0 runs the block first (it may fetch, extract and cache data), then the other ranks run it (and
    read what rank 0 cached). They wait for rank 0 up to ``timeout_s``; if its block fails they fail at once,
    with its exit status when it exited (e.g. 2 for a bad setting) and a message otherwise."""
    if not active():
        yield
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    status = torch.zeros(2, dtype=torch.float64)  # failed, exit status (-1: an exception)
    try:
        if is_main():
            try:
                yield
            except BaseException as err:
                code = err.code if isinstance(err, SystemExit) else -1
                status.copy_(torch.tensor([1.0, code if isinstance(code, int) else 1]))
                _collective(dist.all_reduce, status, group=group)
                raise
            _collective(dist.all_reduce, status, group=group)
        else:
            _collective(dist.all_reduce, status, group=group)
            if status[0]:
                if status[1] >= 0:
                    raise SystemExit(int(status[1]))
                raise RuntimeError(f"rank {rank()} of {world()}: rank 0 failed while preparing the data "
                                   "(its error is above)")
            yield
    finally:
        dist.destroy_process_group(group)


def sum_gradients(params, share: float) -> None:
    """Every rank's gradients, scaled by its share of the global batch, summed across ranks (a parameter
    without a gradient here counts as zero, so every rank sends the same layout)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(share)  # one collective for all parameters
    _sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def total(value: float, device=None) -> float:
    """A number summed across ranks (``device``: where the backend communicates, e.g. cuda for nccl)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _sum(t)
    return float(t)


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask or-ed across ranks."""
    if not active():
        return mask
    m = mask.to(torch.int32)
    _sum(m, dist.ReduceOp.MAX)
    return m.bool()


def sum_stats(stats) -> None:
    """Sum ``common.maths.pam.DecoderStats`` (float64 tensors and counts; ``fired`` or-ed) across ranks, in place."""
    if not active():
        return
    scalars = torch.tensor([stats.n, stats.sum_xx, stats.nnz], dtype=torch.float64, device=stats.zx.device)
    for t in (stats.sum_z, stats.sum_x, stats.zz_upper, stats.zx, scalars):
        _sum(t)
    stats.n, stats.sum_xx, stats.nnz = (float(v) for v in scalars)
    stats.fired = any_rank(stats.fired)


def sum_eval(sums) -> None:
    """Sum ``common.maths.metrics.EvalSums`` across ranks, in place."""
    if not active():
        return
    scalars = torch.tensor([sums.n_samples, sums.sse, sums.sum_xx, sums.nnz], dtype=torch.float64,
                           device=sums.sum_x.device)
    _sum(scalars)
    _sum(sums.sum_x)
    sums.n_samples, sums.sse, sums.sum_xx, sums.nnz = int(scalars[0]), float(scalars[1]), float(scalars[2]), \
        float(scalars[3])
    sums.fired = any_rank(sums.fired)


def finish() -> None:
    """Leave the process group (before the process exits: its communication threads are joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
