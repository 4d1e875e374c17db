"""Our trainers next to two public SAE libraries, on the same MNIST tensors, scored by the same metric code.

Every row trains a TopK SAE (784 -> 256 latents, K = 15, batch 128, EPOCHS epochs) on the same training
images, in the same mini-batch order, and is scored by ``common.maths.metrics.evaluate`` on the test set:
test MSE, test FVU, L0, dead fraction (latents never non-zero on the test set) and seconds per epoch of
training alone (no evaluation inside the timed part). Rows:

    SAELens   sae-lens TopKTrainingSAE with its defaults, trained by its own SAETrainer.fit (Adam, lr 3e-4)
    sparsify  EleutherAI sparsify SparseCoder, Adam lr 1.6e-3 (its Adam default for 256 latents), in the
              smallest loop that does what its Trainer does (the Trainer itself needs a Hugging Face
              language model to hook: it cannot take in-memory tensors)
    ours      common.maths.train.train, sgd and pam, each with recipe "paper" and recipe "modern"

The peer libraries live in their own venv: `make peers` builds .venv-peers, `make bench-peers` runs this
script there. In the main .venv the peer rows are skipped with a message (exit 0) and our rows still run.
Speed is compared at one thread count for every row (``--threads``, 1 by default); the load average is
printed at the start and the end, since another job on this shared machine skews the timings.

    .venv-peers/bin/python bench/bench_peers.py [--epochs 20] [--n-train N] [--threads 1] [--seed 0]
"""
import os

# No hub at run time (both libraries can reach for it), no wandb, no progress bars (SAELens's fit has one).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.infra.data import load_mnist  # noqa: E402
from common.maths.metrics import evaluate  # noqa: E402
from common.maths.sae import SAE, densify  # noqa: E402
from common.maths.train import TrainConfig, train  # noqa: E402

N_LATENTS, K, BATCH = 256, 15, 128
EPOCHS = 20
PAPER_LR = 3e-3          # the paper's Adam learning rate (E2), what recipe "paper" uses
SAELENS_LR = 3e-4        # SAETrainerConfig's default
SPARSIFY_LR = 2e-4 / (N_LATENTS / 2 ** 14) ** 0.5   # sparsify's Adam default, 2e-4 / sqrt(d / 2^14) = 1.6e-3
SPARSIFY_WARMUP = 1000   # sparsify TrainConfig.lr_warmup_steps (then linear decay to 0 over the run)
MISSING = "not installed: row skipped (run `make peers`, then `make bench-peers` or .venv-peers/bin/python)"


class Skipped(Exception):
    """A peer library is not installed."""


# --- the shared parts: batch order and scoring --------------------------------------------------------
def batch_indices(n: int, epochs: int, seed: int):
    """Mini-batch indices per epoch, exactly as common.maths.train draws them (one generator seeded once,
    one randperm per epoch, the last batch shorter), so every row sees the same batches."""
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        yield [perm[s:s + BATCH] for s in range(0, n, BATCH)]


class AsOurSAE:
    """The part of our SAE interface that ``common.maths.metrics.evaluate`` reads, around a peer model: TopK
    non-zeros (values, latent indices) from the library's encoder, reconstruction from its decoder."""

    is_topk = True

    def __init__(self, n_features, n_latents, encode_sparse, decode_sparse):
        self.n_features, self.n_latents = n_features, n_latents
        self.encode_sparse, self.decode_sparse = encode_sparse, decode_sparse


def row(name, lr, metrics, epoch_times, note=""):
    return {"trainer": name, "lr": lr, "mse": metrics["mse"], "fvu": metrics["fvu"], "l0": metrics["l0"],
            "dead": metrics["dead"], "s_epoch": sum(epoch_times) / len(epoch_times), "note": note}


# --- SAELens ----------------------------------------------------------------------------------------------
def run_saelens(x_train, x_test, epochs, seed):
    """TopKTrainingSAE with every default, trained by SAELens's own SAETrainer on an in-memory iterator.

    Its conventions (sae-lens 6.54): W_enc (d_in, d_sae), W_dec (d_sae, d_in); b_dec (init 0) is subtracted
    from x before encoding (apply_b_dec_to_input); TopK keeps the k largest pre-activations, ReLU'd, after
    scaling them by the atoms' norms (rescale_acts_by_decoder_norm) and divides the codes by those norms
    again in decode; decoder atoms start with norm 0.1 and W_enc = W_dec^T; loss = per-sample squared
    error summed over features, mean over the batch, + AuxK (coefficient 1, latents dead for 1000 steps);
    gradients clipped to norm 1; Adam(0.9, 0.999) at constant lr 3e-4; no renormalisation of atoms.
    """
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as e:
        raise Skipped(f"SAELens (sae-lens) {MISSING} [{e}]") from e
    n, d_in = x_train.shape
    torch.manual_seed(seed)  # the library initialises from the global generator
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=N_LATENTS, k=K, dtype="float32", device="cpu"))
    # lr_end: the trainer asserts it is set; LanguageModelSAERunnerConfig's default is lr / 10 (unused by "constant")
    cfg = SAETrainerConfig(total_training_samples=epochs * n, train_batch_size_samples=BATCH, lr=SAELENS_LR,
                           lr_end=SAELENS_LR / 10)
    # fit() pulls batches until it has seen total_training_samples: exactly `epochs` passes over the data
    data = (x_train.index_select(0, idx) for epoch in batch_indices(n, epochs, seed + 1) for idx in epoch)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae.eval()

    def encode_sparse(x):
        vals, idx = sae.encode(x).topk(K, dim=-1)  # the K selected latents (a ReLU'd one is 0: not counted)
        return vals, idx, None

    adapter = AsOurSAE(d_in, N_LATENTS, encode_sparse, lambda vals, idx: sae.decode(densify(vals, idx, N_LATENTS)))
    return row("SAELens TopKTrainingSAE", SAELENS_LR, evaluate(adapter, x_test), [seconds / epochs],
               note=f"sae-lens {importlib.metadata.version('sae-lens')}, SAETrainer.fit")


# --- EleutherAI sparsify ---------------------------------------------------------------------------------
def run_sparsify(x_train, x_test, epochs, seed):
    """SparseCoder trained by the smallest loop that does what sparsify's Trainer does with
    loss_fn="fvu", optimizer="adam" and its other defaults (sparsify 1.3.3, trainer.py):

    - init: encoder nn.Linear (Kaiming-uniform weights, bias 0), W_dec = W_enc normalised to unit rows,
      b_dec = the mean of the first batch (the Trainer sets it at step 0);
    - every step: atoms renormalised to unit norm, loss = FVU of the batch (sum of squared errors over the
      batch's own total variance), + auxk_alpha * AuxK with auxk_alpha = 0 (the default: no AuxK),
      gradient component parallel to each atom removed, Adam step, scheduler step;
    - Adam (torch.optim.Adam: bitsandbytes is not installed) at 2e-4 / sqrt(d / 2^14) = 1.6e-3, linear
      warm-up over 1000 steps, then linear decay to 0 at the last step (get_linear_schedule_with_warmup).
    The library's own default optimiser, signum (sign-SGD in a schedule-free wrapper, lr 5e-3 / sqrt(d/2^14)
    = 4e-2), diverges on MNIST at these sizes (measured: test FVU 0.37, 0.43, 0.51 after epochs 1-3 on
    10,000 images, rising), so Adam is used, which the library also offers (optimizer="adam").

    Its conventions: encoder.weight (d_sae, d_in), W_dec (d_sae, d_in) (rows are atoms, as ours);
    b_dec is subtracted from x before encoding; the encoder applies ReLU, then keeps the top k.
    """
    try:
        from sparsify import SparseCoder, SparseCoderConfig
        from transformers import get_linear_schedule_with_warmup
    except ImportError as e:
        raise Skipped(f"sparsify (eai-sparsify) {MISSING} [{e}]") from e
    n, d_in = x_train.shape
    torch.manual_seed(seed)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=N_LATENTS, k=K), device="cpu", dtype=torch.float32)
    steps = epochs * -(-n // BATCH)
    opt = torch.optim.Adam(sae.parameters(), lr=SPARSIFY_LR)
    schedule = get_linear_schedule_with_warmup(opt, SPARSIFY_WARMUP, steps)
    epoch_times, first = [], True
    for epoch in batch_indices(n, epochs, seed + 1):
        t0 = time.perf_counter()
        for idx in epoch:
            x = x_train.index_select(0, idx)
            if first:
                sae.b_dec.data = x.mean(0)
                first = False
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x)
            out.fvu.backward()  # + auxk_alpha (0) * out.auxk_loss + out.multi_topk_fvu (0, multi_topk off) / 8
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            schedule.step()
        epoch_times.append(time.perf_counter() - t0)
    sae.set_decoder_norm_to_unit_norm()  # the Trainer renormalises before every forward pass, so also here
    sae.eval()
    adapter = AsOurSAE(d_in, N_LATENTS, sae.encode, sae.decode)
    return row("sparsify SparseCoder", SPARSIFY_LR, evaluate(adapter, x_test), epoch_times,
               note=f"eai-sparsify {importlib.metadata.version('eai-sparsify')}, Trainer's step re-created")


# --- ours -------------------------------------------------------------------------------------------------
def run_ours(method, recipe, x_train, x_test, epochs, seed):
    from common.experiments.recipe import recipe_settings
    s = recipe_settings(recipe, n_latents=N_LATENTS, paper_lr=PAPER_LR)
    model = SAE(x_train.shape[1], N_LATENTS, "topk", K, init=s.pop("init"), seed=seed)
    cfg = TrainConfig(method=method, epochs=epochs, batch_size=BATCH, **s)
    history = train(model, x_train, x_test, cfg, seed=seed + 1, progress=False)
    last = history[-1]
    metrics = {m: last[f"test_{m}"] for m in ("mse", "fvu", "l0", "dead")}
    return row(f"ours {method}, recipe {recipe}", cfg.lr, metrics, [h["epoch_time"] for h in history[1:]],
               note="common.maths.train.train")


# --- the table --------------------------------------------------------------------------------------------
def print_table(rows):
    head = f"{'trainer':<30} {'lr':>8} {'test MSE':>9} {'test FVU':>9} {'L0':>6} {'dead':>6} {'s/epoch':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['trainer']:<30} {r['error']}")
            continue
        print(f"{r['trainer']:<30} {r['lr']:>8.2g} {r['mse']:>9.4f} {r['fvu']:>9.4f} {r['l0']:>6.2f} "
              f"{r['dead']:>6.3f} {r['s_epoch']:>8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--n-train", type=int, default=0, help="train on a random subset of this size (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every row")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation; the batch order uses seed + 1")
    args = ap.parse_args()
    if args.epochs < 1 or args.threads < 1 or args.n_train < 0:
        ap.error("--epochs and --threads must be >= 1, --n-train >= 0")
    torch.set_num_threads(args.threads)
    x_train, _, x_test, _ = load_mnist()
    if args.n_train and args.n_train < len(x_train):
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:args.n_train]
        x_train = x_train[pick.sort().values]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); MNIST {len(x_train)} train / "
          f"{len(x_test)} test; d {N_LATENTS}, K {K}, batch {BATCH}, {args.epochs} epochs, seed {args.seed}")
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    t_start = time.perf_counter()

    runs = [("SAELens TopKTrainingSAE", lambda: run_saelens(x_train, x_test, args.epochs, args.seed)),
            ("sparsify SparseCoder", lambda: run_sparsify(x_train, x_test, args.epochs, args.seed))]
    for recipe in ("paper", "modern"):
        for method in ("sgd", "pam"):
            runs.append((f"ours {method}, recipe {recipe}",
                         lambda m=method, r=recipe: run_ours(m, r, x_train, x_test, args.epochs, args.seed)))
    rows, failed = [], False
    for name, run in runs:
        print(f"... {name}", flush=True)
        try:
            rows.append(run())
        except Skipped as e:
            print(f"    {e}")
            rows.append({"trainer": name, "error": "skipped: not installed (make peers)"})
        except Exception as e:  # report and go on with the other rows; the exit code says it failed
            traceback.print_exc()
            rows.append({"trainer": name, "error": f"FAILED: {type(e).__name__}: {e}"})
            failed = True
    print()
    print_table(rows)
    for r in rows:
        if r.get("note"):
            print(f"  {r['trainer']}: {r['note']}")
    print("Every row: same training images and batch order, scored by common.maths.metrics.evaluate on the test set "
          "(FVU against the test set's own mean; dead = never non-zero on the test set); s/epoch = training "
          "only (PAM: encoder pass + statistics + solve).")
    print(f"wall time {time.perf_counter() - t_start:.0f} s; load average at end: "
          + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
