"""The E1 SAE, shared by the E1 scripts (2-D: ``e1_2d``; 8-D: ``e1_8d``) and figure 7: k-means, the E1 SAE (its
softmax relaxations and the exact TopK model), its training loop, its exact Top-K regions.

The E1 SAE is a ``common.maths.sae.SAE`` (untied). With ``unit_norm`` (the original scripts' choice) the
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

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from tqdm import tqdm

from ..maths import geometry as G
from ..maths.sae import SAE

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


def e1_forward(model: SAE, x: torch.Tensor, mode: str, temperature: float | None, unit_norm: bool):
    """(recon (n, 2), codes (n, d)) of the E1 SAE under ``mode`` (module docstring); ``temperature``:
    the softmax modes' (None with ``topk``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "topk" and temperature is None:
        raise ValueError(f"mode {mode!r} is a softmax relaxation and needs a temperature")
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


def train_e1(model: SAE, x: np.ndarray, mode: str, steps: int, lr: float, temperature: float | None,
             unit_norm: bool, dec_bias: bool, snapshot_steps=(), log_every: int = 50, desc: str = "E1") -> dict:
    """Full-batch Adam on the MSE of ``mode``'s reconstruction.

    ``dec_bias=False`` keeps b_dec at 0 (the original scripts had no decoder bias). Returns
    {history: {step, train_mse (the trained objective), topk_mse (exact TopK model)},
    snapshots: [(step, W_enc_eff, b_enc)] at the requested steps (0 = before training), seconds}.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    params = [model.W_enc, model.b_enc, model.W_dec] + ([model.b_dec] if dec_bias else [])
    opt = torch.optim.Adam(params, lr=lr)
    snap = set(int(s) for s in snapshot_steps)
    hist = {"step": [], "train_mse": [], "topk_mse": []}
    snapshots = []

    def record(step):
        with torch.no_grad():
            if step in snap:
                W, _ = effective(model, unit_norm)
                snapshots.append((step, W.detach().clone().numpy(), model.b_enc.detach().clone().numpy()))
            if step % log_every == 0 or step == steps or step in snap:
                hist["step"].append(step)
                hist["train_mse"].append(float(F.mse_loss(e1_forward(model, xt, mode, temperature, unit_norm)[0], xt)))
                hist["topk_mse"].append(float(F.mse_loss(e1_forward(model, xt, "topk", temperature, unit_norm)[0], xt)))

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


class Diverged(ValueError):
    """Training diverged; the caller names the setting (its learning rate)."""


DIVERGED_FVU = 1e3   # a reconstruction this many times worse than predicting the data's mean is no result


def check_converged(model: SAE, x: np.ndarray, mse: float) -> None:
    """Diverged when a parameter is NaN/Inf, or the reconstruction MSE ``mse`` is not finite or exceeds
    ``DIVERGED_FVU`` times the data's variance (the MSE of predicting the mean)."""
    var = float(((x - x.mean(0)) ** 2).mean())
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad or not math.isfinite(mse) or mse > DIVERGED_FVU * var:
        raise Diverged(f"training diverged (reconstruction MSE {mse:.3g}, accepted at most {DIVERGED_FVU:g} x the "
                       f"data's variance {var:.3g}; non-finite parameters: {', '.join(bad) or 'none'}); use a smaller "
                       "learning rate")


def partition(W_enc, b_enc, k: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order-k power-diagram cells (sites = rows of W_enc, weights ||w||^2 + 2 b) of ``points``:
    (ids (n,), active sets (n_sets, k)) as in ``geometry.order_k_labels``."""
    sites, weights = G.topk_sites_weights(W_enc, b_enc)
    return G.order_k_labels(points, sites, weights, k)
