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
then call ``init()``. Backends: nccl on GPUs, gloo on CPUs. Every collective has a timeout, so a rank that
dies makes the others fail with an error instead of hanging forever.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("SPLINTERP_DIST_TIMEOUT", 120))


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
    environment); nothing to do (False) when started without torchrun. Backend: nccl when this rank has a
    CUDA device, else gloo."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (or of the whole set): every ``world()``-th, from ``rank()``."""
    return indices[rank()::world()] if active() else indices


def _sum(t: torch.Tensor, op=None) -> None:
    try:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise RuntimeError(f"rank {rank()} of {world()}: a collective failed or timed out after {TIMEOUT_S:g} s "
                           f"(another rank died or is stuck?): {err}") from None


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
    """Sum ``common.pam.DecoderStats`` (float64 tensors and counts; ``fired`` or-ed) across ranks, in place."""
    if not active():
        return
    scalars = torch.tensor([stats.n, stats.sum_xx, stats.nnz], dtype=torch.float64, device=stats.zx.device)
    for t in (stats.sum_z, stats.sum_x, stats.zz_upper, stats.zx, scalars):
        _sum(t)
    stats.n, stats.sum_xx, stats.nnz = (float(v) for v in scalars)
    stats.fired = any_rank(stats.fired)


def sum_eval(sums) -> None:
    """Sum ``common.metrics.EvalSums`` across ranks, in place."""
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
