"""PAM's decoder statistics, float64 vs float32 with compensated accumulation (``stats_dtype``), side by side.

Times one epoch's statistics (the accumulation from codes already computed, plus the float32 path's conversion
to float64; the encoder pass is the same for both and not timed) on the dense path (ReLU codes) and the sparse
TopK path, alternating the two dtypes ``--repeats`` times and reporting each one's fastest and median epoch, so
that a machine shared with other jobs slows both alike.

    .venv/bin/python bench/bench_stats_dtype.py [--n-samples 20000] [--n-latents 2048] [--n-features 640] [--k 64]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.maths.pam import SPARSE_MAX_DENSITY, CompensatedStats, DecoderStats  # noqa: E402


def epoch(kind: str, dtype: str, batches, n: int, d: int) -> float:
    t0 = time.perf_counter()
    stats = DecoderStats.empty(n, d) if dtype == "float64" else CompensatedStats(n, d)
    for x, a, b in batches:
        if kind == "dense":
            stats.add_dense(x, a)
        else:
            stats.add_sparse(x, a, b)
    if dtype == "float32":
        stats.to_float64()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-samples", type=int, default=20_000)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--n-features", type=int, default=640)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    N, d, n, k, B = args.n_samples, args.n_latents, args.n_features, args.k, args.batch
    if not k < SPARSE_MAX_DENSITY * d:
        raise SystemExit(f"--k {k} would take the dense path (k < {SPARSE_MAX_DENSITY} * n_latents needed)")
    print(f"N={N:,} n={n} d={d} K={k} (sparse path), batch {B}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    dense, sparse = [], []
    for s in range(0, N, B):
        m = min(B, N - s)
        x = torch.randn(m, n, generator=g)
        dense.append((x, torch.randn(m, d, generator=g).relu_(), None))
        vals, idx = torch.rand(m, d, generator=g).topk(k, dim=-1)
        sparse.append((x, vals, idx))
    for kind, batches in (("dense", dense), ("sparse", sparse)):
        times = {"float64": [], "float32": []}
        for _ in range(args.repeats):
            for dtype in times:
                times[dtype].append(epoch(kind, dtype, batches, n, d))
        (t64, m64), (t32, m32) = ((min(times[t]), statistics.median(times[t])) for t in ("float64", "float32"))
        print(f"{kind:6s} statistics per epoch: float64 {t64:.2f} s (median {m64:.2f}), "
              f"float32 compensated {t32:.2f} s (median {m32:.2f}); float32 / float64 = {t32 / t64:.2f}")


if __name__ == "__main__":
    main()
