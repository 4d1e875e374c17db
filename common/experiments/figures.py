"""The figures of a protocol (E2, E3, E4): per ablation, bars of the final numbers and the test-MSE curves;
the base runs' curves by epoch and by training time; the latent activations of a few samples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..infra.stream import Stream
from ..maths.train import METHODS
from .experiment import RunSpec
from .report import aggregate, evaluated


METHOD_CMAPS = ("Blues", "Oranges", "Greens")  # matches matplotlib's first three cycle colours (the bars)


def ablation_figures(rows: list[dict], histories: dict, out: Path, label: str) -> list[Path]:
    """Per ablation: bars of final test MSE, test FVU (1 = the mean's error: above it a model is
    uninformative) and dead fraction by value and method, and the test-MSE curves of seed 0."""
    import matplotlib.pyplot as plt

    from .plotting import curves, grouped_bars, save

    out = Path(out)
    agg = {m: aggregate(rows, m) for m in ("test_mse", "test_fvu", "dead")}
    paths = []
    for ablation in dict.fromkeys(r["ablation"] for r in rows):
        values = list(dict.fromkeys(r["value"] for r in rows if r["ablation"] == ablation))
        methods = [m for m in METHODS if any((ablation, v, m) in agg["test_mse"] for v in values)]
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        numbers = {"ablation": ablation, "values": values}
        for ax, metric, ylabel, logy in ((axes[0, 0], "test_mse", "final test MSE", True),
                                         (axes[0, 1], "test_fvu", "final test FVU", True),
                                         (axes[1, 0], "dead", "dead fraction (test)", False)):
            series = {m: [agg[metric].get((ablation, v, m), (np.nan,))[0] for v in values] for m in methods}
            errs = {m: [agg[metric].get((ablation, v, m), (0, 0))[1] for v in values] for m in methods}
            grouped_bars(ax, values, series, ylabel, ylabel, errors=errs, logy=logy)
            ax.set_xlabel(ablation)
            if metric == "test_fvu":
                ax.axhline(1.0, color="k", lw=0.8, ls="--", label="FVU 1: uninformative")
                ax.legend(fontsize=8)
            numbers[f"mean_{metric}"] = {m: [v if np.isfinite(v) else None for v in vals] for m, vals in series.items()}
            numbers[f"std_{metric}"] = errs
        lines, colors = {}, {}
        for r in rows:
            if r["ablation"] != ablation or r["replicate"] != 0:
                continue
            h = histories[RunSpec(r["method"], ablation, r["value"], 0, r.get("budget", 0)).id]
            tag = r["method"] if ablation == "base" else f"{r['method']} {r['value']}"
            lines[tag] = evaluated(h, "test_mse")
            # the bars' colour family per method (blue, orange, green), darker for later values
            shade = 0.45 + 0.5 * values.index(r["value"]) / max(len(values) - 1, 1)
            colors[tag] = plt.get_cmap(METHOD_CMAPS[METHODS.index(r["method"])])(shade)
        curves(axes[1, 1], lines, "epoch", "test MSE", "test MSE curves (seed 0)", logy=True, colors=colors)
        if len(lines) > 8:
            axes[1, 1].legend(fontsize=6, ncol=2)
        numbers["curves"] = {k: {"epoch": v[0], "test_mse": v[1]} for k, v in lines.items()}
        fig.suptitle(f"{label}: {ablation}")
        fig.tight_layout()
        paths.append(save(fig, out / f"ablation_{ablation}.png", numbers))
    return paths


def base_curves(histories: dict, out: Path, label: str, rep: int = 0, budget: int = 0) -> Path:
    """Train and test MSE per epoch of the base runs."""
    import matplotlib.pyplot as plt

    from .plotting import curves, save

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    numbers = {}
    for i, split in enumerate(("train", "test")):
        series = {}
        for m in METHODS:
            h = histories.get(RunSpec(m, "base", "-", rep, budget).id)
            if h:
                series[m] = evaluated(h, f"{split}_mse")
        curves(axes[i], series, "epoch", f"{split} MSE", f"{split} MSE (equal epochs)", logy=True)
        numbers[split] = {k: {"epoch": v[0], "mse": v[1]} for k, v in series.items()}
    # equal wall-clock view: test MSE against cumulative training seconds (evaluation excluded)
    series = {}
    for m in METHODS:
        h = histories.get(RunSpec(m, "base", "-", rep, budget).id)
        if h:
            series[m] = evaluated(h, "test_mse", np.cumsum([e["epoch_time"] for e in h]).tolist())
    curves(axes[2], series, "training time (s)", "test MSE", "test MSE (equal wall clock)", logy=True)
    fig.suptitle(label)
    fig.tight_layout()
    numbers["test_vs_seconds"] = {k: {"seconds": v[0], "mse": v[1]} for k, v in series.items()}
    return save(fig, Path(out) / "curves_base.png", numbers)


def stem_plots(models: dict, x: torch.Tensor, out: Path, label: str, n_samples: int = 3) -> Path:
    """Latent activations of a few fixed samples per method, with the count of active latents."""
    import matplotlib.pyplot as plt

    from .plotting import save

    methods = list(models)
    fig, axes = plt.subplots(len(methods), n_samples, figsize=(4 * n_samples, 2.2 * len(methods)), squeeze=False)
    numbers = {}
    with torch.no_grad():
        for i, name in enumerate(methods):
            rows = x[:n_samples]
            codes = models[name](rows.materialise() if isinstance(rows, Stream) else rows)[1].numpy()
            numbers[name] = {"active": [int((c != 0).sum()) for c in codes], "codes": codes.tolist()}
            for j in range(n_samples):
                ax = axes[i, j]
                nz = np.flatnonzero(codes[j])
                if len(nz):
                    ax.stem(nz, codes[j][nz], markerfmt=".", basefmt=" ")
                ax.axhline(0, color="0.6", lw=0.5)
                ax.set_xlim(-1, codes.shape[1])
                ax.set_title(f"{name}, sample {j}: {len(nz)} active", fontsize=8)
                ax.set_xlabel("latent", fontsize=7)
                ax.tick_params(labelsize=6)
    fig.suptitle(f"{label}: latent activations")
    fig.tight_layout()
    return save(fig, Path(out) / "latent_stems.png", numbers)
