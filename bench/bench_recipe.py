"""What each element of the modern TopK recipe does, measured on a validation split (never the test set).

MNIST, d 256, K 15, batch 128, 20 epochs; 10% of the training images held out as validation (the same
split as E2's --TUNE). Rows: the paper's recipe, the modern recipe, and the modern recipe with one element
switched back to the paper's (or, for unit-norm atoms, switched on); then the AuxK window and coefficient. Columns: validation MSE, FVU, dead
fraction (latents never firing on the validation images), seconds per epoch, for sgd and pam.

    .venv/bin/python bench/bench_recipe.py                 # ~15 min on 2 cores (2 runs at once)
    .venv/bin/python bench/bench_recipe.py --epochs 3 --n-train 5000   # a quick look
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.experiments.experiment import DEFAULTS, Run, RunSpec, train_runs  # noqa: E402
from common.experiments.recipe import recipe_settings  # noqa: E402
from common.experiments.tuning import validation_split  # noqa: E402
from common.infra.data import load_mnist  # noqa: E402
from common.infra.outputs import derive_seed, write_text  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--n-train", type=int, default=0, help="0: all 60,000 training images")
parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="results/bench_recipe")
args = parser.parse_args()

N_LATENTS, K = 256, 15
paper = recipe_settings("paper", N_LATENTS, paper_lr=3e-3)
modern = recipe_settings("modern", N_LATENTS, paper_lr=3e-3)
# one element back to the paper's at a time (the centre goes with b_dec's initialisation)
VARIANTS = {
    "paper": paper,
    "modern": modern,
    "modern, paper init": dict(modern, init="paper"),
    "modern, b_dec 0, no centring": dict(modern, b_dec_init="zero", centre_input=False),
    "modern, geometric-median b_dec": dict(modern, b_dec_init="median"),
    "modern + unit-norm atoms (sparsify)": dict(modern, unit_norm_atoms=True),
    "modern, no AuxK": dict(modern, aux_k=0),
    "modern, dead atoms not kept": dict(modern, keep_dead_atoms=False),
    "modern, paper lr 3e-3": dict(modern, lr=3e-3),
    "modern, constant lr": dict(modern, lr_schedule="constant"),
    # the AuxK window (dead = not fired in this many training samples; 0 = one epoch) and coefficient
    "modern, AuxK window 1 epoch, coef 1/32": dict(modern, dead_after=0, aux_coef=1 / 32),
    "modern, AuxK window 12800, coef 1/32": dict(modern, dead_after=12800, aux_coef=1 / 32),
    "modern, AuxK window 1 epoch, coef 1/8": dict(modern, dead_after=0, aux_coef=1 / 8),
    "modern, AuxK window 12800, coef 1/8": dict(modern, dead_after=12800, aux_coef=1 / 8),
}
METHODS = ("sgd", "pam")
ELEMENT_OF = {"modern + unit-norm atoms (sparsify)": "pam", "modern, dead atoms not kept": "sgd"}  # no effect there

x_train, _, _, _ = load_mnist()
if args.n_train:
    x_train = x_train[:args.n_train]
fit, val = validation_split(x_train.shape[0], 0.1, derive_seed(args.seed, "validation"))
x_fit, x_val = x_train[fit], x_train[val]

runs, same = [], {}  # same: (variant, method) -> the id of the run with identical settings (trained once)
for name, settings in VARIANTS.items():
    for method in METHODS:
        if ELEMENT_OF.get(name) == method:
            continue
        s = dict(DEFAULTS, **settings, n_latents=N_LATENTS, activation="topk", k=K, epochs=args.epochs,
                 batch_size=128)
        key = json.dumps([method, sorted(s.items())], default=str)
        first = next((r for r in runs if r.key == key), None)
        if first is None:
            first = Run(RunSpec(method, "recipe", name, 0), s, key)
            runs.append(first)
        same[(name, method)] = first.spec.id

print(f"load average at start: {os.getloadavg()}; {len(runs)} runs, {args.workers} at once, "
      f"{x_fit.shape[0]} fit / {x_val.shape[0]} validation images")
t0 = time.perf_counter()
done, histories, _ = train_runs(runs, x_fit, x_val, Path(args.out), args.seed, progress=False, keep_models=None,
                                workers=args.workers)
lines = [f"# The modern recipe, element by element (MNIST d {N_LATENTS}, K {K}, {args.epochs} epochs, "
         f"validation split: {x_val.shape[0]} images; one seed)", "",
         "| variant | " + " | ".join(f"{m} val MSE | {m} val FVU | {m} dead | {m} s/epoch" for m in METHODS) + " |",
         "|---" * (1 + 4 * len(METHODS)) + "|"]
for name in VARIANTS:
    cells = []
    for method in METHODS:
        row = done.get(same.get((name, method)))
        if row is None:
            cells.append("– | – | – | –")
        else:
            cells.append(f"{row['test_mse']:.4f} | {row['test_fvu']:.4f} | {100 * row['dead']:.1f}% | "
                         f"{row['train_time'] / args.epochs:.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
lines += ["", f"wall time {time.perf_counter() - t0:.0f} s; load average at end: {os.getloadavg()}"]
text = "\n".join(lines)
write_text(Path(args.out) / "table.md", text + "\n")
print(text)
