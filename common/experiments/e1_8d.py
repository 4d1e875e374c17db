"""E1 in 8-D (exp_e1_between_kmeans_and_pca_8d.py; docs/DESIGN.md, section 2.5) makes the "between" claim a check
that can fail: ``gaussian_mixture`` (anisotropic components, so local PCA of rank K < dim leaves an error),
``train_exact_topk`` (trained as an exact Top-K model, then its decoder solved exactly), ``between_case`` (k-means
and k-means + rank-K local PCA with as many clusters as the SAE's non-empty Top-K regions, the verdict),
``between_8d_summary`` (the claim's verdict from the script's JSON), ``plot_between_8d``.
"""
from __future__ import annotations
from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from ..infra.data import check_int, check_scalar
from ..maths import geometry as G
from ..maths.pam import collect_stats, solve_decoder
from ..maths.sae import SAE
from . import plotting
from .claims import between_verdict
from .e1 import init_sae, kmeans_fit, partition, train_e1

LOWER_FLOOR = 1e-6   # a lower bound at or below this cannot be undercut: the comparison says nothing
CASE_KEYS = ("k", "data_seed", "kmeans", "sae_topk", "kmeans_local_pca", "n_sae_regions", "n_kmeans_clusters")


def gaussian_mixture(n_points: int, dim: int, n_components: int, separation: float, decay: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_points`` from an equal-weight mixture of ``n_components`` Gaussians in R^dim.

    Means ~ separation N(0, I); component j is ``mean_j + Q_j diag(decay^0, ..., decay^(dim-1)) g`` with g ~ N(0, I)
    and Q_j a random rotation (QR of a Gaussian matrix): anisotropic, full rank (0 < decay < 1), so local PCA of
    any rank below ``dim`` leaves an error (about sum_{i >= K} decay^(2i) / dim per point on the true components).
    Returns (x (n_points, dim), component of each point (n_points,))."""
    n_points = check_int(n_points, "n_points", 1)
    dim = check_int(dim, "dim", 1)
    n_components = check_int(n_components, "n_components", 1, n_points, high_name="n_points")
    separation = check_scalar(separation, "separation", 0.0)
    decay = check_scalar(decay, "decay", 0.0)
    if not 0 < decay < 1:
        raise ValueError(f"decay must lie in (0, 1) (standard deviations decay^i, full rank), got {decay!r}")
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    means = separation * rng.standard_normal((n_components, dim))
    rotations = [np.linalg.qr(rng.standard_normal((dim, dim)))[0] for _ in range(n_components)]
    labels = rng.integers(0, n_components, n_points)
    g = rng.standard_normal((n_points, dim)) * decay ** np.arange(dim)
    x = means[labels] + np.einsum("nij,nj->ni", np.stack(rotations)[labels], g)
    return x, labels


def train_exact_topk(x: np.ndarray, n_latents: int, k: int, steps: int, lr: float, seed: int) -> tuple[SAE, dict]:
    """An exact Top-k SAE trained on ``x`` as an exact Top-k model (no relaxation, no unit norm, decoder bias).

    Encoder rows at random data points + 0.1 N(0, 1), b_enc = 0, atoms 0.1 N(0, 1) (``init_sae``, ``data``);
    full-batch Adam on the exact Top-k MSE (``train_e1``, mode ``topk``); then the decoder (atoms, b_dec) solved
    exactly for the final codes (``pam.solve_decoder`` with no regularisation: least squares, PAM's decoder step),
    which cannot raise the MSE. Returns (model, {mse_adam, mse, seconds})."""
    model = init_sae(x, n_latents, k, "data", seed=seed, bias_scale=0.0, dec_scale=0.1)
    training = train_e1(model, x, "topk", steps, lr, None, unit_norm=False, dec_bias=True, log_every=steps,
                        desc=f"E1 8-D, K={k}")
    xt = torch.as_tensor(x, dtype=torch.float64)
    t0 = time.perf_counter()
    with torch.no_grad():
        mse_adam = float(F.mse_loss(model.reconstruct(xt), xt))
        atoms, b, _ = solve_decoder(collect_stats(model, xt), model.W_dec, model.b_dec, keep_unfired=True)
        model.W_dec.copy_(atoms)
        model.b_dec.copy_(b)
        mse = float(F.mse_loss(model.reconstruct(xt), xt))
    return model, {"mse_adam": mse_adam, "mse": mse, "seconds": training["seconds"] + time.perf_counter() - t0}


def topk_regions(model: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact Top-K regions of the data: (ids (n,), active sets (n_regions, K)) as in ``geometry.label_sets``;
    only regions holding a data point count."""
    with torch.no_grad():
        _, idx, _ = model.encode_sparse(torch.as_tensor(x, dtype=torch.float64))
    return G.label_sets(idx.numpy())


def between_case(x: np.ndarray, model: SAE, seed: int) -> dict:
    """One case of the 8-D check: the exact Top-K ``model`` on ``x`` against k-means and k-means + rank-K local PCA
    with as many clusters as the model has non-empty Top-K regions on ``x`` (docs/DESIGN.md, section 2.5).

    Returns {k, kmeans (upper), sae_topk, kmeans_local_pca (lower, rank K), local_pca_on_sae_regions (rank K on
    the model's own regions: never above sae_topk), n_sae_regions, n_kmeans_clusters (non-empty),
    topk_sets_equal_power_cells, lower_above_floor, verdict (``claims.between_verdict``)}."""
    if not model.is_topk or model.activation != "topk":
        raise ValueError(f"model must be an exact TopK SAE (activation 'topk'), got {model.activation!r}")
    k = model.k
    if k >= x.shape[1]:
        raise ValueError(f"the model's k (= {k}) must be below the data dimension (= {x.shape[1]}): a rank-k local "
                         f"PCA is then exact and the lower bound is 0")
    xt = torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        sae = float(F.mse_loss(model.reconstruct(xt), xt))
    ids, sets = topk_regions(model, x)
    power_ids, power_sets = partition(model.W_enc, model.encoder_bias, k, x)
    km = kmeans_fit(x, len(sets), seed=seed)
    lower = G.local_pca(x, km["labels"], k)["mse"]
    return {"k": k, "kmeans": km["mse"], "sae_topk": sae, "kmeans_local_pca": lower,
            "local_pca_on_sae_regions": G.local_pca(x, ids, k)["mse"],
            "n_sae_regions": int(len(sets)), "n_kmeans_clusters": int(len(np.unique(km["labels"]))),
            "topk_sets_equal_power_cells": bool(np.array_equal(sets[ids], power_sets[power_ids])),
            "lower_above_floor": bool(lower > LOWER_FLOOR),
            "verdict": between_verdict(lower, sae, km["mse"])}


def between_8d_summary(result: dict) -> tuple[str, dict]:
    """The claim's verdict from the 8-D script's JSON (``between_8d.json``): (verdict, numbers).

    Each case is judged again here by ``claims.between_verdict(kmeans_local_pca, sae_topk, kmeans)`` (the stored
    verdicts are not trusted). holds if every case holds and every lower bound is above LOWER_FLOOR; does not hold
    if any case does not hold; inconclusive if every case holds but some lower bound is at or below the floor
    (0 cannot be undercut). numbers: {cases: [...], per_k: {K: combined verdict}, min_lower, lower_floor}."""
    cases = result.get("cases") if isinstance(result, dict) else None
    if not isinstance(cases, list) or not cases:
        raise ValueError("between_8d_summary needs the 8-D script's JSON: a dict with a non-empty list 'cases', got "
                         + (f"keys {sorted(result)}" if isinstance(result, dict) else type(result).__name__))
    rows = []
    for i, c in enumerate(cases):
        missing = [key for key in CASE_KEYS if not isinstance(c, dict) or key not in c]
        if missing:
            raise ValueError(f"between_8d_summary: case {i} lacks {missing}; each case needs {list(CASE_KEYS)}")
        rows.append({key: c[key] for key in CASE_KEYS}
                    | {"verdict": between_verdict(c["kmeans_local_pca"], c["sae_topk"], c["kmeans"])})
    verdicts = [r["verdict"] for r in rows]
    min_lower = min(r["kmeans_local_pca"] for r in rows)
    if "does not hold" in verdicts:
        verdict = "does not hold"
    else:
        verdict = "holds" if min_lower > LOWER_FLOOR else "inconclusive"
    per_k = {str(k): ("holds" if all(r["verdict"] == "holds" for r in rows if r["k"] == k) else "does not hold")
             for k in sorted({r["k"] for r in rows})}
    return verdict, {"cases": rows, "per_k": per_k, "held": f"{verdicts.count('holds')}/{len(rows)}",
                     "min_lower": min_lower, "lower_floor": LOWER_FLOOR}


def plot_between_8d(path, cases: list, title: str, numbers: dict) -> None:
    """One panel per K: k-means, the exact Top-K SAE and k-means + rank-K local PCA per data seed (log scale), the
    regions under each group and the verdicts in the title; ``numbers`` are written beside it."""
    ks = sorted({c["k"] for c in cases})
    fig, axes = plt.subplots(1, len(ks), figsize=(5.2 * len(ks), 4.4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        rows = [c for c in cases if c["k"] == k]
        groups = [f"seed {c['data_seed']}\n{c['n_sae_regions']} regions" for c in rows]
        series = {"k-means (same # regions)": [c["kmeans"] for c in rows],
                  f"exact Top-{k} SAE": [c["sae_topk"] for c in rows],
                  f"k-means + rank-{k} local PCA": [c["kmeans_local_pca"] for c in rows]}
        held = sum(c["verdict"] == "holds" for c in rows)
        plotting.grouped_bars(ax, groups, series, "MSE (mean over points and features)",
                              f"K = {k}: between in {held}/{len(rows)} data seeds", logy=True)
        for j, c in enumerate(rows):
            if c["verdict"] != "holds":
                ax.annotate("not between", (j, c["sae_topk"]), ha="center", va="bottom", color="crimson", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    plotting.save(fig, path, numbers)
