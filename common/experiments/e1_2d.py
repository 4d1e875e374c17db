"""E1 on the 2-D toy data (exp_e1_between_kmeans_and_pca_k_1.py, _k_3.py, _k_3hard.py): the E1 SAE (``e1``) against
k-means and k-means + local PCA, drawn as partitions of the plane.


A script's constants become an ``E1Settings`` (``E1Settings.from_constants``; the rules each constant must
meet are ``ACCEPT``, which the scripts declare and the settings check again), and ``run_e1`` tells the
story one step at a time:

    data_and_grid        the toy points and the raster the partitions are drawn on
    kmeans_baselines     k-means, and k-means + local PCA (rank 1, and the SAE's rank min(K, 2))
    train_sae            the SAE trained as configured, and its exact TopK model
    exact_cells          the exact model's order-K power cells, local PCA on them
    summarise            every MSE and count (partitions.json)
    plot_partitions, plot_evolution, plot_training      the three figures
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap

from ..infra.data import grid, toy_e1
from ..maths import geometry as G
from ..maths.sae import SAE
from . import plotting
from .config import above, at_least, boolean, box, check_constants, each, in_range, one_of, satisfies
from .e1 import (INITS, MODES, Diverged, check_converged, e1_forward, exact_model, hard_limit_recon, init_sae,
                 kmeans_fit, partition, train_e1)

ACCEPT = {  # what each E1 constant accepts: the scripts' ACCEPT (checked by configure()) and E1Settings'
    "N_POINTS": at_least("N_CLUSTERS"),
    "DATA_SEED": at_least(0),
    "N_CLUSTERS": at_least(1),
    "N_LATENTS": at_least(1) & satisfies(lambda n, c: c["INIT"] != "kmeans" or n >= c["N_CLUSTERS"],
                                         "at least --N_CLUSTERS (= {N_CLUSTERS}) with --INIT=kmeans"),
    "K": in_range(1, "N_LATENTS"),
    "MODE": one_of(*MODES),
    "TEMPERATURE": above(0),
    "UNIT_NORM": boolean(),
    "DEC_BIAS": boolean(),
    "INIT": one_of(*INITS),
    "BIAS_INIT_SCALE": at_least(0),
    "DEC_INIT_SCALE": above(0),
    "LR": above(0),
    "STEPS": at_least(1),
    "SNAPSHOT_FRACTIONS": each(in_range(0, 1)),
    "BOX": box("x", "y"),
    "GRID_RES": at_least(2),
    "SEED": at_least(0),
}
# a script without TEMPERATURE trains the exact TopK model only
ACCEPT_EXACT = {name: rule for name, rule in ACCEPT.items() if name != "TEMPERATURE"} | {
    "MODE": satisfies(lambda m, c: m == "topk", "topk (softmax and softmax_topk need a TEMPERATURE: "
                                                "exp_e1_between_kmeans_and_pca_k_3.py)")}
RUN_CONSTANTS = ("SEED",)  # read by configure(): the base seed of run.seed_for, not an E1 setting


@dataclass(frozen=True)
class E1Settings:
    """The settings of one E1 run: the E1 scripts' constants in lower case (see their comments).

    ``temperature`` is required by the softmax modes and unused by ``topk``. Checked on creation against
    ``ACCEPT`` (``ACCEPT_EXACT`` without a temperature); a bad value raises ``ConfigError`` (a ValueError)."""
    n_points: int
    data_seed: int
    n_clusters: int
    n_latents: int
    k: int
    mode: str
    unit_norm: bool
    dec_bias: bool
    init: str
    bias_init_scale: float
    dec_init_scale: float
    lr: float
    steps: int
    snapshot_fractions: tuple
    box: tuple
    grid_res: int
    temperature: float | None = None

    def __post_init__(self):
        for name in ("snapshot_fractions", "box"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        constants = {f.name.upper(): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        check_constants(constants, ACCEPT if self.temperature is not None else ACCEPT_EXACT)

    @classmethod
    def from_constants(cls, constants: dict) -> "E1Settings":
        """From a script's constants (``run.values``); refuses unknown names and missing required ones."""
        own = {f.name.upper(): f for f in fields(cls)}
        unknown = sorted(set(constants) - set(own) - set(RUN_CONSTANTS))
        missing = sorted(n for n, f in own.items() if f.default is MISSING and n not in constants)
        if unknown or missing:
            raise ValueError(f"E1 constants: unknown {unknown}, missing {missing}; "
                             f"known: {sorted(own)} (and {', '.join(RUN_CONSTANTS)})")
        return cls(**{name.lower(): value for name, value in constants.items() if name in own})


# --- figures -------------------------------------------------------------------------------------

def _boundaries(ax, labels: np.ndarray, extent):
    """Thin dark lines where the label raster (ny, nx) changes (cell boundaries, no blending)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    ax.imshow(np.ma.masked_where(~edge, edge.astype(float)), origin="lower", extent=extent,
              cmap=ListedColormap([(0.15, 0.15, 0.15)]), vmin=0, vmax=1, interpolation="nearest",
              alpha=0.6, aspect="auto")


def draw_panel(ax, x, recon, labels_grid, extent, title, colors=None, centers=None, dirs=None):
    """One E1 panel: flat region colours, data, the segment from each point to its reconstruction."""
    plotting.region_map(ax, labels_grid, extent, colors=colors, alpha=0.5)
    _boundaries(ax, labels_grid, extent)
    ax.plot(np.c_[x[:, 0], recon[:, 0]].T, np.c_[x[:, 1], recon[:, 1]].T, "-", color="0.25", lw=0.7, alpha=0.7)
    ax.scatter(x[:, 0], x[:, 1], s=12, c="black", zorder=3, label="data")
    ax.scatter(recon[:, 0], recon[:, 1], s=14, marker="x", c="crimson", lw=1, zorder=4, label="reconstruction")
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], s=90, marker="*", c="gold", edgecolors="black", zorder=5,
                   label="centroid")
    if dirs is not None:
        for c, v in zip(centers, dirs):
            if len(v):
                ax.annotate("", xy=c + 0.6 * v[0], xytext=c - 0.6 * v[0],
                            arrowprops=dict(arrowstyle="-", color="blue", lw=2), zorder=4)
    plotting.finish_map(ax, extent, title, title_size=10)


# --- the experiment, step by step -------------------------------------------------------------------

class View(NamedTuple):
    """The E1 data and the raster the partitions are drawn on (``common.infra.data.grid``)."""
    x: np.ndarray          # (n_points, 2)
    pts: np.ndarray        # (ny * nx, 2) grid cell centres, row-major, row 0 the lowest y
    shape: tuple           # (ny, nx)
    extent: tuple          # (xmin, xmax, ymin, ymax)


class KMeansBaselines(NamedTuple):
    fit: dict              # kmeans_fit: model, labels, centers, recon, mse
    local_pca: dict        # each cluster's mean plus its first principal direction (the paper's panels)
    local_pca_same_rank: dict   # rank min(K, dim): the comparator of the SAE's rank (the claims)
    grid_labels: np.ndarray     # (ny, nx) cluster of each grid point


class TrainedSAE(NamedTuple):
    model: SAE             # as trained, with the codes of its mode
    exact: SAE             # the exact TopK model with the same effective parameters
    training: dict         # train_e1's {history, snapshots, seconds}
    recon_trained: np.ndarray   # (n_points, 2) under the trained mode
    recon_topk: np.ndarray      # (n_points, 2) of the exact TopK model
    recon_hard: np.ndarray      # (n_points, 2) of the relaxation's temperature -> 0 limit


class Cells(NamedTuple):
    """The exact partition: order-K power cells of the effective encoder."""
    grid_labels: np.ndarray     # (ny, nx) id of each grid point's active set
    data_labels: np.ndarray     # (n_points,)
    sets: np.ndarray            # (n_sets, K) the active sets the ids index
    colors: np.ndarray          # one colour per active set
    rank: int                   # min(K, dim): the rank of the SAE's pieces
    local_pca: dict             # local PCA of that rank on the cells
    topk_agree: float           # fraction of points whose TopK set is their power cell's set


def data_and_grid(s: E1Settings) -> View:
    pts, shape, extent = grid(s.box[:2], s.box[2:], s.grid_res)
    return View(toy_e1(s.n_points, seed=s.data_seed), pts, shape, extent)


def kmeans_baselines(view: View, s: E1Settings, seed: int) -> KMeansBaselines:
    """k-means and "k-means + local PCA" (rank 1, and rank min(K, dim))."""
    km = kmeans_fit(view.x, s.n_clusters, seed=seed)
    return KMeansBaselines(km, G.local_pca(view.x, km["labels"], 1),
                           G.local_pca(view.x, km["labels"], min(s.k, view.x.shape[1])),
                           km["model"].predict(view.pts).reshape(view.shape))


def train_sae(view: View, s: E1Settings, centers: np.ndarray, seed: int, desc: str) -> TrainedSAE:
    """The SAE initialised and trained as configured, then its exact TopK model."""
    model = init_sae(view.x, s.n_latents, s.k, s.init, seed=seed, bias_scale=s.bias_init_scale,
                     dec_scale=s.dec_init_scale, centers=centers)
    snaps = sorted({int(round(f * s.steps)) for f in s.snapshot_fractions})
    training = train_e1(model, view.x, s.mode, s.steps, s.lr, s.temperature, s.unit_norm, s.dec_bias,
                        snapshot_steps=snaps, log_every=max(1, s.steps // 200), desc=desc)
    xt = torch.as_tensor(view.x)
    exact = exact_model(model, s.unit_norm)
    with torch.no_grad():
        for m in (model, exact):
            check_converged(m, view.x, float(F.mse_loss(e1_forward(model, xt, s.mode, s.temperature, s.unit_norm)[0]
                                                        if m is model else exact(xt)[0], xt)))
        return TrainedSAE(model, exact, training,
                          e1_forward(model, xt, s.mode, s.temperature, s.unit_norm)[0].numpy(),
                          exact(xt)[0].numpy(),
                          hard_limit_recon(model, xt, s.unit_norm).numpy())


def exact_cells(exact: SAE, view: View, k: int) -> Cells:
    """The order-K power cells of the exact model on the grid and the data together, local PCA on them, and
    the cross-check that the TopK sets the SAE computes are the power-diagram sets."""
    ids, sets = partition(exact.W_enc, exact.b_enc, k, np.vstack([view.pts, view.x]))
    grid_labels, data_labels = ids[:len(view.pts)].reshape(view.shape), ids[len(view.pts):]
    rank = min(k, view.x.shape[1])
    _, idx, _ = exact.encode_sparse(torch.as_tensor(view.x))
    agree = float(np.mean([tuple(sorted(r)) == tuple(sets[i]) for r, i in zip(idx.tolist(), data_labels)]))
    return Cells(grid_labels, data_labels, sets, plotting.label_colors(len(sets), seed=1), rank,
                 G.local_pca(view.x, data_labels, rank), agree)


def summarise(s: E1Settings, view: View, km: KMeansBaselines, sae: TrainedSAE, cells: Cells) -> dict:
    """Every number of the run (``partitions.json``): the MSE of each model, counts, sites and weights."""
    x, relaxed = view.x, s.mode != "topk"
    mse = {
        "kmeans": km.fit["mse"],
        "sae_relaxed": float(np.mean((x - sae.recon_trained) ** 2)) if relaxed else None,
        "sae_topk": float(np.mean((x - sae.recon_topk) ** 2)),
        "sae_hard_limit": float(np.mean((x - sae.recon_hard) ** 2)) if relaxed else None,
        "kmeans_local_pca": km.local_pca["mse"],
        "kmeans_local_pca_rank_k": km.local_pca_same_rank["mse"],
        "local_pca_on_sae_regions": cells.local_pca["mse"],
    }
    return {
        "mse": mse,
        "mode": s.mode, "k": s.k, "n_latents": s.n_latents, "unit_norm": s.unit_norm,
        "local_pca_rank": cells.rank,
        "n_sae_regions_on_data": int(len(np.unique(cells.data_labels))),
        "n_sae_regions_on_grid": int(len(np.unique(cells.grid_labels))),
        "topk_sets_equal_power_cells": cells.topk_agree,
        "local_pca_le_sae_topk": bool(mse["local_pca_on_sae_regions"] <= mse["sae_topk"] + 1e-12),
        "train_seconds": sae.training["seconds"],
        "kmeans_centers": km.fit["centers"],
        "sae_sites": sae.exact.W_enc.detach().numpy(),
        "sae_weights": G.topk_sites_weights(sae.exact.W_enc, sae.exact.b_enc)[1],
        "active_sets": cells.sets,
        "history": sae.training["history"],
    }


def plot_partitions(path, s: E1Settings, view: View, km: KMeansBaselines, sae: TrainedSAE, cells: Cells,
                    numbers: dict) -> None:
    """k-means | SAE | k-means + local PCA | local PCA on the SAE's regions."""
    k, mse, x, extent = s.k, numbers["mse"], view.x, view.extent
    sae_label = {"softmax": f"softmax relaxation (T={s.temperature})",
                 "softmax_topk": f"softmax over top {k} (T={s.temperature})",
                 "topk": f"exact top-{k}"}[s.mode]
    fig, axes = plt.subplots(1, 4, figsize=(22, 6))
    km_cols = plotting.label_colors(s.n_clusters)
    draw_panel(axes[0], x, km.fit["recon"], km.grid_labels, extent,
               f"k-means (k={s.n_clusters})\nMSE {mse['kmeans']:.3g}", colors=km_cols, centers=km.fit["centers"])
    shown = sae.recon_topk if s.mode == "topk" else sae.recon_trained
    t2 = (f"Top-{k} SAE, {s.n_latents} latents, {sae_label}\n"
          + ("" if mse["sae_relaxed"] is None else f"trained (relaxed) MSE {mse['sae_relaxed']:.3g}, ")
          + f"{'its ' if mse['sae_relaxed'] is not None else ''}exact Top-{k} MSE {mse['sae_topk']:.3g}\n"
          + f"cells: order-{k} power diagram ({len(np.unique(cells.grid_labels))} on view)")
    draw_panel(axes[1], x, shown, cells.grid_labels, extent, t2, colors=cells.colors)
    w = sae.exact.W_enc.detach().numpy()
    axes[1].scatter(w[:, 0], w[:, 1], s=30, marker="^", facecolors="none", edgecolors="navy", lw=1, zorder=5,
                    label="sites (encoder rows)")
    draw_panel(axes[2], x, km.local_pca["recon"], km.grid_labels, extent,
               f"k-means + local PCA (rank 1)\nMSE {mse['kmeans_local_pca']:.3g}", colors=km_cols,
               centers=km.fit["centers"], dirs=km.local_pca["components"])
    draw_panel(axes[3], x, cells.local_pca["recon"], cells.grid_labels, extent,
               f"local PCA (rank {cells.rank}) on the SAE's regions\nMSE {mse['local_pca_on_sae_regions']:.3g}"
               f" <= exact TopK {mse['sae_topk']:.3g}", colors=cells.colors)
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    trained, exact = sae_names(s)
    sae = (f"{exact} MSE {mse['sae_topk']:.3g}" if mse["sae_relaxed"] is None else
           f"{trained} MSE {mse['sae_relaxed']:.3g}, {exact} MSE {mse['sae_topk']:.3g}")
    fig.suptitle(f"E1: between k-means and PCA (K={k}; rasters = exact cells, one colour per active set)\n{sae}; "
                 f"k-means MSE {mse['kmeans']:.3g}; k-means + rank-{cells.rank} local PCA MSE "
                 f"{mse['kmeans_local_pca_rank_k']:.3g}", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    plotting.save(fig, path, numbers)


def plot_evolution(path, s: E1Settings, view: View, sae: TrainedSAE) -> None:
    """The exact order-K partition at the snapshot steps."""
    k, x, snapshots, hist = s.k, view.x, sae.training["snapshots"], sae.training["history"]
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.6 * len(snapshots), 3.9), squeeze=False)
    evo = []
    for ax, (step, W, b) in zip(axes[0], snapshots):
        ids_s, sets_s = partition(W, b, k, view.pts)
        lab = ids_s.reshape(view.shape)
        plotting.region_map(ax, lab, view.extent, colors=plotting.label_colors(len(sets_s), seed=1), alpha=0.5)
        _boundaries(ax, lab, view.extent)
        ax.scatter(x[:, 0], x[:, 1], s=5, c="black")
        j = hist["step"].index(step) if step in hist["step"] else None
        topk_mse = None if j is None else hist["topk_mse"][j]
        evo.append({"step": step, "n_cells_on_view": int(len(sets_s)), "topk_mse": topk_mse,
                    "train_mse": None if j is None else hist["train_mse"][j]})
        sub = "" if topk_mse is None else (f"\nexact TopK MSE {topk_mse:.3g}" if s.mode == "topk" else
                                            f"\ntrained MSE {hist['train_mse'][j]:.3g}, exact TopK {topk_mse:.3g}")
        plotting.finish_map(ax, view.extent, f"step {step}: {len(sets_s)} cells" + sub, title_size=9, label_size=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Evolution of the Top-{k} SAE's order-{k} power diagram during training", fontsize=11)
    fig.tight_layout()
    plotting.save(fig, path, {"snapshots": evo})


def plot_training(path, s: E1Settings, sae: TrainedSAE, mse: dict) -> None:
    """MSE against Adam steps (the trained relaxation and the exact TopK model), k-means lines for scale."""
    hist = sae.training["history"]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"exact TopK model": (hist["step"], hist["topk_mse"])}
    if s.mode != "topk":
        series = {f"trained ({s.mode})": (hist["step"], hist["train_mse"]), **series}
    plotting.curves(ax, series, "Adam step", "MSE on the E1 data", logy=True)
    for name, val, style in (("k-means", mse["kmeans"], ":"), ("k-means + local PCA", mse["kmeans_local_pca"], "--")):
        ax.axhline(val, color="0.3", ls=style, lw=1, label=name)
    ax.legend(fontsize=8)
    ax.set_title(f"E1 training (K={s.k})", fontsize=10)
    fig.tight_layout()
    plotting.save(fig, path, {"history": hist, "mse": mse})


def sae_names(s: E1Settings) -> tuple[str, str]:
    """What the run's two SAE numbers are: (the trained model, its exact Top-K model). A relaxed run trains the
    softmax relaxation and reports the exact Top-K model with the same parameters beside it (never trained as
    such); a ``topk`` run trains the exact Top-K model itself."""
    if s.mode == "topk":
        return f"exact Top-{s.k} SAE (trained)", f"exact Top-{s.k} SAE (trained)"
    relaxed = {"softmax": "softmax-relaxed", "softmax_topk": f"softmax-over-top-{s.k}-relaxed"}[s.mode]
    return (f"{relaxed} SAE (trained, T={s.temperature})",
            f"its exact Top-{s.k} counterpart (same parameters, not trained as such)")


def report(name: str, s: E1Settings, numbers: dict, out) -> str:
    """The one line a run prints: every MSE with what it is."""
    mse, rank = numbers["mse"], numbers["local_pca_rank"]
    trained, exact = sae_names(s)
    sae = (f"{exact} MSE {mse['sae_topk']:.5g}" if mse["sae_relaxed"] is None else
           f"{trained} MSE {mse['sae_relaxed']:.5g}, {exact} MSE {mse['sae_topk']:.5g}")
    return (f"[{name}] {sae} | k-means ({s.n_clusters} clusters) MSE {mse['kmeans']:.5g}"
            + f" | k-means + rank-{rank} local PCA MSE {mse['kmeans_local_pca_rank_k']:.5g}"
            + ("" if rank == 1 else f" | k-means + rank-1 local PCA MSE {mse['kmeans_local_pca']:.5g}")
            + f" | rank-{rank} local PCA on the exact model's {numbers['n_sae_regions_on_data']} regions MSE "
            + f"{mse['local_pca_on_sae_regions']:.5g}"
            + ("" if mse["sae_hard_limit"] is None else f" | the relaxation at T->0 MSE {mse['sae_hard_limit']:.5g}")
            + f"   -> {out}")


def run_e1(run, s: E1Settings) -> dict:
    """The whole E1 experiment for one script, under ``run.out``; returns the numbers of ``partitions.json``."""
    view = data_and_grid(s)
    km = kmeans_baselines(view, s, seed=run.seed_for("kmeans"))
    try:
        sae = train_sae(view, s, km.fit["centers"], seed=run.seed_for("sae"), desc=run.name)
    except Diverged as err:
        run.fail(f"--LR={s.lr:g}: {err}")
    cells = exact_cells(sae.exact, view, s.k)
    numbers = summarise(s, view, km, sae, cells)
    plot_partitions(run.path("partitions.png"), s, view, km, sae, cells, numbers)
    plot_evolution(run.path("evolution.png"), s, view, sae)
    plot_training(run.path("training.png"), s, sae, numbers["mse"])
    print(report(run.name, s, numbers, run.out))
    return numbers
