"""The paper's theory checked numerically on random instances (docs/DESIGN.md, section 2).

One implementation of each check, used by the claims report (``run_theory``) and by the tests
(tests/test_theory.py); the registry ``THEORY`` lists them in a fixed order.

A check is ``check_<name>(rng, n_points, **shape, **defects) -> (agree, total)``:
    rng       a ``numpy.random.Generator``; everything random (model, points, data) is drawn from it
    n_points  points per instance
    shape     the instance's sizes (``TheoryCheck.shapes`` holds one dict of them per shape)
    defects   optional keywords (``sites_weights=``, ``jacobian_fn=``, ``bias_fn=``, ``flat_fn=``, ...),
              each replacing one piece of the computation the statement predicts. Their defaults are the
              statement itself (the report never passes them); the tests' negative controls pass a wrong
              piece (a wrong power-diagram weight, a wrong Jacobian, a perturbed flat, ...) and require the
              same code path to disagree, which shows that the check can fail.
and returns how many of its ``total`` comparisons (usually one per point) agree with an independent
computation. A statement holds when every comparison of every instance agrees.

Generators: ``run_theory`` gives each claim its own generator, seeded with
``derive_seed(seed, claim_id)``, so adding, removing or reordering claims never changes another claim's
numbers.

The random SAEs are float64 with unit-scale weights, random biases and a random input centre, so the
power-diagram weights use ``SAE.encoder_bias`` (the bias of the affine map x -> preacts), never b_enc.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import product
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.cluster import KMeans

from common.infra.data import check_int
from common.infra.outputs import derive_seed
from common.maths import geometry as G
from common.maths.sae import SAE, densify

POINT_SCALE = 1.5  # points ~ N(0, POINT_SCALE^2 I): they reach many cells of a unit-scale SAE
RTOL = ATOL = 1e-9  # float64 agreement of two computations of the same number


# --- instances ---------------------------------------------------------------------------------------

def random_sae(rng: np.random.Generator, n_features: int, n_latents: int, activation: str = "topk",
               k: int | None = None, centred: bool = True) -> SAE:
    """A float64 SAE with N(0, 1) encoder and decoder, N(0, 1) biases and (``centred``) an N(0, 0.25)
    input centre, all drawn from ``rng``; gradients off for the parameters (the Jacobian checks
    differentiate with respect to the input)."""
    model = SAE(n_features, n_latents, activation, k, seed=int(rng.integers(2 ** 31)), enc_init_scale=1.0,
                dec_init_scale=1.0).double()
    with torch.no_grad():
        model.b_enc.copy_(torch.from_numpy(rng.normal(size=n_latents)))
        model.b_dec.copy_(torch.from_numpy(rng.normal(size=n_features)))
    if centred:
        model.set_centre(torch.from_numpy(0.5 * rng.normal(size=n_features)))
    return model.requires_grad_(False)


def random_points(rng: np.random.Generator, n_points: int, n_features: int) -> np.ndarray:
    return POINT_SCALE * rng.normal(size=(n_points, n_features))


def encoder_affine(model: SAE) -> tuple[np.ndarray, np.ndarray]:
    """(W_enc, bias) of the affine map x -> preacts as numpy arrays: the bias is ``model.encoder_bias``."""
    return model.W_enc.detach().numpy().copy(), model.encoder_bias.detach().numpy().copy()


def _sorted_sets(idx) -> np.ndarray:
    return np.sort(np.asarray(idx), axis=1)


# --- T1, T1b: piecewise affine ------------------------------------------------------------------------

def affine_jacobian(model: SAE, mask: torch.Tensor) -> torch.Tensor:
    """The Jacobian the theory predicts on the region of each point: ``W_dec[:, P] W_enc[P, :]`` (docs'
    orientation) for the active latents P of that point (``mask`` (n, n_latents), 1 on P):
    (n, n_features out, n_features in)."""
    return torch.einsum("lo,nl,li->noi", model.atoms, mask.to(model.atoms.dtype), model.W_enc)


def autograd_jacobian(model: SAE, x: torch.Tensor) -> torch.Tensor:
    """d recon / d x of every point by autograd through ``model``'s forward: (n, out, in). Row j of the
    output depends on x_j only, so one backward pass per output coordinate gives all points at once."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        recon = model(x).recon
        rows = [torch.autograd.grad(recon[:, o].sum(), x, retain_graph=o < recon.shape[1] - 1)[0]
                for o in range(recon.shape[1])]
    return torch.stack(rows, 1)


def _piecewise_affine(rng, n_points, activation, n_features, n_latents, k, jacobian_fn):
    model = random_sae(rng, n_features, n_latents, activation, k)
    x = torch.from_numpy(random_points(rng, n_points, n_features))
    a = model.preacts(x)
    if not model.is_topk:
        mask = (a > 0).to(a.dtype)
    else:
        _, idx, _ = model.encode_sparse(x)
        mask = densify(torch.ones(idx.shape, dtype=a.dtype), idx, n_latents)
    expect = (jacobian_fn or affine_jacobian)(model, mask)
    jac = autograd_jacobian(model, x)
    ok = torch.isclose(jac, expect, rtol=RTOL, atol=ATOL).flatten(1).all(1)
    # and the affine form itself: xhat = W_dec[:, P] (W_enc[P, :] x + bias[P]) + b_dec
    affine = (mask * (x @ model.W_enc.T + model.encoder_bias)) @ model.atoms + model.b_dec
    with torch.no_grad():
        ok &= torch.isclose(model(x).recon, affine, rtol=RTOL, atol=ATOL).all(1)
    return int(ok.sum()), len(x)


def check_jacobian(rng, n_points, n_features, n_latents, k, jacobian_fn=None):
    """T1: on the TopK region with active set S the SAE is affine, Jacobian ``W_dec[:, S] W_enc[S, :]``
    (autograd at every point vs ``jacobian_fn(model, mask)``, default ``affine_jacobian``)."""
    return _piecewise_affine(rng, n_points, "topk", n_features, n_latents, k, jacobian_fn)


def check_relu_jacobian(rng, n_points, n_features, n_latents, jacobian_fn=None):
    """T1b: on the ReLU region with active set P = {i : a_i(x) > 0} the SAE is affine, Jacobian
    ``W_dec[:, P] W_enc[P, :]``."""
    return _piecewise_affine(rng, n_points, "relu", n_features, n_latents, None, jacobian_fn)


# --- T2, T2b, T2c, T3: regions are power cells -----------------------------------------------------

def check_topk_power(rng, n_points, n_features, n_latents, k, sites_weights=G.topk_sites_weights):
    """T2: the TopK set of x is the set of its K power-nearest sites. ``sites_weights(W_enc, bias) ->
    (sites, weights)``."""
    model = random_sae(rng, n_features, n_latents, "topk", k)
    x = random_points(rng, n_points, n_features)
    _, idx, _ = model.encode_sparse(torch.from_numpy(x))
    sites, weights = sites_weights(*encoder_affine(model))
    return int((_sorted_sets(idx) == G.nearest_k(x, sites, weights, k)).all(1).sum()), n_points


def check_ksubset(rng, n_points, n_features, n_latents, k, sites_weights=G.ksubset_sites_weights):
    """T2b: the TopK set of x is its power-nearest K-subset. ``sites_weights(W_enc, bias, k) ->
    (subsets, sites, weights)``."""
    model = random_sae(rng, n_features, n_latents, "topk", k)
    x = random_points(rng, n_points, n_features)
    _, idx, _ = model.encode_sparse(torch.from_numpy(x))
    subsets, sites, weights = sites_weights(*encoder_affine(model), k)
    best = subsets[G.power_distance(x, sites, weights).argmin(1)]
    return int((_sorted_sets(idx) == best).all(1).sum()), n_points


def check_topk_abs(rng, n_points, n_features, n_latents, k, sites_weights=G.topk_abs_sites_weights):
    """T2c: topk_abs selections (latent, sign) are the K power-nearest of the 2d signed sites."""
    model = random_sae(rng, n_features, n_latents, "topk_abs", k)
    x = random_points(rng, n_points, n_features)
    vals, idx, _ = model.encode_sparse(torch.from_numpy(x))
    signed = np.where(vals.numpy() >= 0, idx.numpy(), idx.numpy() + n_latents)  # site of (latent, sign)
    sites, weights = sites_weights(*encoder_affine(model))
    return int((_sorted_sets(signed) == G.nearest_k(x, sites, weights, k)).all(1).sum()), n_points


def check_relu(rng, n_points, n_features, n_latents, sites_weights=G.relu_sites_weights):
    """T3: the ReLU pattern q(x) = [a(x) > 0] is x's power cell among all 2^d patterns.
    ``sites_weights(W_enc, bias, patterns) -> (sites, weights)``."""
    model = random_sae(rng, n_features, n_latents, "relu")
    x = random_points(rng, n_points, n_features)
    patterns = np.array(list(product([0, 1], repeat=n_latents)), dtype=float)
    sites, weights = sites_weights(*encoder_affine(model), patterns)
    best = patterns[G.power_distance(x, sites, weights).argmin(1)]
    q = (model.preacts(torch.from_numpy(x)) > 0).numpy()
    return int((q == best).all(1).sum()), n_points


# --- T4, T4b: k-means is the Top-1 special case ---------------------------------------------------------

def centroid_bias(centroids: np.ndarray) -> np.ndarray:
    """``b_j = -||c_j||^2 / 2``: the Top-1 power weights ``||c_j||^2 + 2 b_j`` are then all 0 (Voronoi)."""
    return -0.5 * (centroids * centroids).sum(1)


def kmeans_sae(centroids: np.ndarray, bias_fn=None) -> SAE:
    """The Top-1 SAE of k-means centroids c (n_centroids, n_features): sites w_j = c_j, biases
    ``bias_fn(c)`` (default ``centroid_bias``), atoms c_j, b_dec 0, no centre."""
    c = np.asarray(centroids, dtype=float)
    model = SAE(c.shape[1], c.shape[0], "topk", 1).double()
    with torch.no_grad():
        model.W_enc.copy_(torch.from_numpy(c))
        model.b_enc.copy_(torch.from_numpy(np.asarray((bias_fn or centroid_bias)(c), dtype=float)))
        model.W_dec.copy_(torch.from_numpy(c))
        model.b_dec.zero_()
    return model.requires_grad_(False)


def cell_code(vals: torch.Tensor) -> torch.Tensor:
    """The per-cell constant code of the k-means autoencoder: 1 on the selected latent, whatever its
    pre-activation (the hard assignment)."""
    return torch.ones_like(vals)


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)  # brute force, no geometry code


def check_kmeans(rng, n_points, n_features, n_centroids, bias_fn=None):
    """T4: Top-1 with w_j = c_j, b_j = ``bias_fn(c)`` (default -||c_j||^2/2) selects the nearest
    centroid of every point."""
    centroids = rng.normal(size=(n_centroids, n_features))
    model = kmeans_sae(centroids, bias_fn)
    x = random_points(rng, n_points, n_features)
    top1 = model.encode_sparse(torch.from_numpy(x))[1][:, 0].numpy()
    return int((top1 == _nearest_centroid(x, centroids)).sum()), n_points


def check_kmeans_autoencoder(rng, n_points, n_features, n_centroids, bias_fn=None, code_fn=None):
    """T4b: the k-means autoencoder is a Top-1 SAE. Construction: fit k-means (scikit-learn) to a
    Gaussian mixture; SAE = ``kmeans_sae(centroids)`` whose Top-1 code is made per-cell constant,
    ``code_fn(vals)`` (default ``cell_code``: value 1 on the selected latent), and decoded by the SAE's own
    linear decoder ``codes @ atoms + b_dec``, so recon(x) = c_{j(x)}.

    Comparisons: every point's reconstruction equals its nearest centroid (brute force), and the SAE's
    MSE equals scikit-learn's k-means MSE (inertia / (n_points n_features)) for those centroids.
    Total n_points + 1. Passing ``code_fn=lambda v: v`` (the SAE's value code) must fail: a linear decoder
    of the Top-1 value is affine in x on a cell, not constant."""
    means = 3.0 * rng.normal(size=(n_centroids, n_features))
    x = means[rng.integers(0, n_centroids, n_points)] + rng.normal(size=(n_points, n_features))
    km = KMeans(n_centroids, init="k-means++", n_init=1, random_state=int(rng.integers(2 ** 31))).fit(x)
    c = km.cluster_centers_
    model = kmeans_sae(c, bias_fn)
    vals, idx, _ = model.encode_sparse(torch.from_numpy(x))
    codes = densify((code_fn or cell_code)(vals), idx, n_centroids)
    recon = model.decode(codes).numpy()
    agree = int(np.isclose(recon, c[_nearest_centroid(x, c)], rtol=RTOL, atol=ATOL).all(1).sum())
    same_mse = np.isclose(np.mean((x - recon) ** 2), km.inertia_ / x.size, rtol=RTOL, atol=0.0)
    return agree + int(same_mse), n_points + 1


# --- T6: lifting ------------------------------------------------------------------------------------

def check_lifting(rng, n_points, n_features, n_sites, weights_fn=G.lifted_power_weights,
                  heights_fn=G.lift_heights):
    """T6: the lifted (m+1)-D Voronoi diagram cut by t = t0 is the power diagram with weights
    ``weights_fn(h, t0, C)`` (default C - (h_i - t0)^2); conversely any weights lift to
    ``heights_fn(weights, t0) -> (h, A)``. One comparison per point in each direction."""
    sites = rng.uniform(-2, 2, size=(n_sites, n_features))
    heights = rng.uniform(0, 2, size=n_sites)
    t0, C = float(rng.uniform(-1, 1)), float(rng.uniform(0, 2))
    x = rng.uniform(-3, 3, size=(n_points, n_features))
    power = G.power_distance(x, sites, weights_fn(heights, t0, C)).argmin(1)
    forward = power == G.plane_section_labels(G.lift(sites, heights), x, t0)
    weights = rng.uniform(-3, 3, size=n_sites)
    h, _ = heights_fn(weights, t0)
    back = G.plane_section_labels(G.lift(sites, h), x, t0) == G.power_distance(x, sites, weights).argmin(1)
    return int(forward.sum() + back.sum()), 2 * n_points


# --- T7: k-flats ------------------------------------------------------------------------------------

def flat_error(pts: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> float:
    """Sum of squared distances of ``pts`` to the affine flat ``mean + span(basis rows)`` (basis (r, m),
    any full-rank rows: orthonormalised here)."""
    c = pts - mean
    if basis.shape[0] == 0:
        return float((c * c).sum())
    q = np.linalg.qr(basis.T)[0]
    r = c - (c @ q) @ q.T
    return float((r * r).sum())


def _flat_objective(params: np.ndarray, pts: np.ndarray, rank: int):
    """``flat_error`` and its gradient in (mean, A), the flat mean + span(columns of A (m, rank))."""
    m = pts.shape[1]
    mean, A = params[:m], params[m:].reshape(m, rank)
    c = pts - mean
    if rank == 0:
        return float((c * c).sum()), -2.0 * c.sum(0)
    gram_inv_At = np.linalg.solve(A.T @ A, A.T)  # (A^T A)^{-1} A^T
    r = c - (c @ A) @ gram_inv_At  # rows (I - P) c_i, P = A (A^T A)^{-1} A^T
    grad_mean = -2.0 * r.sum(0)
    # d/dA sum ||(I - P) c||^2 = -2 (I - P) C A (A^T A)^{-1}, C = c^T c
    grad_A = -2.0 * (r.T @ (c @ A)) @ np.linalg.inv(A.T @ A)
    return float((r * r).sum()), np.r_[grad_mean, grad_A.ravel()]


def local_pca_flats(x, labels, rank):
    """The flats local PCA fits on fixed labels (``geometry.local_pca``): (means (L, m), components list
    of (r_l, m))."""
    fit = G.local_pca(x, labels, rank)
    return fit["means"], fit["components"]


def _random_flat(rng, pts, rank):
    return pts.mean(0) + pts.std(0) * rng.normal(size=pts.shape[1]), rng.normal(size=(rank, pts.shape[1]))


def _mixture(rng, n_points, n_features, n_cells):
    """Anisotropic Gaussian clusters (random rotation and axis scales in [0.1, 2]) and balanced labels."""
    labels = rng.permutation(np.arange(n_points) % n_cells)
    x = np.empty((n_points, n_features))
    for cell in range(n_cells):
        rot = np.linalg.qr(rng.normal(size=(n_features, n_features)))[0]
        scale = rng.uniform(0.1, 2.0, size=n_features)
        n = int((labels == cell).sum())
        x[labels == cell] = 3.0 * rng.normal(size=n_features) + (rng.normal(size=(n, n_features)) * scale) @ rot
    return x, labels


def check_kflats(rng, n_points, n_features, n_cells, rank, n_random=20, n_perturb=12, n_steps=6,
                 flat_fn=None, kflats_fn=G.kflats):
    """T7: on fixed labels, local PCA of rank r (``flat_fn(x, labels, rank) -> (means, components)``,
    default ``local_pca_flats``) has the least within-cell squared error among rank-r affine flats, and
    the k-flats alternation (``kflats_fn``, default ``geometry.kflats``) never increases its objective.

    Per cell, the fitted flat's error (``flat_error``, computed here) must be <= that of: ``n_random``
    random flats; ``n_perturb`` small perturbations of the fitted flat (scales 1e-3 to 1e-1); and two
    local optimisations (BFGS on (mean, basis), exact gradient), one from the fitted flat and one from a
    random flat. Then from random initial labels, the alternation run for t = 0..n_steps iterations: the
    objective of its flats on its labels (computed here) never increases from t to t + 1, and equals its
    reported mse at every t. Total n_cells (n_random + n_perturb + 2) + 2 n_steps + 1."""
    x, labels = _mixture(rng, n_points, n_features, n_cells)
    means, comps = (flat_fn or local_pca_flats)(x, labels, rank)
    agree = total = 0
    for cell in range(n_cells):
        pts = x[labels == cell]
        basis = np.asarray(comps[cell], dtype=float).reshape(-1, n_features)
        best = flat_error(pts, means[cell], basis)
        rivals = [_random_flat(rng, pts, rank) for _ in range(n_random)]
        for j in range(n_perturb):
            eps = 10.0 ** (-3 + 2 * j / max(n_perturb - 1, 1))
            rivals.append((means[cell] + eps * pts.std(0) * rng.normal(size=n_features),
                           basis + eps * rng.normal(size=basis.shape)))
        for m0, b0 in ((means[cell], basis), _random_flat(rng, pts, rank)):  # from the fitted flat, at random
            res = minimize(_flat_objective, np.r_[m0, b0.T.ravel()], args=(pts, rank), jac=True,
                           method="BFGS")
            rivals.append((res.x[:n_features], res.x[n_features:].reshape(n_features, rank).T))
        for m_, b_ in rivals:
            agree += int(best <= flat_error(pts, m_, b_) * (1 + RTOL) + ATOL)
        total += len(rivals)
    init = rng.integers(0, n_cells, n_points)
    objective = []
    for t in range(n_steps + 1):
        fit = kflats_fn(x, n_cells, rank, n_iter=t, init_labels=init)
        err = sum(flat_error(x[fit["labels"] == cell], fit["means"][cell],
                             np.asarray(fit["components"][cell]).reshape(-1, n_features))
                  for cell in np.unique(fit["labels"]))
        agree += int(np.isclose(err, fit["mse"] * x.size, rtol=1e-7, atol=ATOL))
        objective.append(err)
    agree += sum(int(b <= a * (1 + RTOL) + ATOL) for a, b in zip(objective, objective[1:]))
    return agree, total + 2 * n_steps + 1


# --- registry -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TheoryCheck:
    """One statement: what it says, where it comes from, its check and the instance shapes (keyword
    dicts for ``fn``, used in turn by the instances)."""
    statement: str
    source: str
    fn: Callable
    shapes: tuple


THEORY: dict[str, TheoryCheck] = {
    "T1-piecewise-affine": TheoryCheck(
        "On a TopK region with active set S the SAE is affine with Jacobian W_dec[:, S] W_enc[S, :]",
        "paper Section 2 (SAEs are piecewise affine splines); docs/DESIGN.md 2.1", check_jacobian,
        (dict(n_features=3, n_latents=8, k=2), dict(n_features=6, n_latents=12, k=3),
         dict(n_features=16, n_latents=64, k=8))),
    "T1b-relu-piecewise-affine": TheoryCheck(
        "On a ReLU region with active set P = {i : a_i(x) > 0} the SAE is affine with Jacobian "
        "W_dec[:, P] W_enc[P, :]", "paper Section 2 (ReLU SAEs are piecewise affine); docs/DESIGN.md 2.1",
        check_relu_jacobian,
        (dict(n_features=3, n_latents=8), dict(n_features=6, n_latents=12), dict(n_features=16, n_latents=64))),
    "T2-topk-power-diagram": TheoryCheck(
        "The TopK set of x is the set of its K power-nearest sites (sites w_i, weights ||w_i||^2 + 2 b_i)",
        "paper Theorem 2.3 / B.1; docs/DESIGN.md 2.2", check_topk_power,
        (dict(n_features=2, n_latents=7, k=1), dict(n_features=2, n_latents=9, k=3),
         dict(n_features=5, n_latents=20, k=4), dict(n_features=16, n_latents=64, k=8))),
    "T2b-k-subset-form": TheoryCheck(
        "Equivalently, x's TopK set is its power-nearest K-subset (site sum w_i, weight "
        "||sum w_i||^2 + 2 sum b_i)", "paper Theorem 2.3 (first-order form); docs/DESIGN.md 2.2",
        check_ksubset, (dict(n_features=2, n_latents=7, k=2), dict(n_features=3, n_latents=8, k=3))),
    "T2c-topk-abs": TheoryCheck(
        "topk_abs regions are the order-K cells of the 2d sites +-w_i with weights ||w_i||^2 +- 2 b_i",
        "docs/DESIGN.md 2.2", check_topk_abs,
        (dict(n_features=2, n_latents=6, k=2), dict(n_features=4, n_latents=10, k=3))),
    "T3-relu-power-diagram": TheoryCheck(
        "ReLU activation patterns q are power cells (site W_enc^T q, weight ||W_enc^T q||^2 + 2 b^T q)",
        "paper Section 2 (ReLU SAEs); docs/DESIGN.md 2.3", check_relu,
        (dict(n_features=2, n_latents=5), dict(n_features=3, n_latents=7))),
    "T4-kmeans-top1": TheoryCheck(
        "Top-1 with w_j = c_j, b_j = -||c_j||^2/2 assigns every point to its nearest centroid (k-means is "
        "the Top-1 special case)", "paper Section 2 (SAEs generalise k-means); docs/DESIGN.md 2.4",
        check_kmeans, (dict(n_features=2, n_centroids=5), dict(n_features=10, n_centroids=12))),
    "T4b-kmeans-autoencoder": TheoryCheck(
        "With a per-cell constant code (1 on the selected latent) and atoms c_j, the Top-1 SAE of k-means "
        "centroids reconstructs every point as its nearest centroid: it is the k-means autoencoder, with "
        "k-means' MSE", "paper Section 2 (SAEs generalise k-means); docs/DESIGN.md 2.4",
        check_kmeans_autoencoder, (dict(n_features=2, n_centroids=3), dict(n_features=5, n_centroids=8))),
    "T6-lifting": TheoryCheck(
        "A lifted (m+1)-D Voronoi diagram cut by t = t0 is the power diagram with weights C - (h_i - t0)^2, "
        "and any weights lift", "paper Figure 7; docs/DESIGN.md 2.6", check_lifting,
        (dict(n_features=2, n_sites=9), dict(n_features=3, n_sites=6))),
    "T7-kflats-optimal": TheoryCheck(
        "On fixed regions, local PCA of rank r (region mean + top-r principal directions) has the least "
        "squared error among rank-r affine flats, and the k-flats alternation never increases its error",
        "paper Section 2 (accuracy vs interpretability, k-flats); docs/DESIGN.md 2.5", check_kflats,
        (dict(n_features=2, n_cells=3, rank=1), dict(n_features=4, n_cells=3, rank=2),
         dict(n_features=3, n_cells=4, rank=0))),
}


def run_claim(cid: str, seed: int, instances: int, points: int, registry: dict | None = None,
              **defect) -> dict:
    """Run one claim of ``registry`` (default ``THEORY``) on ``instances`` instances of ``points`` points,
    instance i using shape i mod len(shapes), drawing from ``np.random.default_rng(derive_seed(seed,
    cid))``. ``defect``: keywords passed to every call of the check (the negative controls); none in the
    report. Returns {id, statement, source, shapes, seed (the derived seed), instances, points, agree,
    total, verdict ("holds" if agree == total else "does not hold"), seconds}. Torch runs on one thread
    meanwhile (restored after)."""
    registry = THEORY if registry is None else registry
    if cid not in registry:
        raise ValueError(f"unknown theory claim id {cid!r}; known: {', '.join(registry)}")
    instances = check_int(instances, "instances", 1)
    points = check_int(points, "points", 1)
    check = registry[cid]
    claim_seed = derive_seed(seed, cid)
    rng = np.random.default_rng(claim_seed)
    agree = total = 0
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: threads only add overhead (T1 takes 25x longer on 2 busy cores)
    try:
        for i in range(instances):
            a, t = check.fn(rng, points, **check.shapes[i % len(check.shapes)], **defect)
            agree, total = agree + int(a), total + int(t)
    finally:
        torch.set_num_threads(threads)
    return dict(id=cid, statement=check.statement, source=check.source, shapes=[dict(s) for s in check.shapes],
                seed=claim_seed, instances=instances, points=points, agree=agree, total=total,
                verdict="holds" if agree == total else "does not hold",
                seconds=round(time.perf_counter() - start, 3))


def run_theory(seed: int, instances: int, points: int, ids=None, registry: dict | None = None) -> list[dict]:
    """``run_claim`` for every claim of ``registry`` (default ``THEORY``), in its order, or for ``ids``
    (in the order given). Each claim draws from its own generator, so the result of a claim does not
    depend on which other claims run."""
    registry = THEORY if registry is None else registry
    ids = list(registry) if ids is None else list(ids)
    unknown = [cid for cid in ids if cid not in registry]
    if unknown:
        raise ValueError(f"unknown theory claim id(s) {unknown}; known: {', '.join(registry)}")
    return [run_claim(cid, seed, instances, points, registry) for cid in ids]
