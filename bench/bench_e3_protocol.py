"""Projected wall time of the full default E3 protocol, from measured per-epoch times.

The full protocol (the paper's settings: d 4096, K 320, 100 epochs for the base runs and 50 for every
ablation, seven ablations) takes hours here. This bench measures the per-epoch time (training, decoder
solve and evaluation) of the kinds of run the protocol contains, on the cached default activations and as
the protocol runs them (two single-thread runs at once), then adds up the protocol's plan (shared runs
counted once) with a cost model linear in the training-set size:

    epoch time = fixed(method, activation, k) + per_sample(method, activation, k) * n_train * (encoder updates)

fitted from runs at 100% and 5% of the data (K 320); ReLU and K 1280 are measured at 100% and take the
fixed part of K 320; other K are interpolated linearly in K between 320 and 1280 (extrapolated below 320).
The constants are read from the script's source, so the projection follows edits to it.

    .venv/bin/python bench/bench_e3_protocol.py [--epochs 2]
"""
import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.experiments import experiment  # noqa: E402
from common.experiments.config import script_constants  # noqa: E402
from common.infra import activations, split
from common.maths.sae import SAE, activation_spec  # noqa: E402
from common.maths.train import METHODS, TrainConfig, train  # noqa: E402

SCRIPT = ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"
_DATA = ()


def penalty(activation, c) -> dict:
    """The script's penalty for ``activation`` (common/maths/sae.py's table: relu L1, jumprelu L0, TopK none)."""
    p = activation_spec(activation).penalty
    return {"l1": c["L1"] if p == "l1" else 0.0, "l0": c["L0"] if p == "l0" else 0.0}


def _measure(job):
    """Median seconds per epoch (training + solve + evaluation) of one run, one thread."""
    method, activation, k, fraction, updates, epochs, c = job
    torch.set_num_threads(1)
    x_train, x_test = _DATA
    n = max(1, round(fraction * x_train.shape[0]))
    model = SAE(x_train.shape[1], c["N_LATENTS"], activation, k, tied=method == "sgd_tied", seed=0)
    cfg = TrainConfig(method=method, epochs=epochs, batch_size=c["BATCH_SIZE"], lr=c["LR"], mu=c["MU"], nu=c["NU"],
                      **penalty(activation, c), updates_per_batch=updates,
                      solve_batch=c["SOLVE_BATCH"], solve_every=c["SOLVE_EVERY"], solve_samples=c["SOLVE_SAMPLES"])
    hist = train(model, x_train[:n], x_test, cfg, seed=1, progress=False)[1:]
    return job[:5], n, statistics.median(h["epoch_time"] + h["eval_time"] for h in hist)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    c = script_constants(SCRIPT)
    c["LR"] = c["LR"] or 1e-3  # LR = 0 is the recipe's: the paper's 1e-3 (the bench times the paper recipe)
    X, meta = activations.load_activations()
    x_train, x_test, _, _ = split.split_standardise(X, c["TEST_FRACTION"], seed=0)
    global _DATA
    _DATA = (x_train, x_test)
    N, k0, kmax = x_train.shape[0], c["K"], max(c["KS"])
    print(f"E3 activations: {meta['model']} layer {meta['layer']}, {N} train / {x_test.shape[0]} test x "
          f"{x_train.shape[1]}; d {c['N_LATENTS']}, K {k0}; {args.epochs} epochs per measurement, "
          f"2 single-thread runs at once")
    jobs = []
    for method in METHODS:
        jobs += [(method, "topk", k0, 1.0, 1), (method, "topk", k0, 0.05, 1), (method, "relu", k0, 1.0, 1),
                 (method, "topk", kmax, 1.0, 1)]
    jobs.append(("pam", "topk", k0, 1.0, 3))
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        measured = {key: (n, t) for key, n, t in pool.map(_measure, [j + (args.epochs, c) for j in jobs])}
    for (method, act, k, f, u), (n, t) in measured.items():
        print(f"  {method:>8} {act:<4} K {k:<5} {100 * f:5.0f}% ({n:5d} samples) updates {u}: {t:6.2f} s/epoch")
    print(f"measurements took {time.perf_counter() - t0:.0f} s")

    def epoch_cost(method, act, k, n, u):
        full, small = measured[(method, "topk", k0, 1.0, 1)], measured[(method, "topk", k0, 0.05, 1)]
        per = (full[1] - small[1]) / (full[0] - small[0])
        fixed = full[1] - per * full[0]
        if not activation_spec(act).sparse_k:  # dense codes: costed as the measured ReLU run
            per = (measured[(method, "relu", k0, 1.0, 1)][1] - fixed) / N
        elif k != k0:
            per_max = (measured[(method, "topk", kmax, 1.0, 1)][1] - fixed) / N
            per = per + (per_max - per) * (k - k0) / (kmax - k0)
        if u > 1:  # the encoder part of PAM grows with the updates; measured at u = 3
            per_u = (measured[("pam", "topk", k0, 1.0, 3)][1] - full[1]) / (2 * N)
            return fixed + per * n + per_u * (u - 1) * n
        return fixed + max(per, 0.0) * n

    A = experiment.Ablation
    protocol = experiment.Protocol(  # the script's protocol shape (its plan decides which runs are shared)
        base=dict(n_latents=c["N_LATENTS"], activation=c["ACTIVATION"], k=k0, l1=0.0, epochs=c["EPOCHS"],
                  batch_size=c["BATCH_SIZE"], lr=c["LR"], mu=c["MU"], nu=c["NU"]),
        ablations={"base": experiment.BASE, "updates": A(("updates_per_batch",), c["UPDATES"], methods=("pam",)),
                   "fraction": A(("fraction",), c["FRACTIONS"]),
                   "activation": A(("activation",), c["ACTIVATION_VALUES"],
                                   then=lambda s, a: s.update(penalty(a, c))),
                   "weight_decay": A(("weight_decay",), c["WEIGHT_DECAYS"]), "mu_nu": A(("mu", "nu"), c["MU_NUS"]),
                   "k": A(("k",), c["KS"])},
        ablation_overrides={"epochs": c["ABLATION_EPOCHS"]})
    runs = [r for r in protocol.plan() if r.shared_with is None]
    per_ablation = {}
    for r in runs:
        s = r.settings
        n = max(1, round(s["fraction"] * N))
        cost = s["epochs"] * epoch_cost(r.spec.method, s["activation"], s["k"] or k0, n, s["updates_per_batch"])
        per_ablation[r.spec.ablation] = per_ablation.get(r.spec.ablation, 0.0) + cost
    total = sum(per_ablation.values()) / 2  # two workers
    print(f"plan: {len(protocol.plan())} runs, {len(runs)} to train (the rest shared)")
    for a, t in per_ablation.items():
        print(f"  {a:<13} {t / 2 / 60:6.1f} min")
    print(f"projected full default E3 protocol (one seed): {total / 3600:.1f} h on this machine")


if __name__ == "__main__":
    main()
