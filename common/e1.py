"""What the three E1 scripts share: k-means and local-PCA baselines, the E1 SAE (its softmax
relaxations and the exact TopK model), the training loop, the partition figures.

The E1 SAE is a ``common.sae.SAE`` (untied). With ``unit_norm`` (the original scripts' choice) the
model in use has the encoder rows and the dictionary atoms normalised to unit length:

    effective W_enc = W_enc / ||rows||,   effective atoms = W_dec / ||rows||

and everything below (power diagram, exact TopK model) refers to those effective parameters. Three
ways to turn pre-activations ``a`` into codes:

    softmax        codes = softmax(a / T) over all latents           (k_1's relaxation of Top-1)
    softmax_topk   codes = softmax(a_S / T) on the TopK set S, else 0   (k_3's relaxation of Top-3)
    topk           codes = a_S on the TopK set, else 0                 (the exact TopK SAE of the theory)

The exact TopK model of a relaxed run is the same effective parameters with ``topk`` codes: its
regions are exactly the order-K power cells with sites = effective rows and weights 1 + 2 b (unit
rows) or ||w||^2 + 2 b; it is piecewise affine of rank <= K, so local PCA (rank K) on its regions can
only be more accurate (docs/DESIGN.md, section 2, item 5).
"""
from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from sklearn.cluster import KMeans
from tqdm import tqdm

from . import geometry as G
from . import plotting
from .data import grid, toy_e1
from .sae import SAE

MODES = ("softmax", "softmax_topk", "topk")
INITS = ("randn", "data", "kmeans")


# --- baselines -------------------------------------------------------------------------------------

def kmeans_fit(x: np.ndarray, n_clusters: int, seed: int) -> dict:
    """sklearn KMeans (k-means++, n_init 10): {model, labels (n,), centers (c, 2), recon (n, 2), mse}."""
    km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed).fit(x)
    labels = km.predict(x)
    recon = km.cluster_centers_[labels]
    return {"model": km, "labels": labels, "centers": km.cluster_centers_, "recon": recon,
            "mse": float(np.mean((x - recon) ** 2))}


# --- the SAE -----------------------------------------------------------------------------------------

def init_sae(x: np.ndarray, n_latents: int, k: int, init: str, seed: int, bias_scale: float = 1.0,
             dec_scale: float = 1.0, centers: np.ndarray | None = None) -> SAE:
    """An untied TopK SAE initialised as in the original scripts (float64, E1 is tiny).

    ``randn``: W_enc ~ N(0, 1) (k_1); ``data``: rows are random data points + 0.1 N(0, 1) (k_3);
    ``kmeans``: the first rows are the k-means ``centers``, the rest as ``data``. Always b_enc ~
    bias_scale N(0, 1), W_dec ~ dec_scale N(0, 1), b_dec = 0.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    model = SAE(x.shape[1], n_latents, activation="topk", k=k, seed=seed).double()
    g = torch.Generator().manual_seed(int(seed) + 1)
    xt = torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        if init == "randn":
            model.W_enc.copy_(torch.randn(n_latents, x.shape[1], generator=g, dtype=torch.float64))
        else:
            rows = xt[torch.randint(0, x.shape[0], (n_latents,), generator=g)]
            model.W_enc.copy_(rows + 0.1 * torch.randn(rows.shape, generator=g, dtype=torch.float64))
            if init == "kmeans":
                if centers is None:
                    raise ValueError("init='kmeans' needs the k-means centers")
                model.W_enc[:len(centers)] = torch.as_tensor(centers, dtype=torch.float64)
        model.b_enc.copy_(bias_scale * torch.randn(n_latents, generator=g, dtype=torch.float64))
        model.W_dec.copy_(dec_scale * torch.randn(n_latents, x.shape[1], generator=g, dtype=torch.float64))
        model.b_dec.zero_()
    return model


def effective(model: SAE, unit_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_enc, atoms) actually used: row-normalised when ``unit_norm`` (differentiable)."""
    if not unit_norm:
        return model.W_enc, model.W_dec
    return F.normalize(model.W_enc, dim=1), F.normalize(model.W_dec, dim=1)


def e1_forward(model: SAE, x: torch.Tensor, mode: str, temperature: float, unit_norm: bool):
    """(recon (n, 2), codes (n, d)) of the E1 SAE under ``mode`` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    W, atoms = effective(model, unit_norm)
    a = F.linear(x, W, model.b_enc)
    if mode == "softmax":
        codes = torch.softmax(a / temperature, dim=1)
    else:
        vals, idx = a.topk(model.k, dim=1)
        if mode == "softmax_topk":
            vals = torch.softmax(vals / temperature, dim=1)
        codes = torch.zeros_like(a).scatter(1, idx, vals)
    return codes @ atoms + model.b_dec, codes


def hard_limit_recon(model: SAE, x: torch.Tensor, unit_norm: bool) -> torch.Tensor:
    """The temperature -> 0 limit of both softmax relaxations: code 1 on the largest pre-activation,
    so the reconstruction is one atom (+ b_dec) per order-1 power cell: a k-means-type quantiser
    (docs/DESIGN.md, section 2, item 4). (n, 2)."""
    W, atoms = effective(model, unit_norm)
    return atoms[F.linear(x, W, model.b_enc).argmax(1)] + model.b_dec


def exact_model(model: SAE, unit_norm: bool) -> SAE:
    """The exact TopK SAE with the effective parameters of ``model`` (a detached copy)."""
    out = SAE(model.n_features, model.n_latents, activation="topk", k=model.k).double()
    W, atoms = effective(model, unit_norm)
    with torch.no_grad():
        out.W_enc.copy_(W)
        out.b_enc.copy_(model.b_enc)
        out.W_dec.copy_(atoms)
        out.b_dec.copy_(model.b_dec)
    return out


def train_e1(model: SAE, x: np.ndarray, mode: str, steps: int, lr: float, temperature: float,
             unit_norm: bool, dec_bias: bool, snapshot_steps=(), log_every: int = 50, desc: str = "E1") -> dict:
    """Full-batch Adam on the MSE of ``mode``'s reconstruction.

    ``dec_bias=False`` keeps b_dec at 0 (the original scripts had no decoder bias). Returns
    {history: {step, mse_train (the trained objective), mse_topk (exact TopK model)},
    snapshots: [(step, W_enc_eff, b_enc)] at the requested steps (0 = before training), seconds}.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    params = [model.W_enc, model.b_enc, model.W_dec] + ([model.b_dec] if dec_bias else [])
    opt = torch.optim.Adam(params, lr=lr)
    snap = set(int(s) for s in snapshot_steps)
    hist = {"step": [], "mse_train": [], "mse_topk": []}
    snapshots = []

    def record(step):
        with torch.no_grad():
            if step in snap:
                W, _ = effective(model, unit_norm)
                snapshots.append((step, W.detach().clone().numpy(), model.b_enc.detach().clone().numpy()))
            if step % log_every == 0 or step == steps or step in snap:
                hist["step"].append(step)
                hist["mse_train"].append(float(F.mse_loss(e1_forward(model, xt, mode, temperature, unit_norm)[0], xt)))
                hist["mse_topk"].append(float(F.mse_loss(e1_forward(model, xt, "topk", temperature, unit_norm)[0], xt)))

    # 100 x 2 data: thread start-up costs more than the arithmetic, and worse on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        record(0)
        for step in tqdm(range(1, steps + 1), desc=desc, leave=False, mininterval=1.0):
            loss = F.mse_loss(e1_forward(model, xt, mode, temperature, unit_norm)[0], xt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            record(step)
    finally:
        torch.set_num_threads(threads)
    return {"history": hist, "snapshots": snapshots, "seconds": time.perf_counter() - t0}


def partition(W_enc, b_enc, k: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order-k power-diagram cells (sites = rows of W_enc, weights ||w||^2 + 2 b) of ``points``:
    (ids (n,), active sets (n_sets, k)) as in ``geometry.order_k_labels``."""
    sites, weights = G.topk_sites_weights(W_enc, b_enc)
    return G.order_k_labels(points, sites, weights, k)


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
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(title, fontsize=10)


def run_e1(run, c: dict) -> dict:
    """The whole E1 experiment for one script: data, k-means (+ local PCA), SAE training, exact
    partition, the four MSEs, figures and JSON under ``run.out``. ``c`` holds the script's constants."""
    x = toy_e1(c["N_POINTS"], seed=c["DATA_SEED"])
    extent = c["BOX"]
    pts, shape, extent = grid(extent[:2], extent[2:], c["GRID_RES"])
    k, mode = c["K"], c["MODE"]
    if mode != "topk" and "TEMPERATURE" not in c:
        raise ValueError(f"MODE={mode!r} is a softmax relaxation and needs a TEMPERATURE constant")
    temperature = c.get("TEMPERATURE", 1.0)  # unused by the exact topk mode

    # k-means and "k-means + local PCA" (each cluster's mean plus its first principal direction, as the
    # paper's panels; and of the SAE's rank min(K, dim), the comparator of the same rank for the claims)
    km = kmeans_fit(x, c["N_CLUSTERS"], seed=run.seed_for("kmeans"))
    km_pca = G.local_pca(x, km["labels"], 1)
    km_pca_k = G.local_pca(x, km["labels"], min(k, x.shape[1]))
    km_grid = km["model"].predict(pts).reshape(shape)

    # the SAE, trained as configured, then its exact TopK model
    model = init_sae(x, c["N_LATENTS"], k, c["INIT"], seed=run.seed_for("sae"), bias_scale=c["BIAS_INIT_SCALE"],
                     dec_scale=c["DEC_INIT_SCALE"], centers=km["centers"])
    snaps = sorted({int(round(f * c["STEPS"])) for f in c["SNAPSHOT_FRACTIONS"]})
    log_every = max(1, c["STEPS"] // 200)
    tr = train_e1(model, x, mode, c["STEPS"], c["LR"], temperature, c["UNIT_NORM"], c["DEC_BIAS"],
                  snapshot_steps=snaps, log_every=log_every, desc=run.name)
    xt = torch.as_tensor(x)
    exact = exact_model(model, c["UNIT_NORM"])
    with torch.no_grad():
        recon_train = e1_forward(model, xt, mode, temperature, c["UNIT_NORM"])[0].numpy()
        recon_topk = exact(xt)[0].numpy()
        recon_hard = hard_limit_recon(model, xt, c["UNIT_NORM"]).numpy()

    # the exact partition: order-K power cells of the effective encoder, on the grid and the data together
    ids, sets = partition(exact.W_enc, exact.b_enc, k, np.vstack([pts, x]))
    sae_grid, sae_data = ids[:len(pts)].reshape(shape), ids[len(pts):]
    colors = plotting.label_colors(len(sets), seed=1)
    rank = min(k, x.shape[1])
    local = G.local_pca(x, sae_data, rank)
    # cross-check: the TopK sets the SAE computes equal the power-diagram sets
    _, idx, _ = exact.encode_sparse(xt)
    agree = float(np.mean([tuple(sorted(r)) == tuple(sets[i]) for r, i in zip(idx.tolist(), sae_data)]))

    mse = {
        "kmeans": km["mse"],
        "sae_relaxed": None if mode == "topk" else float(np.mean((x - recon_train) ** 2)),
        "sae_topk": float(np.mean((x - recon_topk) ** 2)),
        "sae_hard_limit": None if mode == "topk" else float(np.mean((x - recon_hard) ** 2)),
        "kmeans_local_pca": km_pca["mse"],
        "kmeans_local_pca_rank_k": km_pca_k["mse"],
        "local_pca_on_sae_regions": local["mse"],
    }
    numbers = {
        "mse": mse,
        "mode": mode, "k": k, "n_latents": c["N_LATENTS"], "unit_norm": c["UNIT_NORM"],
        "local_pca_rank": rank,
        "n_sae_regions_on_data": int(len(np.unique(sae_data))),
        "n_sae_regions_on_grid": int(len(np.unique(sae_grid))),
        "topk_sets_equal_power_cells": agree,
        "local_pca_le_sae_topk": bool(local["mse"] <= mse["sae_topk"] + 1e-12),
        "train_seconds": tr["seconds"],
        "kmeans_centers": km["centers"],
        "sae_sites": exact.W_enc.detach().numpy(),
        "sae_weights": G.topk_sites_weights(exact.W_enc, exact.b_enc)[1],
        "active_sets": sets,
        "history": tr["history"],
    }

    # main figure: k-means | SAE | k-means + local PCA | local PCA on the SAE's regions
    sae_label = {"softmax": f"softmax relaxation (T={temperature})",
                 "softmax_topk": f"softmax over top {k} (T={temperature})",
                 "topk": f"exact top-{k}"}[mode]
    fig, axes = plt.subplots(1, 4, figsize=(22, 6))
    km_cols = plotting.label_colors(c["N_CLUSTERS"])
    draw_panel(axes[0], x, km["recon"], km_grid, extent, f"k-means (k={c['N_CLUSTERS']})\nMSE {mse['kmeans']:.3g}",
               colors=km_cols, centers=km["centers"])
    shown = recon_topk if mode == "topk" else recon_train
    t2 = (f"Top-{k} SAE, {c['N_LATENTS']} latents, {sae_label}\n"
          + ("" if mse["sae_relaxed"] is None else f"trained model MSE {mse['sae_relaxed']:.3g}, ")
          + f"exact TopK MSE {mse['sae_topk']:.3g}\n"
          + f"cells: order-{k} power diagram ({len(np.unique(sae_grid))} on view)")
    draw_panel(axes[1], x, shown, sae_grid, extent, t2, colors=colors)
    w = exact.W_enc.detach().numpy()
    axes[1].scatter(w[:, 0], w[:, 1], s=30, marker="^", facecolors="none", edgecolors="navy", lw=1, zorder=5,
                    label="sites (encoder rows)")
    draw_panel(axes[2], x, km_pca["recon"], km_grid, extent,
               f"k-means + local PCA (rank 1)\nMSE {mse['kmeans_local_pca']:.3g}", colors=km_cols,
               centers=km["centers"], dirs=km_pca["components"])
    draw_panel(axes[3], x, local["recon"], sae_grid, extent,
               f"local PCA (rank {rank}) on the SAE's regions\nMSE {mse['local_pca_on_sae_regions']:.3g}"
               f" <= exact TopK {mse['sae_topk']:.3g}", colors=colors)
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"E1: between k-means and PCA (K={k}; rasters = exact cells, one colour per active set)",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    plotting.save(fig, run.path("partitions.png"), numbers)

    # evolution strip: the exact order-K partition at a few training steps
    fig, axes = plt.subplots(1, len(tr["snapshots"]), figsize=(3.6 * len(tr["snapshots"]), 3.9), squeeze=False)
    evo = []
    hist = tr["history"]
    for ax, (step, W, b) in zip(axes[0], tr["snapshots"]):
        ids_s, sets_s = partition(W, b, k, pts)
        lab = ids_s.reshape(shape)
        plotting.region_map(ax, lab, extent, colors=plotting.label_colors(len(sets_s), seed=1), alpha=0.5)
        _boundaries(ax, lab, extent)
        ax.scatter(x[:, 0], x[:, 1], s=5, c="black")
        j = hist["step"].index(step) if step in hist["step"] else None
        m_topk = None if j is None else hist["mse_topk"][j]
        evo.append({"step": step, "n_cells_on_view": int(len(sets_s)), "mse_topk": m_topk,
                    "mse_train": None if j is None else hist["mse_train"][j]})
        sub = "" if m_topk is None else (f"\nexact TopK MSE {m_topk:.3g}" if mode == "topk" else
                                          f"\ntrained MSE {hist['mse_train'][j]:.3g}, exact TopK {m_topk:.3g}")
        ax.set_title(f"step {step}: {len(sets_s)} cells" + sub, fontsize=9)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$", fontsize=8)
        ax.set_ylabel("$x_2$", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Evolution of the Top-{k} SAE's order-{k} power diagram during training", fontsize=11)
    fig.tight_layout()
    plotting.save(fig, run.path("evolution.png"), {"snapshots": evo})

    # training curves
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"exact TopK model": (hist["step"], hist["mse_topk"])}
    if mode != "topk":
        series = {f"trained ({mode})": (hist["step"], hist["mse_train"]), **series}
    plotting.curves(ax, series, "Adam step", "MSE on the E1 data", logy=True)
    for name, val, style in (("k-means", mse["kmeans"], ":"), ("k-means + local PCA", mse["kmeans_local_pca"], "--")):
        ax.axhline(val, color="0.3", ls=style, lw=1, label=name)
    ax.legend(fontsize=8)
    ax.set_title(f"E1 training (K={k})", fontsize=10)
    fig.tight_layout()
    plotting.save(fig, run.path("training.png"), {"history": hist, "mse": mse})

    print(f"[{run.name}] MSE  k-means {mse['kmeans']:.5f} | SAE trained "
          + ("-" if mse["sae_relaxed"] is None else f"{mse['sae_relaxed']:.5f}")
          + f" | SAE exact TopK {mse['sae_topk']:.5f} | k-means+local PCA {mse['kmeans_local_pca']:.5f}"
          + f" | local PCA on SAE regions {mse['local_pca_on_sae_regions']:.5f}"
          + ("" if mse["sae_hard_limit"] is None else f" | relaxation at T->0 {mse['sae_hard_limit']:.5f}")
          + f"   -> {run.out}")
    return numbers
