"""Throughput under load: quiet vs one competing single-thread process, side by side in one run.

Two workloads, each timed quiet and then with a competitor (a busy Python loop in another process):
- extraction (tokens/s, the default model, 96 texts): 2 fixed threads vs threads following the free cores
  (common/infra/cpu.py, what ``common.infra.extraction.extract`` does);
- MNIST SGD training (epochs/s, d 256, K 15): one run on 2 threads vs the scripts' mode, two single-thread
  runs at once (WORKERS = 2).
Prints each throughput and its ratio to the quiet one; target: >= 40% of quiet with one competitor.

    .venv/bin/python bench/bench_load.py [--skip-extract]
"""
import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.infra.data import load_mnist  # noqa: E402
from common.maths.sae import SAE  # noqa: E402
from common.maths.train import TrainConfig, train  # noqa: E402


def competitor(stop):
    while not stop.is_set():
        sum(range(10000))


def with_competitor(fn):
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    proc = ctx.Process(target=competitor, args=(stop,))
    proc.start()
    time.sleep(1.0)
    try:
        return fn()
    finally:
        stop.set()
        proc.join()


def extraction(adapt):
    from common.infra import extraction, llm_assets
    torch.set_num_threads(2)
    model, tokenizer = llm_assets.load_model(llm_assets.DEFAULT_MODEL)
    layer = llm_assets.default_layer(llm_assets.n_layers_of(llm_assets.DEFAULT_MODEL))
    corpus, _ = llm_assets.read_text()
    texts = llm_assets.split_texts(corpus, 96, 128)
    extraction.extract(model, tokenizer, texts[:8], layer, progress=False, adapt_threads=False)  # warm-up
    t0 = time.perf_counter()
    extraction.extract(model, tokenizer, texts, layer, progress=False, adapt_threads=adapt)
    n_tokens = sum(len(r) for r in tokenizer(texts, truncation=True, max_length=128)["input_ids"])
    return n_tokens / (time.perf_counter() - t0)


_X = ()


def _train_one(seed, epochs=2):
    x_train, x_test = _X
    model = SAE(784, 256, "topk", 15, seed=seed)
    hist = train(model, x_train, x_test, TrainConfig(method="sgd", epochs=epochs, lr=3e-3), seed=seed, progress=False)
    return sum(h["epoch_time"] for h in hist[1:])


def _worker(seed):
    torch.set_num_threads(1)
    return _train_one(seed)


def training(mode):
    """Epochs per second: one 2-thread run, or two single-thread runs at once (their epochs added)."""
    if mode == "one run, 2 threads":
        torch.set_num_threads(2)
        return 2 / _train_one(0)
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_worker, [0, 1])
        return 4 / (time.perf_counter() - t0)


def main():
    global _X
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} cores")
    x_train, _, x_test, _ = load_mnist()
    _X = (x_train[:20000], x_test[:2000])
    rows = []
    for mode in ("one run, 2 threads", "two 1-thread runs (WORKERS=2)"):
        quiet = training(mode)
        loaded = with_competitor(lambda: training(mode))
        rows.append((f"training, {mode}", "epochs/s", quiet, loaded))
    if not args.skip_extract:
        for adapt in (False, True):
            quiet = extraction(adapt)
            loaded = with_competitor(lambda: extraction(adapt))
            rows.append((f"extraction, {'threads follow free cores' if adapt else '2 fixed threads'}", "tokens/s",
                         quiet, loaded))
    print(f"\n{'workload':<48} {'unit':>9} {'quiet':>9} {'loaded':>9} {'ratio':>7}")
    for name, unit, quiet, loaded in rows:
        print(f"{name:<48} {unit:>9} {quiet:>9.2f} {loaded:>9.2f} {loaded / quiet:>6.0%}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
