"""One training epoch's time per activation and method, on a fixed small MNIST subset.

Every activation of common/maths/sae.py's table, trained by pam, sgd and sgd_tied at E2's settings (d 256, K 15,
batch 128, lr 3e-3, paper init; each activation with E2's default penalty: relu L1 = E2's L1, jumprelu L0 =
E2's L0), on the first N_TRAIN training images (evaluated on the first N_TEST test images), one thread, one run
at a time. Prints per row the median over the epochs of the training time (for PAM: encoder phase + decoder
statistics + solve) and of the evaluation time, and the final training MSE and L0; writes the table as JSON
(results/bench/activations.json by default).

    .venv/bin/python bench/bench_activations.py [--epochs 2] [--n-train 10000] [--out results/bench/activations.json]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.experiments.config import script_constants  # noqa: E402
from common.infra.data import load_mnist  # noqa: E402
from common.infra.outputs import write_json  # noqa: E402
from common.maths.sae import ACTIVATIONS, SAE, activation_spec  # noqa: E402
from common.maths.train import METHODS, TrainConfig, train  # noqa: E402

E2 = script_constants(ROOT / "exp_e2_MNIST_SGD_PAM_ablations.py")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (the median epoch is reported)")
    ap.add_argument("--n-train", type=int, default=10_000, help="the first N training images")
    ap.add_argument("--n-test", type=int, default=2_000, help="the first N test images")
    ap.add_argument("--out", default="results/bench/activations.json")
    args = ap.parse_args()
    if args.epochs < 1 or not 1 <= args.n_train <= 60_000 or not 1 <= args.n_test <= 10_000:
        ap.error("--epochs must be >= 1, --n-train in 1..60000 and --n-test in 1..10000")
    torch.set_num_threads(1)
    x_train, _, x_test, _ = load_mnist()
    x_train, x_test = x_train[:args.n_train], x_test[:args.n_test]
    d, k = E2["N_LATENTS"], E2["K"]
    print(f"torch {torch.__version__}, 1 thread; MNIST first {len(x_train)} train / {len(x_test)} test images; "
          f"d {d}, K {k}, batch {E2['BATCH_SIZE']}, {args.epochs} epochs per run")
    print(f"{'activation':>10} {'method':>8} {'train s/epoch':>13} {'eval s':>7} {'train mse':>9} {'l0':>6}")
    rows, t0 = [], time.perf_counter()
    for activation in ACTIVATIONS:
        penalty = activation_spec(activation).penalty
        for method in METHODS:
            model = SAE(x_train.shape[1], d, activation, k, tied=method == "sgd_tied", seed=0)
            cfg = TrainConfig(method=method, epochs=args.epochs, batch_size=E2["BATCH_SIZE"], lr=3e-3,
                              l1=E2["L1"] if penalty == "l1" else 0.0, l0=E2["L0"] if penalty == "l0" else 0.0)
            hist = train(model, x_train, x_test, cfg, seed=1, progress=False)[1:]
            row = {"activation": activation, "method": method,
                   "train_s_per_epoch": statistics.median(h["epoch_time"] for h in hist),
                   "eval_s": statistics.median(h["eval_time"] for h in hist),
                   "train_mse": hist[-1]["train_mse"], "train_l0": hist[-1]["train_l0"]}
            rows.append(row)
            print(f"{activation:>10} {method:>8} {row['train_s_per_epoch']:13.3f} {row['eval_s']:7.3f} "
                  f"{row['train_mse']:9.4f} {row['train_l0']:6.1f}", flush=True)
    write_json(args.out, {"settings": {"n_train": len(x_train), "n_test": len(x_test), "n_latents": d, "k": k,
                                       "batch_size": E2["BATCH_SIZE"], "lr": 3e-3, "epochs": args.epochs,
                                       "l1": E2["L1"], "l0": E2["L0"], "threads": 1, "torch": torch.__version__},
                          "rows": rows})
    print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s; written {args.out}")


if __name__ == "__main__":
    main()
