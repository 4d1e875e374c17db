"""Benchmark of the loss recovered on the language model (common/maths/lm_eval.py) for the default model.

Times, on TOKENS scored positions of Shakespeare texts (the E3 texts, 128 tokens at most) at E3's default layer:
the once-per-text part (the blocks below the splice, the clean pass, the identity check and both ablations:
``LMEval(...)``) and the per-SAE part (the blocks above the splice and the vocabulary projection for GROUP SAEs
scored together, divided by GROUP). The SAEs are random (their cost does not depend on their training), of E3's
fast-profile size (1024 latents, K 80) unless told otherwise; with no training mean here, the mean ablation is the
zero one. Prints tokens per second and seconds per SAE, the
projected cost of N_SAES SAEs, and saves the figures as JSON. Wall-clock figures depend on other load on the
machine: the load average and the process's CPU seconds are printed with them.

    .venv/bin/python bench/bench_lm_eval.py [--tokens 2048] [--threads 2] [--group 8] [--out results/bench]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.maths import lm_eval  # noqa: E402
from common.infra import extraction, llm_assets  # noqa: E402
from common.maths.sae import SAE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=llm_assets.DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=2048, help="scored positions (held-out tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group", type=int, default=8, help="SAEs scored together (E3 scores this many at once)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts a forward pass")
    parser.add_argument("--chunk", type=int, default=128, help="positions a vocabulary projection")
    parser.add_argument("--n-latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=80)
    parser.add_argument("--n-saes", type=int, default=90, help="SAEs to project the total cost for")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, load average {load:.1f}")

    start = time.perf_counter()
    model, tokenizer = llm_assets.load_model(args.model, args.device)
    t_load = time.perf_counter() - start
    layer = llm_assets.default_layer(len(extraction.blocks_of(model)))
    texts = llm_assets.split_texts(llm_assets.read_text()[0], 10_000, 128)[-200:]  # E3's texts (the corpus's last ones)
    ids, _ = lm_eval.heldout_ids(tokenizer, texts, 128, args.tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    start, cpu = time.perf_counter(), time.process_time()
    ev = lm_eval.LMEval(model, ids, layer, mean=torch.zeros(model.config.get_text_config().hidden_size),
                        batch_size=args.batch_size, chunk=args.chunk, pad_id=pad_id)
    sync()
    t_once, c_once = time.perf_counter() - start, time.process_time() - cpu
    rows = ev.last_rows
    mean, std = rows.mean(0), rows.std(0).clamp(min=1e-8)
    saes = {f"sae{i}": lm_eval.sae_reconstruction(SAE(rows.shape[1], args.n_latents, activation="topk", k=args.k,
                                                      seed=i), mean, std, args.device) for i in range(args.group)}
    start, cpu = time.perf_counter(), time.process_time()
    scores = ev.score(saes)
    sync()
    t_group, c_group = time.perf_counter() - start, time.process_time() - cpu
    per_sae, cpu_per_sae = t_group / args.group, c_group / args.group
    result = {"model": args.model, "layer": layer, "n_layers": len(extraction.blocks_of(model)),
              "tokens": ev.n_tokens, "texts": ev.n_texts, "threads": args.threads, "device": args.device, "group": args.group,
              "batch_size": args.batch_size, "chunk": args.chunk, "n_latents": args.n_latents, "k": args.k,
              "load_seconds": round(t_load, 2), "once_per_text_seconds": round(t_once, 2),
              "once_per_text_tokens_per_second": round(ev.n_tokens / t_once, 1),
              "once_per_text_cpu_seconds": round(c_once, 2), "per_sae_cpu_seconds": round(cpu_per_sae, 3),
              "per_sae_seconds": round(per_sae, 3), "per_sae_tokens_per_second": round(ev.n_tokens / per_sae, 1),
              "n_saes": args.n_saes, "projected_seconds": round(t_load + t_once + args.n_saes * per_sae, 1),
              "baselines": ev.baselines, "random_sae_ce_loss_score": scores["sae0"]["ce_loss_score"],
              "load_average": [load, os.getloadavg()[0]], "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv)}
    print(f"{args.model} layer {layer}: {ev.n_tokens} held-out tokens in {ev.n_texts} texts")
    print(f"load {t_load:.1f} s; once per text (lower blocks, clean pass, both ablations): {t_once:.1f} s "
          f"= {ev.n_tokens / t_once:,.0f} tokens/s ({c_once:.1f} CPU s)")
    print(f"per SAE ({args.group} scored together): {per_sae:.2f} s = {ev.n_tokens / per_sae:,.0f} tokens/s "
          f"({cpu_per_sae:.2f} CPU s)")
    print(f"projected for {args.n_saes} SAEs: {result['projected_seconds']:.0f} s "
          f"(load average now {os.getloadavg()[0]:.1f})")
    print(f"baselines: {json.dumps(ev.baselines)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lm_eval_{args.device.replace(':', '')}_{ev.n_tokens}tok_{args.threads}thr.json"
    path.write_text(json.dumps(result, indent=1))
    print(path)


if __name__ == "__main__":
    main()
