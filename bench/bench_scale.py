"""Scale: tokens/s of SGD and PAM-SGD at LLM sizes, one process and torchrun ranks, and memory and epoch time
when the activations are streamed from a folder of shards (issue 15). Prints its figures; never fails on a
target (it reports).

1. Throughput at n_features 2304, n_latents 16384, K 64 (TopK, batch 4096), on ``--tokens`` random tokens
   (default 8192: one epoch is two batches, so that both runs finish in a few minutes on 2 cores; the
   decoder solve does not depend on the number of tokens, so PAM's epoch rate at real sizes follows from the
   per-token rates and the solve's seconds below). One epoch of ``train`` each; PAM's epoch is split into
   the encoder phase, the decoder statistics (``collect_stats``), their all-reduce (``sum_stats``) and the
   rest of the solve (the d x d system, the objective before and after), timed by wrapping those functions.
   Run as one process (torch's threads: all cores) and as
   ``torchrun --nproc_per_node=2`` (gloo, one thread per rank), each rank taking half of every global batch.
2. Streaming: ``--gib`` GiB of float32 activations (n_features 2304) written as a folder of shards under
   ``--tmp`` and deleted afterwards; one PAM epoch (n_latents ``--latents``, K ``--k``) on its 90/10 split,
   (a) in memory (the split views read into tensors), (b) streamed through memory maps with the default
   shuffle buffers (two of 128 MiB), (c) a model-only baseline: the same epoch on 4096 random rows made in memory (the folder never opened). Each in its
   own process; peak resident memory is the process's VmHWM (memory-mapped pages included while mapped).
   The shards were just written, so they are read from the page cache, not from the disk.

    .venv/bin/python bench/bench_scale.py [--tokens 8192] [--nprocs 1,2] [--gib 3] [--latents 512] [--k 32] [--repeats 1]
                                          [--skip-throughput] [--skip-streaming]
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.infra import distributed as dist  # noqa: E402
from common.infra import shards as SH  # noqa: E402
from common.infra import split  # noqa: E402
from common.infra import stream as S  # noqa: E402
from common.maths import train as T  # noqa: E402
from common.maths.sae import SAE  # noqa: E402

# estimated multiply-add work of one token in one SGD step (and in PAM's encoder phase): the dense encoder's forward
# and weight gradient (2 x 2 n d FLOPs) and the TopK decoder's forward and backward through K atoms (3 x 2 K n)
FLOPS_PER_TOKEN = lambda n, d, k: 4 * n * d + 6 * k * n  # noqa: E731

N_FEATURES, N_LATENTS, K, BATCH = 2304, 16384, 64, 4096


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(module, name, sink, device=torch.device("cpu")):
    """Wrap module.name so that its seconds add up in sink[name] (the device's queued work waited for on both sides);
    returns the function that unwraps it."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        synchronize(device)
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            synchronize(device)
            sink[name] = sink.get(name, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
    return lambda: setattr(module, name, real)


# ------------------------------------------------------------------------------------------- throughput
def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on ``device`` (the best of 3 after a warm-up; 8192 on a GPU, 2048 on the cpu)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def throughput_worker(tokens: int, device: str) -> None:
    """One rank (or the only process): one SGD epoch and one PAM epoch on the same global tokens."""
    dist.init(backend=None if device.startswith("cuda") else "gloo")  # nccl for CUDA tensors
    dev = T.resolve_device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens + 256, N_FEATURES, generator=g)
    x_train, x_test = x[:tokens], x[tokens:]
    out = {"world": dist.world(), "threads": torch.get_num_threads(), "tokens": tokens, "device": str(dev),
           "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "matmul_flops": {"float32": matmul_rate(dev, torch.float32), "float64": matmul_rate(dev, torch.float64)}}
    for method in ("sgd", "pam"):
        sink = {}
        unwrap = [timed(T, "collect_stats", sink, dev), timed(T.dist, "sum_stats", sink, dev),
                  timed(T, "_solve", sink, dev)]
        model = SAE(N_FEATURES, N_LATENTS, "topk", K, seed=1, init="transpose_unit").to(dev)
        cfg = T.TrainConfig(method=method, epochs=1, batch_size=BATCH, lr=1e-4, solve_batch=BATCH, eval_batch=BATCH)
        hist = T.train(model, x_train, x_test, cfg, seed=2, progress=False)
        epoch = hist[-1]["epoch_time"]
        row = {"epoch_s": epoch, "tokens_per_s": tokens / epoch}
        flops = tokens * FLOPS_PER_TOKEN(N_FEATURES, N_LATENTS, K) / dist.world()  # this rank's share
        if method == "sgd":
            row["matmul_fraction"] = flops / epoch / out["matmul_flops"]["float32"]
        if method == "pam":
            enc = epoch - sink["_solve"]
            row["matmul_fraction"] = flops / enc / out["matmul_flops"]["float32"]
            row.update(encoder_s=enc, encoder_tokens_per_s=tokens / enc, stats_s=sink["collect_stats"],
                       stats_tokens_per_s=tokens / sink["collect_stats"], allreduce_s=sink["sum_stats"],
                       solve_s=sink["_solve"] - sink["collect_stats"] - sink["sum_stats"])
        out[method] = row
        for f in unwrap:
            f()
    out["peak_rss_gib"] = peak_rss_gib()
    if dist.is_main():
        print("RESULT " + json.dumps(out), flush=True)
    dist.finish()
    sys.stdout.flush()
    os._exit(0)  # as tests/dist_worker.py: gloo sometimes aborts in static destructors at exit


def run_throughput(tokens: int, nproc: int, device: str) -> dict:
    env = dict(os.environ)
    if nproc == 1:
        cmd = [sys.executable, "-X", "faulthandler", __file__, "--worker", "throughput", "--tokens", str(tokens),
               "--device", device]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(OMP_NUM_THREADS="1", SPLINTERP_DIST_TIMEOUT="900")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port}", __file__, "--worker", "throughput", "--tokens", str(tokens), "--device", device]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit status {res.returncode}: " + (res.stderr or res.stdout)[-2000:]}


# -------------------------------------------------------------------------------------------- streaming
def epoch_worker(mode: str, folder: str, latents: int, k: int, device: str) -> None:
    """One PAM epoch on the folder's 90/10 split: in memory, streamed, or the model-only baseline."""
    open_s = split_s = 0.0
    if mode == "baseline":  # the folder is never opened: 4096 + 512 rows made in memory
        x = torch.randn(4096 + 512, N_FEATURES, generator=torch.Generator().manual_seed(0))
        x_train, x_test = x[:4096], x[4096:]
    else:
        t0 = time.perf_counter()
        stream = S.Stream.open(folder)
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        x_train, x_test, _, _ = split.split_standardise(stream, 0.1, seed=0)
        split_s = time.perf_counter() - t0
    if mode == "memory":
        x_train, x_test = x_train.materialise(), x_test.materialise()
    model = SAE(N_FEATURES, latents, "topk", k, seed=1, init="transpose_unit").to(T.resolve_device(device))
    cfg = T.TrainConfig(method="pam", epochs=1, batch_size=BATCH, lr=1e-4, solve_batch=BATCH, eval_batch=BATCH)
    t0 = time.perf_counter()
    hist = T.train(model, x_train, x_test, cfg, seed=2, progress=False)
    print("RESULT " + json.dumps({"mode": mode, "rows": len(x_train), "open_s": open_s, "split_s": split_s,
                                  "epoch_s": hist[-1]["epoch_time"], "train_s": time.perf_counter() - t0,
                                  "peak_rss_gib": peak_rss_gib()}), flush=True)


def run_epoch(mode, folder, latents, k, device) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", "epoch", "--mode", mode, "--folder", str(folder),
                          "--latents", str(latents), "--k", str(k), "--device", device], capture_output=True, text=True,
                         cwd=ROOT)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"mode": mode, "error": f"exit status {res.returncode}: " + res.stderr[-2000:]}


def write_set(folder: Path, gib: float, shard_rows: int = 32768) -> tuple[int, float]:
    """Random activations with per-feature scales and offsets, written shard by shard (never all in memory)."""
    rows = int(gib * 2 ** 30 / (4 * N_FEATURES))
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.rand(N_FEATURES, generator=g) * 3 + 0.1, torch.randn(N_FEATURES, generator=g)
    writer = SH.ShardWriter(folder, shard_rows)
    t = time.perf_counter()
    for start in range(0, rows, shard_rows):
        writer.write(torch.randn(min(shard_rows, rows - start), N_FEATURES, generator=g) * scale + shift)
    writer.close()
    return rows, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (train's devices; torchrun ranks: "
                   "each its own GPU)")
    p.add_argument("--gib", type=float, default=3.0)
    p.add_argument("--latents", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="in-memory and streamed epochs, alternating")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--nprocs", default="1,2", help="process counts of the throughput runs")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-streaming", action="store_true")
    p.add_argument("--worker", choices=["throughput", "epoch"])
    p.add_argument("--mode", choices=["memory", "stream", "baseline"])
    p.add_argument("--folder")
    args = p.parse_args()
    if args.worker == "throughput":
        return throughput_worker(args.tokens, args.device)
    if args.worker == "epoch":
        return epoch_worker(args.mode, args.folder, args.latents, args.k, args.device)

    if not T.device_available(args.device):
        p.error(f"--device={args.device}: expected cpu, auto, cuda or cuda:N with that device present")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, device {args.device}; load: {os.getloadavg()}")
    if not args.skip_throughput:
        print(f"\n== throughput: n_features {N_FEATURES}, n_latents {N_LATENTS}, K {K}, batch {BATCH}, "
              f"{args.tokens} tokens, one epoch")
        for nproc in (int(v) for v in args.nprocs.split(",")):
            r = run_throughput(args.tokens, nproc, args.device)
            if "error" in r:
                print(f"{nproc} process(es): failed: {r['error']}")
                continue
            s, m = r["sgd"], r["pam"]
            print(f"{nproc} process(es) ({r['threads']} thread(s) each): SGD {s['tokens_per_s']:.0f} tokens/s "
                  f"(epoch {s['epoch_s']:.1f} s); PAM epoch {m['epoch_s']:.1f} s = encoder phase {m['encoder_s']:.1f} s "
                  f"({m['encoder_tokens_per_s']:.0f} tokens/s) + statistics {m['stats_s']:.1f} s "
                  f"({m['stats_tokens_per_s']:.0f} tokens/s) + all-reduce {m['allreduce_s']:.2f} s + solve "
                  f"{m['solve_s']:.1f} s; peak RSS (rank 0) {r['peak_rss_gib']:.2f} GiB")
            rate = r["matmul_flops"]
            print(f"  on {r['name']} ({r['device']}): matmul {rate['float32'] / 1e12:.2f} TFLOP/s float32, "
                  f"{rate['float64'] / 1e12:.2f} float64; SGD epoch at {100 * s['matmul_fraction']:.1f}% and PAM's encoder "
                  f"phase at {100 * m['matmul_fraction']:.1f}% of the float32 rate (estimated FLOPs); PAM epoch / SGD "
                  f"epoch = {m['epoch_s'] / s['epoch_s']:.2f} (target on a GPU: <= 1.5)")
    if args.skip_streaming:
        return
    work = Path(tempfile.mkdtemp(prefix="bench_scale.", dir=args.tmp))
    try:
        rows, write_s = write_set(work / "shards", args.gib)
        size = sum(f.stat().st_size for f in (work / "shards").glob("*.npy")) / 2 ** 30
        print(f"\n== streaming: {rows} rows x {N_FEATURES} float32 = {size:.2f} GiB in "
              f"{len(list((work / 'shards').glob('*.npy')))} shards under {work} (written in {write_s:.0f} s); "
              f"PAM, n_latents {args.latents}, K {args.k}, batch {BATCH}, one epoch on the 90% split")
        # memory and stream alternate (--repeats times), so that a change in the machine's load hits both
        runs = [("baseline", run_epoch("baseline", work / "shards", args.latents, args.k, args.device))]
        for rep in range(args.repeats):
            for mode in (("memory", "stream") if rep % 2 == 0 else ("stream", "memory")):
                runs.append((mode, run_epoch(mode, work / "shards", args.latents, args.k, args.device)))
                print(f"  {mode} done, load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode, r in runs:
        if "error" in r:
            print(f"{mode}: failed: {r['error']}")
        else:
            print(f"{mode:8s}: {r['rows']} training rows, epoch {r['epoch_s']:.1f} s (train() {r['train_s']:.1f} s with "
                  f"evaluation), open {r['open_s']:.1f} s, split + statistics {r['split_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    if all("error" not in r for _, r in runs):
        def best(mode):  # the fastest epoch of the mode, and its largest peak RSS
            rs = [r for m, r in runs if m == mode]
            return {"epoch_s": min(r["epoch_s"] for r in rs), "peak_rss_gib": max(r["peak_rss_gib"] for r in rs)}
        base, mem, st = runs[0][1]["peak_rss_gib"], best("memory"), best("stream")
        slower = st["epoch_s"] / mem["epoch_s"] - 1
        grow = (st["peak_rss_gib"] - base) / size
        print(f"streamed epoch vs in memory (fastest of {args.repeats} each): {100 * slower:+.1f}% "
              f"(target <= +15%: {'met' if slower <= 0.15 else 'missed'})")
        print(f"streamed peak RSS over the model-only baseline: {st['peak_rss_gib'] - base:.2f} GiB = {100 * grow:.1f}% "
              f"of the data's {size:.2f} GiB (target < 25%: {'met' if grow < 0.25 else 'missed'}); in memory: "
              f"{mem['peak_rss_gib'] - base:.2f} GiB = {100 * (mem['peak_rss_gib'] - base) / size:.0f}%")


if __name__ == "__main__":
    main()
