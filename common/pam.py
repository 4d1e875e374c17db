"""PAM-SGD's decoder phase: streamed sufficient statistics and the exact closed-form joint solve.

Coefficient scaling (one convention for the whole project, both phases): the training loss is the
reconstruction MSE (mean over samples *and* features) plus

    alpha ||W_dec||^2 + beta ||b_dec||^2 + mu ||W - W^t||^2 + nu ||b - b^t||^2

so every coefficient is relative to the MSE. The closed form works with the *sum* of squared errors, so
it multiplies each coefficient by ``N * n_features`` (N = samples in the statistics). With that, the
decoder solve minimises exactly the objective the encoder phase and the SGD baselines see.

The solve (docs/DESIGN.md, section 3.4), for the atoms matrix ``D = W_dec`` (n_latents, n_features):

    c = N / (N + beta' + nu');   zbar = s_z / N;   xbar = s_x / N
    A = (alpha' + mu') I + G - N c zbar zbar^T                        (n_latents, n_latents)
    D = A^{-1} (mu' D^t + M^T - c zbar (N xbar + nu' b^t)^T)          (Cholesky solve)
    b = c (xbar - D^T zbar) + nu' / (N + beta' + nu') b^t

with primes the scaled coefficients, G = sum z z^T and M^T = sum z x^T.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .stream import chunks

# The CSR product below is exact and stable; torch only warns that the CSR API is labelled beta.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# collect_stats uses the sparse TopK path when k / n_latents is below this: the sparse cost grows as
# k^2 (scattered adds), the dense one as n_latents^2 (float64 matmul); measured crossover ~0.04 here
# (MNIST k/d = 0.06: equal; LLM k/d = 0.08: dense 3x faster; k/d = 0.004: sparse ~100x faster).
SPARSE_MAX_DENSITY = 0.04
# The sparse path scatters the pairs of non-zeros of this many samples at a time (bench/bench_solve.py sizes,
# k 64: the pair tensors of 1024 samples fit in cache; 0.39 s per 8192 samples vs 0.65 s in one piece).
PAIR_CHUNK = 1024
# Relative ridge added to A when alpha + mu = 0, so that A stays positive definite with dead latents.
TINY_RIDGE = 1e-8


# Dense codes: the upper triangle of z^T z is accumulated block by block (GRAM_BLOCKS^2 tiles, only those on
# or above the diagonal), (nb + 1) / (2 nb) of the full product's work: 56% with 8 blocks.
GRAM_BLOCKS = 8
GRAM_MIN_BLOCK = 64


def _add_upper_gram(upper: torch.Tensor, z: torch.Tensor) -> None:
    """upper += the upper triangle (diagonal included) of z^T z, computing only tiles on or above the diagonal."""
    d = z.shape[1]
    nb = max(1, min(GRAM_BLOCKS, d // GRAM_MIN_BLOCK))
    edges = [round(i * d / nb) for i in range(nb + 1)]
    for i in range(nb):
        a0, a1 = edges[i], edges[i + 1]
        za = z[:, a0:a1]
        upper[a0:a1, a0:a1] += torch.triu(za.T @ za)
        if a1 < d:
            upper[a0:a1, a1:].addmm_(za.T, z[:, a1:])


@dataclass
class DecoderStats:
    """float64 sufficient statistics of (x, z) pairs; memory independent of the number of samples.

    n (float), sum_z (n_latents,), sum_x (n_features,), zz_upper: the upper triangle (diagonal included)
    of G = sum z z^T (n_latents, n_latents; G is symmetric, so only half is accumulated: half the work),
    zx = sum z x^T (n_latents, n_features) (the paper's M transposed; P in docs/DESIGN.md 3.3), sum_xx = sum ||x||^2,
    nnz = number of non-zero codes, fired (n_latents,) bool.
    """

    n: float
    sum_z: torch.Tensor
    sum_x: torch.Tensor
    zz_upper: torch.Tensor
    zx: torch.Tensor
    sum_xx: float
    nnz: float
    fired: torch.Tensor

    @classmethod
    def empty(cls, n_features: int, n_latents: int, device=None) -> "DecoderStats":
        """Zero statistics on ``device`` (default cpu), float64."""
        z = dict(dtype=torch.float64, device=device)
        return cls(0.0, torch.zeros(n_latents, **z), torch.zeros(n_features, **z), torch.zeros(n_latents, n_latents, **z),
                   torch.zeros(n_latents, n_features, **z), 0.0, 0.0,
                   torch.zeros(n_latents, dtype=torch.bool, device=device))

    @property
    def device(self) -> torch.device:
        return self.zx.device

    @property
    def n_latents(self) -> int:
        return self.zz_upper.shape[0]

    @property
    def n_features(self) -> int:
        return self.zx.shape[1]

    def gram(self) -> torch.Tensor:
        """G = sum z z^T (n_latents, n_latents), a new symmetric matrix."""
        g = self.zz_upper + self.zz_upper.T
        g.diagonal().sub_(self.zz_upper.diagonal())
        return g

    def gram_times(self, m: torch.Tensor) -> torch.Tensor:
        """G @ m for m (n_latents, c) without forming G."""
        u = self.zz_upper
        return u @ m + u.T @ m - u.diagonal().unsqueeze(1) * m

    def _add_common(self, x64: torch.Tensor) -> None:
        self.n += x64.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_xx += float(x64.pow(2).sum())

    def add_dense(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Add a batch: x (b, n_features), dense codes (b, n_latents)."""
        x64, z64 = x.to(self.device, torch.float64), codes.to(self.device, torch.float64)
        codes = z64
        self._add_common(x64)
        self.sum_z += z64.sum(0)
        _add_upper_gram(self.zz_upper, z64)
        self.zx.addmm_(z64.T, x64)
        nz = codes != 0
        self.nnz += float(nz.sum())
        self.fired |= nz.any(0)

    def add_sparse(self, x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Add a batch of TopK codes given by their non-zeros: vals, idx (b, k). Cost O(b k^2 + b k n)."""
        x64, vals, idx = x.to(self.device, torch.float64), vals.to(self.device), idx.to(self.device)
        self._add_common(x64)
        b, k = idx.shape
        d = self.n_latents
        idx, order = idx.sort(dim=1)  # so that pairs (i <= j) of positions land in the upper triangle
        v64 = vals.gather(1, order).double()
        flat_v = v64.reshape(-1)
        self.sum_z.index_add_(0, idx.reshape(-1), flat_v)
        r, c = torch.triu_indices(k, k, device=self.device)
        zz = self.zz_upper.view(-1)
        for s in range(0, b, PAIR_CHUNK):
            i_c, v_c = idx[s:s + PAIR_CHUNK], v64[s:s + PAIR_CHUNK]
            zz.index_add_(0, (i_c[:, r] * d + i_c[:, c]).reshape(-1), (v_c[:, r] * v_c[:, c]).reshape(-1))
        # sum z x^T = Z^T X with Z^T as a sparse (n_latents, b) matrix: b*k*n multiply-adds, accumulated in
        # place (no (n_latents, n_features) temporary per batch)
        rows = torch.stack([idx.reshape(-1), torch.arange(b, device=self.device).repeat_interleave(k)])
        zt = torch.sparse_coo_tensor(rows, flat_v, (d, b), check_invariants=False).coalesce().to_sparse_csr()
        self.zx.addmm_(zt, x64)
        nz = v64 != 0
        self.nnz += float(nz.sum())
        self.fired[idx[nz]] = True

    def scaled(self, factor: float) -> "DecoderStats":
        """The statistics with every sum multiplied by ``factor`` (mini-batch solve: factor = N / |B|)."""
        return DecoderStats(self.n * factor, self.sum_z * factor, self.sum_x * factor, self.zz_upper * factor,
                            self.zx * factor, self.sum_xx * factor, self.nnz * factor, self.fired.clone())


@torch.no_grad()
def collect_stats(model, x, batch_size: int = 1024) -> DecoderStats:
    """Stream ``x`` (n_samples, n_features) through the encoder and accumulate the statistics (float64, on
    x's device). ``x``: a tensor, or a ``common.stream.Stream`` (a folder of shards, read a buffer at a time;
    the same batches in the same order as the same rows in memory)."""
    stats = DecoderStats.empty(model.n_features, model.n_latents, x.device)
    sparse = model.is_topk and model.k < SPARSE_MAX_DENSITY * model.n_latents
    for xb in chunks(x, batch_size):
        if sparse:
            vals, idx, _ = model.encode_sparse(xb)
            stats.add_sparse(xb, vals, idx)
        else:
            stats.add_dense(xb, model.encode(xb))
    return stats


def sse_from_stats(stats: DecoderStats, atoms: torch.Tensor, b: torch.Tensor, gram: torch.Tensor | None = None,
                   gram_atoms: torch.Tensor | None = None) -> float:
    """sum_r ||x_r - atoms^T z_r - b||^2 from the statistics alone (no pass over the data).

    Pass ``gram = stats.gram()`` when evaluating several decoders: one matmul each instead of two; or
    ``gram_atoms`` = G @ atoms when already known (``solve_decoder``'s info): no matmul at all.
    """
    D, b = atoms.double(), b.double()
    if gram_atoms is not None:
        GD = gram_atoms
    else:
        GD = gram @ D if gram is not None else stats.gram_times(D)
    quad = float((GD * D).sum())
    return float(stats.sum_xx - 2 * (D * stats.zx).sum() - 2 * b @ stats.sum_x + quad
                 + 2 * b @ (D.T @ stats.sum_z) + stats.n * b @ b)


def decoder_objective(stats: DecoderStats, atoms, b, atoms_prev, b_prev, alpha=0.0, beta=0.0, mu=0.0, nu=0.0,
                      sse: float | None = None, gram: torch.Tensor | None = None) -> float:
    """The decoder-phase objective in MSE units: sse / (N n) + alpha|D|^2 + beta|b|^2 + mu|D-D^t|^2 + nu|b-b^t|^2.

    ``sse`` may be passed when already known (from ``sse_from_stats``); ``gram`` as there.
    """
    D, b = atoms.double(), b.double()
    reg = (alpha * float(D.pow(2).sum()) + beta * float(b.pow(2).sum())
           + mu * float((D - atoms_prev.double()).pow(2).sum()) + nu * float((b - b_prev.double()).pow(2).sum()))
    sse = sse_from_stats(stats, D, b, gram) if sse is None else sse
    return sse / (stats.n * stats.n_features) + reg


def solve_decoder(stats: DecoderStats, atoms_prev: torch.Tensor, b_prev: torch.Tensor,
                  alpha: float = 0.0, beta: float = 0.0, mu: float = 0.0, nu: float = 0.0,
                  gram: torch.Tensor | None = None, keep_unfired: bool = False):
    """Exact joint minimiser (atoms, b_dec) of the decoder objective (module docstring).

    atoms_prev (n_latents, n_features) and b_prev (n_features,) are the anchors W^t, b^t. ``gram``: a
    ``stats.gram()`` the caller no longer needs; its memory is reused (overwritten) for A.
    ``keep_unfired``: a latent that never fired in the statistics (its row of G and of sum z x^T is 0)
    does not enter the reconstruction, so with alpha = 0 the objective leaves its atom free (mu = 0) or
    pins it to atoms_prev (mu > 0); the tiny ridge would set a free one to 0. With keep_unfired such atoms
    keep atoms_prev: still an exact minimiser. With alpha > 0 the minimiser mu/(alpha+mu) atoms_prev is
    unique and kept as solved.
    Returns (atoms float64, b float64, info) with info = {"ridge": the ridge added to A (0 unless
    alpha = mu = 0), "scale": N * n_features, "gram_atoms": G @ atoms, read off the normal equations
    A D = rhs (no extra matmul; for ``sse_from_stats``)}.
    """
    for name, v in (("alpha", alpha), ("beta", beta), ("mu", mu), ("nu", nu)):
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")
    if stats.n <= 0:
        raise ValueError("cannot solve the decoder from empty statistics")
    N, d = stats.n, stats.n_latents
    scale = N * stats.n_features
    a_, b_, m_, n_ = alpha * scale, beta * scale, mu * scale, nu * scale
    D0, bias0 = atoms_prev.detach().double(), b_prev.detach().double()
    c = N / (N + b_ + n_)
    zbar, xbar = stats.sum_z / N, stats.sum_x / N

    A = stats.gram() if gram is None else gram
    A.addr_(zbar, zbar, alpha=-N * c)
    ridge = 0.0
    if a_ + m_ == 0:
        ridge = TINY_RIDGE * (float(A.diagonal().mean()) + 1.0)
    A.diagonal().add_(a_ + m_ + ridge)
    rhs = stats.zx.clone()
    rhs.addr_(zbar, N * xbar + n_ * bias0, alpha=-c)
    if m_:
        rhs.add_(D0, alpha=m_)
    rhs_kept = rhs.clone()
    if A.device.type == "cpu":
        # LAPACK Cholesky in A's own memory (A is symmetric, so its transpose view is the Fortran-ordered A):
        # no third d x d matrix at large n_latents.
        try:
            factor = scipy.linalg.cho_factor(A.numpy().T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError as err:
            raise RuntimeError(f"decoder solve: A is not positive definite ({err}); set alpha or mu > 0") from None
        D = torch.from_numpy(scipy.linalg.cho_solve(factor, rhs.numpy(), overwrite_b=True, check_finite=False))
        del A, factor
    else:  # on an accelerator: torch's Cholesky in float64 on the device
        L, info_ = torch.linalg.cholesky_ex(A)
        if int(info_) != 0:
            raise RuntimeError("decoder solve: A is not positive definite; set alpha or mu > 0")
        D = torch.cholesky_solve(rhs, L)
        del A, L
    bias = c * (xbar - D.T @ zbar) + (n_ / (N + b_ + n_)) * bias0
    # A D = rhs with A = G - N c zbar zbar^T + (alpha' + mu' + ridge) I  =>  G D from rhs in O(d n)
    gram_atoms = rhs_kept.add_(D, alpha=-(a_ + m_ + ridge))
    gram_atoms.addr_(zbar, D.T @ zbar, alpha=N * c)
    if keep_unfired and a_ == 0:
        unfired = ~stats.fired
        D[unfired] = D0[unfired]
        gram_atoms[unfired] = 0.0  # rows of G of latents that never fired are 0
    return D, bias, {"ridge": ridge, "scale": scale, "gram_atoms": gram_atoms}
