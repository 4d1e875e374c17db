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

import torch

from ..infra.stream import chunks

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


def _gram_edges(d: int) -> list[int]:
    """Edges of the row blocks of a (d, d) Gram matrix."""
    nb = max(1, min(GRAM_BLOCKS, d // GRAM_MIN_BLOCK))
    return [round(i * d / nb) for i in range(nb + 1)]


def _add_upper_gram(upper: torch.Tensor, z: torch.Tensor) -> None:
    """upper += the upper triangle (diagonal included) of z^T z, computing only tiles on or above the diagonal."""
    d = z.shape[1]
    edges = _gram_edges(d)
    for a0, a1 in zip(edges, edges[1:]):
        za = z[:, a0:a1]
        upper[a0:a1, a0:a1] += torch.triu(za.T @ za)
        if a1 < d:
            upper[a0:a1, a1:].addmm_(za.T, z[:, a1:])


def _sorted_nonzeros(vals: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype):
    """TopK codes' non-zeros (b, k) with each row's indices ascending, so that the pairs (i <= j) of positions land in
    the upper triangle; values as ``dtype``."""
    idx, order = idx.sort(dim=1)
    return idx, vals.gather(1, order).to(dtype)


def _upper_pairs(idx: torch.Tensor, v: torch.Tensor, d: int):
    """Every pair (i <= j) of each row's non-zeros, PAIR_CHUNK rows at a time: (flat positions in a (d, d)
    matrix's upper triangle, products v_i v_j), each of length rows * k (k + 1) / 2; positions repeat across rows."""
    b, k = idx.shape
    r, c = torch.triu_indices(k, k, device=idx.device)
    for s in range(0, b, PAIR_CHUNK):
        i_c, v_c = idx[s:s + PAIR_CHUNK], v[s:s + PAIR_CHUNK]
        yield (i_c[:, r] * d + i_c[:, c]).reshape(-1), (v_c[:, r] * v_c[:, c]).reshape(-1)


def _codes_transposed(idx: torch.Tensor, v: torch.Tensor, d: int) -> torch.Tensor:
    """Z^T as a sparse CSR (d, b) matrix from the non-zeros, so that sum z x^T = Z^T X costs b*k*n multiply-adds."""
    b, k = idx.shape
    rows = torch.stack([idx.reshape(-1), torch.arange(b, device=idx.device).repeat_interleave(k)])
    return torch.sparse_coo_tensor(rows, v.reshape(-1), (d, b), check_invariants=False).coalesce().to_sparse_csr()


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

    def _check_x(self, x: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (b, {self.n_features}) (n_features of these statistics), got "
                             f"{tuple(x.shape)}")
        if other.ndim != 2 or other.shape[0] != x.shape[0]:
            raise ValueError(f"{other_name} must have shape ({x.shape[0]}, ...) (one row per row of x), got "
                             f"{tuple(other.shape)}")

    def add_dense(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Add a batch: x (b, n_features), dense codes (b, n_latents)."""
        self._check_x(x, codes, "codes")
        if codes.shape[1] != self.n_latents:
            raise ValueError(f"codes must have shape ({x.shape[0]}, {self.n_latents}) (n_latents of these "
                             f"statistics), got {tuple(codes.shape)}")
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
        self._check_x(x, vals, "vals")
        if idx.shape != vals.shape or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an integer tensor of the shape of vals {tuple(vals.shape)}, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_latents):
            raise ValueError(f"idx must hold latent indices in 0..{self.n_latents - 1} (n_latents of these "
                             f"statistics), got {int(idx.min())}..{int(idx.max())}")
        x64, vals, idx = x.to(self.device, torch.float64), vals.to(self.device), idx.to(self.device)
        self._add_common(x64)
        d = self.n_latents
        idx, v64 = _sorted_nonzeros(vals, idx, torch.float64)
        self.sum_z.index_add_(0, idx.reshape(-1), v64.reshape(-1))
        zz = self.zz_upper.view(-1)
        for pos, prod in _upper_pairs(idx, v64, d):
            zz.index_add_(0, pos, prod)
        # accumulated in place: no (n_latents, n_features) temporary per batch
        self.zx.addmm_(_codes_transposed(idx, v64, d), x64)
        nz = v64 != 0
        self.nnz += float(nz.sum())
        self.fired[idx[nz]] = True

    def scaled(self, factor: float) -> "DecoderStats":
        """The statistics with every sum multiplied by ``factor`` (mini-batch solve: factor = N / |B|)."""
        return DecoderStats(self.n * factor, self.sum_z * factor, self.sum_x * factor, self.zz_upper * factor,
                            self.zx * factor, self.sum_xx * factor, self.nnz * factor, self.fired.clone())


def _two_sum_(total: torch.Tensor, comp: torch.Tensor, term: torch.Tensor) -> None:
    """total += term in float32, the addition's rounding error added to comp (Neumaier's compensated summation,
    the error found exactly by Knuth's branch-free TwoSum). Same shapes; ``term`` is overwritten."""
    new = total + term
    virt = new - total                   # the part of term that new holds
    term.sub_(virt)                      # what was lost of term
    total.sub_(virt.neg_().add_(new))    # what was lost of total
    comp.add_(total.add_(term))
    total.copy_(new)


class CompensatedStats:
    """DecoderStats's sums accumulated in float32 (``collect_stats(..., dtype="float32")``: GPUs with slow float64).

    Each batch's z z^T (upper triangle), z x^T, sum z and sum x are computed in float32 and added to float32 running
    sums by compensated summation (``_two_sum_``): a second float32 tensor per sum carries the rounding error of
    every addition, so the accumulation over batches loses next to nothing and the error left is that of the
    per-batch float32 products (docs/DESIGN.md, section 3.3). N, the non-zero count and sum ||x||^2 (a float32 sum
    per batch) are host floats, as in DecoderStats. ``to_float64()``: sum + compensation as float64 DecoderStats,
    for the float64 solve and the all-reduce.
    """

    def __init__(self, n_features: int, n_latents: int, device=None):
        z = dict(dtype=torch.float32, device=device)
        self.sums = {"sum_z": torch.zeros(n_latents, **z), "sum_x": torch.zeros(n_features, **z),
                     "zz_upper": torch.zeros(n_latents, n_latents, **z), "zx": torch.zeros(n_latents, n_features, **z)}
        self.comp = {name: torch.zeros_like(t) for name, t in self.sums.items()}
        self.n = self.sum_xx = self.nnz = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
        self.device = torch.device(device or "cpu")
        self.scratch = None  # the sparse path's (n_latents^2,) float32 sums of one chunk of pairs

    def _add(self, name: str, term: torch.Tensor) -> None:
        _two_sum_(self.sums[name], self.comp[name], term)

    def _add_common(self, x32: torch.Tensor) -> None:
        self.n += x32.shape[0]
        self._add("sum_x", x32.sum(0))
        self.sum_xx += float(x32.pow(2).sum())

    def add_dense(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Add a batch: x (b, n_features), dense codes (b, n_latents)."""
        x32, z32 = x.to(self.device, torch.float32), codes.to(self.device, torch.float32)
        self._add_common(x32)
        self._add("sum_z", z32.sum(0))
        upper, comp = self.sums["zz_upper"], self.comp["zz_upper"]
        edges = _gram_edges(z32.shape[1])
        for a0, a1 in zip(edges, edges[1:]):  # row block by row block, from the diagonal on
            tile = z32[:, a0:a1].T @ z32[:, a0:]
            tile[:, :a1 - a0].triu_()
            _two_sum_(upper[a0:a1, a0:], comp[a0:a1, a0:], tile)
        self._add("zx", z32.T @ x32)
        nz = z32 != 0
        self.nnz += float(nz.sum())
        self.fired |= nz.any(0)

    def add_sparse(self, x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Add a batch of TopK codes given by their non-zeros: vals, idx (b, k)."""
        x32 = x.to(self.device, torch.float32)
        self._add_common(x32)
        d = self.fired.shape[0]
        idx, v32 = _sorted_nonzeros(vals.to(self.device), idx.to(self.device), torch.float32)
        self._add("sum_z", torch.zeros(d, dtype=torch.float32, device=self.device)
                  .index_add_(0, idx.reshape(-1), v32.reshape(-1)))
        if self.scratch is None:
            self.scratch = torch.zeros(d * d, dtype=torch.float32, device=self.device)
        upper, comp = self.sums["zz_upper"].view(-1), self.comp["zz_upper"].view(-1)
        for pos, prod in _upper_pairs(idx, v32, d):
            # the chunk's products summed in float32 in the scratch matrix (kept zero), then added with compensation
            # where they landed: O(b k^2), not O(d^2). A position repeated across rows gathers the same three
            # numbers, so its copies compute, and write back, the same values.
            self.scratch.index_add_(0, pos, prod)
            s, c, term = (t.index_select(0, pos) for t in (upper, comp, self.scratch))
            self.scratch.index_fill_(0, pos, 0.0)
            _two_sum_(s, c, term)
            upper.index_copy_(0, pos, s)
            comp.index_copy_(0, pos, c)
        self._add("zx", _codes_transposed(idx, v32, d) @ x32)
        nz = v32 != 0
        self.nnz += float(nz.sum())
        self.fired[idx[nz]] = True

    def to_float64(self) -> DecoderStats:
        """sum + compensation of every statistic, as float64 DecoderStats (this accumulator's memory is released)."""
        wide, self.scratch = {}, None
        for name in list(self.sums):
            wide[name] = self.sums.pop(name).double().add_(self.comp.pop(name))
        return DecoderStats(self.n, wide["sum_z"], wide["sum_x"], wide["zz_upper"], wide["zx"], self.sum_xx,
                            self.nnz, self.fired)


STATS_DTYPES = ("float64", "float32")


@torch.no_grad()
def collect_stats(model, x, batch_size: int = 1024, dtype: str = "float64") -> DecoderStats:
    """Stream ``x`` (n_samples, n_features) through the encoder and accumulate the statistics (on x's device).
    ``x``: a tensor, or a ``common.infra.stream.Stream`` (a folder of shards, read a buffer at a time; the same
    batches in the same order as the same rows in memory).

    ``dtype``: "float64" accumulates in float64; "float32" computes each batch's products in float32 and accumulates
    them with compensated summation (``CompensatedStats``). Either way the result is float64 DecoderStats.
    """
    if dtype not in STATS_DTYPES:
        raise ValueError(f"dtype must be one of {STATS_DTYPES}, got {dtype!r}")
    stats = (DecoderStats.empty if dtype == "float64" else CompensatedStats)(model.n_features, model.n_latents,
                                                                             x.device)
    sparse = model.is_topk and model.k < SPARSE_MAX_DENSITY * model.n_latents
    for xb in chunks(x, batch_size):
        if sparse:
            vals, idx, _ = model.encode_sparse(xb)
            stats.add_sparse(xb, vals, idx)
        else:
            stats.add_dense(xb, model.encode(xb))
    return stats if dtype == "float64" else stats.to_float64()


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


def _check_solve(stats: DecoderStats, atoms_prev: torch.Tensor, b_prev: torch.Tensor, **coefs) -> None:
    """ValueError for a negative coefficient, empty statistics or anchors of another shape than the statistics'."""
    for name, v in coefs.items():
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")
    if stats.n <= 0:
        raise ValueError("cannot solve the decoder from empty statistics")
    if tuple(atoms_prev.shape) != (stats.n_latents, stats.n_features):
        raise ValueError(f"atoms_prev must have shape (n_latents, n_features) = ({stats.n_latents}, "
                         f"{stats.n_features}) of the statistics, got {tuple(atoms_prev.shape)}")
    if tuple(b_prev.shape) != (stats.n_features,):
        raise ValueError(f"b_prev must have shape (n_features,) = ({stats.n_features},) of the statistics, got "
                         f"{tuple(b_prev.shape)}")


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
    _check_solve(stats, atoms_prev, b_prev, alpha=alpha, beta=beta, mu=mu, nu=nu)
    N = stats.n
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
    # Cholesky in A's own memory on every device (torch: MKL LAPACK on the cpu, cuSOLVER on a GPU). A is symmetric,
    # so A.mT is the same matrix, column-major: LAPACK's layout, so no third d x d matrix is made; the two
    # triangular solves overwrite rhs. (scipy's OpenBLAS dpotrf, used before, segfaulted from n_latents ~16000 with
    # two threads on this machine: docs/DESIGN.md, section 3.4.)
    L, info_ = torch.linalg.cholesky_ex(A.mT, out=(A.mT, torch.empty((), dtype=torch.int32, device=A.device)))
    if int(info_) != 0:
        raise RuntimeError("decoder solve: A is not positive definite; set alpha or mu > 0")
    D = torch.linalg.solve_triangular(L, rhs, upper=False, out=rhs)
    D = torch.linalg.solve_triangular(L.mT, D, upper=True, out=rhs)
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
