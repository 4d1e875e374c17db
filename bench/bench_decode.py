"""Sparse vs dense decoding in a training step: where ``SAE.forward`` switches (SPARSE_DECODE_MAX_DENSITY).

A TopK code has k non-zeros out of d. The dense decoder multiplies the whole (batch, d) code matrix by
the atoms, forward and backward; the sparse one (``F.embedding_bag`` with per-sample weights) touches
only the k atoms of each sample. This times one full Adam step (encoder, TopK, decode, MSE, backward,
step) both ways, with the decoder trained (SGD) and frozen (PAM-SGD's encoder phase), at the MNIST and
the LLM shapes, and prints the ratio. Never fails: it reports.

    .venv/bin/python bench/bench_decode.py [--threads 1] [--steps 20]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.maths.sae import SPARSE_DECODE_MAX_DENSITY  # noqa: E402

SHAPES = [("MNIST", 784, 256, 128, (15,)), ("LLM", 640, 4096, 256, (15, 80, 320, 640, 1024, 1280))]


def step_time(n_features, d, batch, k, decoder_trained, sparse, steps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, n_features, generator=g)
    w_enc = torch.nn.Parameter(0.1 * torch.randn(d, n_features, generator=g))
    b_enc = torch.nn.Parameter(torch.zeros(d))
    w_dec = torch.nn.Parameter(0.01 * torch.randn(d, n_features, generator=g), requires_grad=decoder_trained)
    b_dec = torch.nn.Parameter(torch.zeros(n_features))
    params = [w_enc, b_enc, b_dec] + ([w_dec] if decoder_trained else [])
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)

    def step(xb):
        vals, idx = F.linear(xb, w_enc, b_enc).topk(k, dim=1)
        if sparse:
            recon = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec
        else:
            recon = torch.zeros(xb.shape[0], d).scatter(1, idx, vals) @ w_dec + b_dec
        loss = F.mse_loss(recon, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step(x[:batch])
    t = time.perf_counter()
    for i in range(steps):
        step(x[i * batch:(i + 1) * batch])
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); forward() decodes sparsely when "
          f"k / d <= {SPARSE_DECODE_MAX_DENSITY}")
    for name, n_features, d, batch, ks in SHAPES:
        for k in ks:
            for trained in (True, False):
                dense = step_time(n_features, d, batch, k, trained, False, args.steps)
                sparse = step_time(n_features, d, batch, k, trained, True, args.steps)
                chosen = "sparse" if k <= SPARSE_DECODE_MAX_DENSITY * d else "dense"
                print(f"{name:5s} n {n_features} d {d:5d} k {k:5d} (k/d {k / d:.3f}) decoder "
                      f"{'trained' if trained else 'frozen '}: dense {dense * 1e3:7.2f} ms  sparse "
                      f"{sparse * 1e3:7.2f} ms  sparse/dense {sparse / dense:.2f}  (forward uses {chosen})")


if __name__ == "__main__":
    main()
