"""The decoder solve at scale: N = 1,000,000, n = 2304, d = 16384, K = 64, with generated TopK codes.

Times the streamed float64 statistics (sparse TopK path), the Cholesky solve and the post-solve MSE
from the statistics, and reports peak resident memory (it does not grow with N: the statistics are
d x d + d x n). Data are generated batch by batch from a fixed pool, so generation is not timed.

    .venv/bin/python bench/bench_solve.py [--n-samples 1000000] [--n-latents 16384] [--n-features 2304] [--k 64]
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_train import matmul_rate  # noqa: E402
from common.maths.pam import DecoderStats, solve_decoder, sse_from_stats  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-samples", type=int, default=1_000_000)
    ap.add_argument("--n-latents", type=int, default=16384)
    ap.add_argument("--n-features", type=int, default=2304)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    N, d, n, k, B = args.n_samples, args.n_latents, args.n_features, args.k, args.batch
    print(f"N={N:,} n={n} d={d} K={k}, batch {B}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate64 = matmul_rate(torch.float64)
    print(f"dense matmul rate (2048^2, float64): {rate64:.0f} GFLOP/s")
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(4):
        x = torch.randn(B, n, generator=g)
        vals, idx = torch.rand(B, d, generator=g).topk(k, dim=-1)
        pool.append((x, vals, idx))
    print(f"after generating the pool: peak RSS {peak_gb():.2f} GB")

    stats = DecoderStats.empty(n, d)
    t0 = time.perf_counter()
    done, i = 0, 0
    while done < N:
        x, vals, idx = pool[i % len(pool)]
        m = min(B, N - done)
        stats.add_sparse(x[:m], vals[:m], idx[:m])
        done += m
        i += 1
    t_stats = time.perf_counter() - t0
    f_stats = 2 * N * k * n + 2 * N * k * k
    print(f"statistics: {t_stats:.1f} s ({N / t_stats:,.0f} samples/s, {f_stats / t_stats / 1e9:.1f} GFLOP/s useful, "
          f"sparse)  peak RSS {peak_gb():.2f} GB")

    t0 = time.perf_counter()
    D, b, info = solve_decoder(stats, torch.zeros(d, n), torch.zeros(n), alpha=1e-6, mu=1e-6)
    t_solve = time.perf_counter() - t0
    f_solve = d ** 3 / 3 + 2 * d * d * n
    print(f"solve (Cholesky + triangular solves): {t_solve:.1f} s ({f_solve / t_solve / 1e9:.0f} GFLOP/s, "
          f"{100 * f_solve / t_solve / 1e9 / rate64:.0f}% of float64 matmul rate)  peak RSS {peak_gb():.2f} GB")
    t0 = time.perf_counter()
    sse = sse_from_stats(stats, D, b, gram_atoms=info["gram_atoms"])  # as training does: G D from the solve
    t_mse = time.perf_counter() - t0
    print(f"post-solve training MSE from the statistics: {sse / (N * n):.6f} in {t_mse:.1f} s (no pass over the data)")
    total = t_stats + t_solve + t_mse
    print(f"total {total:.1f} s, peak RSS {peak_gb():.2f} GB  (targets: <= 180 s, <= 8 GB)")


if __name__ == "__main__":
    main()
