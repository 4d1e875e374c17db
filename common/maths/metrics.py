"""Reconstruction metrics (docs/DESIGN.md, section 4), defined once, kept apart from the training objectives;
recovery of known features (``recovery``, section 10).

Every metric is computed from sums accumulated over the whole evaluation set (``EvalSums``), so means
are weighted by sample count, never means of per-batch means.

    mse   sum ||x - recon||^2 / (n_samples * n_features)     (what the original scripts report)
    fvu   sum ||x - recon||^2 / sum ||x - xbar||^2, xbar = the evaluation set's own mean
    l0    mean number of non-zero codes per sample
    dead  fraction of latents that never fire (are never non-zero) on the evaluation set
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..infra.data import check_array, check_int
from ..infra.stream import chunks


@dataclass
class EvalSums:
    """Running float64 sums over an evaluation set."""

    n_samples: int
    n_features: int
    sse: float              # sum ||x - recon||^2
    sum_x: torch.Tensor     # (n_features,) float64
    sum_xx: float           # sum ||x||^2
    nnz: float              # total non-zero codes
    fired: torch.Tensor     # (n_latents,) bool: latent was ever non-zero

    @classmethod
    def empty(cls, n_features: int, n_latents: int, device=None) -> "EvalSums":
        return cls(0, n_features, 0.0, torch.zeros(n_features, dtype=torch.float64, device=device), 0.0, 0.0,
                   torch.zeros(n_latents, dtype=torch.bool, device=device))

    def add(self, recon_error: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Add a batch's model-dependent sums: recon_error = x - recon or recon - x (b, n_features); dense codes
        (b, n_latents), or with ``idx`` the TopK non-zeros: codes = values (b, k), idx = their latent
        indices (b, k). The model-free sums of x come from ``data_sums``."""
        self.n_samples += recon_error.shape[0]
        # per-sample sums in the data's precision (n_features terms), accumulated across samples in float64
        self.sse += float(torch.linalg.vecdot(recon_error, recon_error).sum(dtype=torch.float64))
        nz = codes != 0
        self.nnz += float(nz.sum())
        if idx is None:
            self.fired |= nz.any(0)
        else:
            self.fired[idx[nz]] = True


def summarise(s: EvalSums) -> dict:
    """{mse, fvu, l0, dead} from accumulated sums."""
    if s.n_samples <= 0:
        raise ValueError(f"cannot summarise an empty evaluation set (n_samples={s.n_samples}): "
                         "evaluate on at least one sample")
    total_var = s.sum_xx - float(s.sum_x.pow(2).sum()) / s.n_samples
    return {
        "mse": s.sse / (s.n_samples * s.n_features),
        "fvu": s.sse / total_var if total_var > 0 else float("nan"),
        "l0": s.nnz / s.n_samples,
        "dead": 1.0 - float(s.fired.double().mean()),
    }


@torch.no_grad()
def data_sums(x: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, float]:
    """(sum of x over samples (n_features,) float64, sum ||x||^2): the model-free part of the metrics."""
    sum_x, sum_xx = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0.0
    for xb in chunks(x, batch_size):  # a tensor's slices, or a Stream's (common/infra/stream.py)
        sum_x += xb.sum(0, dtype=torch.float64)
        sum_xx += float(xb.pow(2).sum(1).sum(dtype=torch.float64))
    return sum_x, sum_xx


@torch.no_grad()
def evaluate(model, x: torch.Tensor, batch_size: int = 1024, sums_of_x=None) -> dict:
    """Reconstruction metrics of ``model`` on ``x`` (n_samples, n_features), streamed in batches.

    ``sums_of_x``: ``data_sums(x)``, passed when the same data are evaluated repeatedly (training).
    Batches of 1024 keep each batch in cache: ~20% faster than 4096 at the MNIST sizes.
    """
    return summarise(evaluate_sums(model, x, batch_size, sums_of_x))


@torch.no_grad()
def evaluate_sums(model, x: torch.Tensor, batch_size: int = 1024, sums_of_x=None) -> EvalSums:
    """``evaluate``'s sums before they are summarised (so that several processes can add theirs)."""
    check_int(batch_size, "batch_size", low=1)
    sums = EvalSums.empty(model.n_features, model.n_latents, device=x.device)
    for xb in chunks(x, batch_size):
        if model.is_topk:
            vals, idx, _ = model.encode_sparse(xb)
            sums.add(model.decode_sparse(vals, idx).sub_(xb), vals, idx)
        else:
            codes = model.encode(xb)
            sums.add(model.decode(codes).sub_(xb), codes)
    sum_x, sum_xx = sums_of_x if sums_of_x is not None else data_sums(x, batch_size)
    sums.sum_x, sums.sum_xx = sum_x.clone(), float(sum_xx)
    return sums


def _pair(x, recon) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 copies of x (n_samples, n_features), n_samples >= 1, and recon of the same shape."""
    x = check_array(x, "x", ("n_samples", "n_features"))
    if x.shape[0] == 0:
        raise ValueError("x must have shape (n_samples, n_features) with n_samples >= 1, "
                         f"got {x.shape}")
    recon = check_array(recon, "recon", x.shape, hint=" (the shape of x)")
    return x, recon


def mse(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over samples and features of (x - recon)^2; x and recon (n_samples, n_features), finite."""
    x, recon = _pair(x, recon)
    return float(np.mean((x - recon) ** 2))


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """sum ||x - recon||^2 / sum ||x - mean(x)||^2 (the mean of this same set); shapes as in ``mse``.

    Raises ValueError when x has no variance (every row equal): the ratio is undefined."""
    x, recon = _pair(x, recon)
    total = float(((x - x.mean(0)) ** 2).sum())
    if not total > 0:
        raise ValueError(f"fvu is undefined: x {x.shape} has zero variance around its mean (every row equal)")
    return float(((x - recon) ** 2).sum()) / total


# --- recovery of known features (synthetic data, common/infra/synthetic.py; docs/DESIGN.md, section 10) -----------
RECOVERY_THRESHOLD = 0.9  # a true atom counts as recovered when some learned atom has |cosine| >= this (fixed
                          # before any result)


def atom_cosines(learned, true) -> np.ndarray:
    """|cosine| between every learned atom (rows of ``learned``, (n_learned, n_features)) and every true atom
    (rows of ``true``, (n_true, n_features)): (n_learned, n_true), float64. The absolute value: an atom's sign
    is not identified (a signed TopK code may carry it); an atom of norm zero has cosine 0 with everything."""
    learned = check_array(learned, "learned", ("n_learned", "n_features"))
    true = check_array(true, "true", ("n_true", learned.shape[1]), hint=f" (n_features = {learned.shape[1]} "
                                                                        "as in learned)")
    if learned.shape[0] == 0 or true.shape[0] == 0:
        raise ValueError(f"need at least one atom on each side, got learned {learned.shape}, true {true.shape}")

    def unit(a):
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)
    return np.abs(unit(learned) @ unit(true).T)


def recovery(learned, true, threshold: float = RECOVERY_THRESHOLD) -> dict:
    """How well the learned atoms recover the true ones (``atom_cosines``' matrix C, n_learned x n_true):

        mmcs_true_to_learned   mean over true atoms j of max_i C_ij  (each true atom's best learned atom)
        mmcs_learned_to_true   mean over learned atoms i of max_j C_ij
        recovered_fraction     fraction of true atoms j with max_i C_ij >= threshold
    """
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    c = atom_cosines(learned, true)
    best_true, best_learned = c.max(0), c.max(1)
    return {"mmcs_true_to_learned": float(best_true.mean()), "mmcs_learned_to_true": float(best_learned.mean()),
            "recovered_fraction": float((best_true >= threshold).mean())}
