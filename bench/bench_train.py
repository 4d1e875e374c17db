"""Per-epoch wall time of SGD and PAM-SGD at the MNIST settings (d 256, K 15, batch 128, 60,000 samples).

Prints, per method, the median epoch time split into training (for PAM: encoder pass + decoder
statistics + solve) and evaluation, the estimated useful GFLOP/s, and the machine's dense float32
matmul rate measured in the same run. With ``--repeats R`` every method is trained R times from scratch
and the median over all epochs is printed with the range of the per-repeat medians (the spread between
runs on this shared 2-core VM is larger than within one). Never fails: it reports.

Then, with ``--workers 2`` (the default), the throughput of the protocol runner's parallel mode: two
runs of the same method trained at once in forked processes of one thread each; the effective epoch
time is the wall time over the epochs of both runs.

    .venv/bin/python bench/bench_train.py [--epochs 3] [--repeats 3] [--activation topk] [--workers 2]
"""
import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.infra.data import load_mnist  # noqa: E402
from common.maths.sae import ACTIVATIONS, SAE  # noqa: E402
from common.maths.train import TrainConfig, train  # noqa: E402


def matmul_rate(dtype=torch.float32, size=2048, reps=5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * size ** 3 / (time.perf_counter() - t) / 1e9


def flops(method, n, n_test, n_features, d, k, batches):
    """Multiply-adds x2 of the dense-equivalent work we actually do (TopK decode touches k atoms)."""
    enc = 2 * n * n_features * d
    dec = 2 * n * k * n_features
    train_ = 2 * enc + 3 * dec                       # forward + weight gradient of the encoder, sparse decode
    evaluation = 2 * (n_test * n_features * d + n_test * k * n_features)
    if method == "pam":
        # second encoder pass + dense float64 sum z x^T and the upper tiles of z z^T (k/d = 0.06: dense path)
        stats = enc + 2 * n * d * n_features + 0.56 * 2 * n * d * d
        solve = d ** 3 / 3 + 2 * d * d * n_features + 2 * d * d * n_features
        return train_ + stats + solve, evaluation
    return train_, evaluation + 2 * (n * n_features * d + n * k * n_features)  # SGD also evaluates on train


_DATA = ()  # (x_train, x_test), inherited by the forked workers


def _one_thread_run(args):
    method, activation, epochs = args
    x_train, x_test = _DATA
    torch.set_num_threads(1)
    d, k = 256, 15
    model = SAE(x_train.shape[1], d, activation, k, tied=method == "sgd_tied", seed=0)  # k: if it takes one
    train(model, x_train, x_test, TrainConfig(method=method, epochs=epochs, batch_size=128, lr=3e-3), seed=1,
          progress=False)


def parallel_epoch(method, activation, epochs, workers, x_train, x_test) -> float:
    """Effective seconds per epoch when ``workers`` single-thread runs train at once (incl. evaluation)."""
    global _DATA
    _DATA = (x_train, x_test)
    t = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_one_thread_run, [(method, activation, epochs)] * workers)
    return (time.perf_counter() - t) / (workers * epochs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="serial runs per method, each from scratch")
    ap.add_argument("--activation", default="topk", choices=ACTIVATIONS)
    ap.add_argument("--workers", type=int, default=2, help="parallel single-thread runs (0: skip this part)")
    args = ap.parse_args()
    if args.epochs < 1 or args.repeats < 1:
        ap.error(f"--epochs and --repeats must be >= 1, got {args.epochs} and {args.repeats}")
    x_train, _, x_test, _ = load_mnist()
    n, nf = x_train.shape
    d, k = 256, 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MNIST {n} train / {len(x_test)} test")
    rate32 = matmul_rate()
    print(f"dense matmul rate (2048^2, float32): {rate32:.0f} GFLOP/s; "
          f"float64: {matmul_rate(torch.float64):.0f} GFLOP/s")
    for method in ("sgd", "sgd_tied", "pam"):
        hists = []
        for _ in range(args.repeats):
            model = SAE(nf, d, args.activation, k, tied=method == "sgd_tied", seed=0)
            cfg = TrainConfig(method=method, epochs=args.epochs, batch_size=128, lr=3e-3)
            hists.append(train(model, x_train, x_test, cfg, seed=1, progress=False)[1:])
        epochs = [h for hist in hists for h in hist]
        t_train = statistics.median(h["epoch_time"] for h in epochs)
        t_eval = statistics.median(h["eval_time"] for h in epochs)
        per_run = [statistics.median(h["epoch_time"] + h["eval_time"] for h in hist) for hist in hists]
        f_train, f_eval = flops(method, n, len(x_test), nf, d, k, n // 128)
        total = t_train + t_eval
        useful = (f_train + f_eval) / total / 1e9
        print(f"{method:>8}: epoch {total:.2f} s  (train {t_train:.2f} s + eval {t_eval:.2f} s; "
              f"{args.repeats} runs: {min(per_run):.2f}-{max(per_run):.2f} s)  ~{useful:.0f} GFLOP/s useful "
              f"({100 * useful / rate32:.0f}% of matmul peak)  test mse {hists[-1][-1]['test_mse']:.4f}")
    if args.workers > 1:
        for method in ("sgd", "sgd_tied", "pam"):
            t = parallel_epoch(method, args.activation, args.epochs, args.workers, x_train, x_test)
            print(f"{method:>8}: {args.workers} runs at once, 1 thread each: effective epoch {t:.2f} s "
                  "(wall time / epochs of all runs, incl. evaluation and start-up)")
    print("targets: SGD epoch <= 1.0 s, PAM-SGD epoch <= 1.5 s (original code: ~2.1 s and ~5.1 s)")


if __name__ == "__main__":
    main()
