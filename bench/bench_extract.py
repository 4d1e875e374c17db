"""Benchmark of language-model activation extraction (Gemma-3-270M, the E3 offline default).

Prints: load time from the GGUF file vs from the safetensors folder; extraction speed in tokens/s with
and without early exit after the hooked block (float32), and with early exit and bf16 matmuls, on
N_TEXTS texts of MAX_TOKENS tokens; with ``--full``,
the wall time of the default extraction (10,000 texts, last token) into the default cache (instant when
already cached). Figures depend on other load on the machine: the load average is printed with them.

    .venv/bin/python bench/bench_extract.py [--full] [--model gemma-3-270m]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.infra import activations, extraction, llm_assets  # noqa: E402

N_TEXTS = 200
MAX_TOKENS = 128
BATCH_SIZE = 8


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=llm_assets.DEFAULT_MODEL, choices=sorted(llm_assets.GGUF_MODELS))
    parser.add_argument("--full", action="store_true", help="also run the full default extraction and time it")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    llm_assets.fetch_model(args.model)
    with tempfile.TemporaryDirectory() as work:
        gguf = llm_assets.gguf_path(args.model, work)
        _, t_gguf = seconds(lambda: llm_assets.load_gguf(gguf))
    (model, tokenizer), t_cached = seconds(lambda: llm_assets.load_model(args.model))
    print(f"load from GGUF: {t_gguf:.1f} s;  from the safetensors folder: {t_cached:.1f} s")

    n_layers = len(extraction.blocks_of(model))
    layer = llm_assets.default_layer(n_layers)
    texts = llm_assets.split_texts(llm_assets.read_text()[0], N_TEXTS, MAX_TOKENS)
    n_tokens = sum(map(len, tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]))
    speed = {}
    for dtype, early_exit in (("float32", True), ("float32", False), ("bfloat16", True)):
        _, dt = seconds(lambda: extraction.extract(model, tokenizer, texts, layer, batch_size=BATCH_SIZE,
                                                   dtype=dtype, early_exit=early_exit, progress=False))
        speed[dtype, early_exit] = n_tokens / dt
        print(f"extract layer {layer}/{n_layers}, {N_TEXTS} texts, {n_tokens} tokens, batch {BATCH_SIZE}, {dtype}, "
              f"early exit {early_exit}: {dt:.1f} s = {n_tokens / dt:,.0f} tokens/s "
              f"(load average {os.getloadavg()[0]:.1f})")
    print(f"early exit speed-up (float32): x{speed['float32', True] / speed['float32', False]:.2f}")

    if args.full:
        (X, meta), dt = seconds(lambda: activations.load_activations(args.model))
        print(f"full default extraction: {dt / 60:.1f} min (cached={meta['cached']}), X {tuple(X.shape)}, "
              f"layer {meta['layer']}/{meta['n_layers']}, max |x| {meta['max_abs']:,.0f}, "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
