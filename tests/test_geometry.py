"""SPEC section 2, every statement checked numerically against an independent brute-force computation."""
from itertools import combinations, product

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull
from sklearn.cluster import KMeans

from common import geometry as G
from common.data import grid, toy_e1
from common.sae import SAE


def random_sae(n_features, n_latents, activation="topk", k=1, seed=0, bias_scale=1.0):
    model = SAE(n_features, n_latents, activation=activation, k=k, seed=seed, enc_init_scale=1.0,
                dec_init_scale=1.0).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.b_enc.copy_(bias_scale * torch.randn(n_latents, generator=g, dtype=torch.float64))
        model.b_dec.copy_(torch.randn(n_features, generator=g, dtype=torch.float64))
    return model


def sets_of(idx):
    return [tuple(sorted(r)) for r in np.asarray(idx).tolist()]


# --- item 2: TopK regions are order-K power cells ----------------------------------------------

@pytest.mark.parametrize("n_features,n_latents,k", [(2, 7, 1), (2, 9, 3), (5, 12, 4), (16, 30, 5)])
def test_topk_set_is_k_power_nearest_sites(n_features, n_latents, k):
    model = random_sae(n_features, n_latents, k=k, seed=n_latents)
    x = torch.randn(500, n_features, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, idx, a = model.encode_sparse(x)
    sites, weights, order = G.sae_sites_weights(model)
    assert order == k
    # power distance equals ||x||^2 - 2 a(x)
    pd = G.power_distance(x, sites, weights)
    np.testing.assert_allclose(pd, (x * x).sum(1, keepdim=True).numpy() - 2 * a.detach().numpy(), atol=1e-9)
    # brute force: sort all power distances explicitly
    brute = np.argsort(pd, axis=1, kind="stable")[:, :k]
    assert sets_of(idx) == sets_of(brute) == sets_of(G.nearest_k(x, sites, weights, k))


@pytest.mark.parametrize("n_latents,k", [(6, 2), (7, 3), (8, 4)])
def test_first_order_form_of_order_k_diagram(n_latents, k):
    model = random_sae(3, n_latents, k=k, seed=10 + k)
    x = torch.randn(400, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, idx, _ = model.encode_sparse(x)
    subsets, sites, weights = G.ksubset_sites_weights(model.W_enc, model.b_enc, k)
    assert len(subsets) == len(list(combinations(range(n_latents), k)))
    W, b = model.W_enc.detach().numpy(), model.b_enc.detach().numpy()
    for j, S in enumerate(subsets[:5]):  # the formula itself, by hand
        s = W[list(S)].sum(0)
        assert np.allclose(sites[j], s) and np.isclose(weights[j], s @ s + 2 * b[list(S)].sum())
    best = subsets[G.power_distance(x, sites, weights).argmin(1)]
    assert sets_of(best) == sets_of(idx)
    # the mean-site form for a general power diagram gives the same cells
    sub2, s2, w2 = G.order_k_sites_weights(*G.topk_sites_weights(model.W_enc, model.b_enc), k)
    assert np.array_equal(sub2, subsets)
    assert sets_of(sub2[G.power_distance(x, s2, w2).argmin(1)]) == sets_of(idx)


@pytest.mark.parametrize("k", [1, 3])
def test_topk_abs_uses_2d_signed_sites(k):
    model = random_sae(4, 10, activation="topk_abs", k=k, seed=5)
    x = torch.randn(600, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    vals, idx, _ = model.encode_sparse(x)
    sites, weights, _ = G.sae_sites_weights(model)
    assert sites.shape == (20, 4)
    near = G.nearest_k(x, sites, weights, k)
    # site i < d is latent i with a positive preact, site d + i latent i with a negative one
    signed = np.where(vals.detach().numpy() > 0, idx.numpy(), idx.numpy() + 10)
    assert sets_of(near) == sets_of(signed)


def test_relu_cells_are_power_cells_of_patterns():
    d = 6
    model = random_sae(3, d, activation="relu", seed=8)
    x = torch.randn(800, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    q_true = (model.preacts(x) > 0).detach().numpy().astype(int)
    patterns = np.array(list(product([0, 1], repeat=d)))
    sites, weights = G.relu_sites_weights(model.W_enc, model.b_enc, patterns)
    best = patterns[G.power_distance(x, sites, weights).argmin(1)]
    assert np.array_equal(best, q_true)


# --- item 4: k-means is the Top-1 special case ---------------------------------------------------

def test_top1_with_centroid_sites_is_kmeans():
    x = toy_e1(100, seed=0)
    km = KMeans(3, init="k-means++", n_init=10, random_state=0).fit(x)
    c = km.cluster_centers_
    model = SAE(2, 3, activation="topk", k=1).double()
    with torch.no_grad():
        model.W_enc.copy_(torch.from_numpy(c))
        model.b_enc.copy_(torch.from_numpy(-(c * c).sum(1) / 2))
    pts, _, _ = grid((-2, 2), (-2, 2), 60)
    probe = np.vstack([x, pts])
    _, idx, _ = model.encode_sparse(torch.from_numpy(probe))
    assert np.array_equal(idx[:, 0].numpy(), km.predict(probe))
    # a per-cell constant decoder (code 1 on the active latent, atoms = centroids) is the k-means autoencoder
    recon = c[idx[:, 0].numpy()[:100]]
    assert np.isclose(np.mean((x - recon) ** 2), km.inertia_ / x.size)
    # and Top-1 labels equal the order-1 power labels with weights ||c||^2 - ||c||^2 = 0 (Voronoi)
    sites, weights = G.topk_sites_weights(model.W_enc, model.b_enc)
    np.testing.assert_allclose(weights, 0, atol=1e-12)


# --- item 1: piecewise affine with constant Jacobian ---------------------------------------------

@pytest.mark.parametrize("activation,k", [("topk", 2), ("relu", None)])
def test_constant_jacobian_on_a_region(activation, k):
    model = random_sae(3, 8, activation=activation, k=k, seed=12)
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(3, generator=g, dtype=torch.float64)
    x1 = x0 + 1e-3 * torch.randn(3, generator=g, dtype=torch.float64)

    def active(x):
        a = model.preacts(x[None])[0]
        return tuple(sorted(a.topk(k).indices.tolist())) if k else tuple((a > 0).nonzero()[:, 0].tolist())

    assert active(x0) == active(x1), "probe points left the region; pick a smaller step"
    S = list(active(x0))
    f = lambda x: model(x[None])[0][0]  # noqa: E731
    J0 = torch.autograd.functional.jacobian(f, x0)
    J1 = torch.autograd.functional.jacobian(f, x1)
    expected = model.atoms[S].T @ model.W_enc[S]
    torch.testing.assert_close(J0, J1)
    torch.testing.assert_close(J0, expected.detach())
    # and the affine form reproduces the output: W_dec[:, S] (W_enc[S] x + b[S]) + b_dec
    out = model.atoms[S].T @ (model.W_enc[S] @ x1 + model.b_enc[S]) + model.b_dec
    torch.testing.assert_close(f(x1), out)


# --- item 5: local PCA on the SAE's regions beats the SAE (Eckart-Young) ---------------------------

@pytest.mark.parametrize("n_features,k", [(2, 1), (6, 2), (10, 3)])
def test_local_pca_on_sae_regions_beats_sae(n_features, k):
    model = random_sae(n_features, 12, k=k, seed=20 + k, bias_scale=0.3)
    x = torch.randn(600, n_features, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    recon = model(x)[0].detach().numpy()
    sae_mse = np.mean((x.numpy() - recon) ** 2)
    labels, _ = G.order_k_labels(x, *G.sae_sites_weights(model)[:2], k)
    fit = G.local_pca(x, labels, k)
    assert fit["mse"] <= sae_mse + 1e-12
    # Eckart-Young per region: no random rank-k affine map on a region does better than local PCA
    rng = np.random.default_rng(0)
    xn = x.numpy()
    for r in np.unique(labels)[:5]:
        pts = xn[labels == r]
        best = np.sum((pts - fit["recon"][labels == r]) ** 2)
        for _ in range(20):
            v = np.linalg.qr(rng.normal(size=(n_features, k)))[0].T
            off = pts.mean(0) + 0.1 * rng.normal(size=n_features)
            alt = off + (pts - off) @ v.T @ v
            assert best <= np.sum((pts - alt) ** 2) + 1e-9


def test_local_pca_rank_and_kflats():
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(size=(50, 3)) * [3, 0.1, 0.1] + 5, rng.normal(size=(50, 3)) * [0.1, 3, 0.1] - 5])
    labels = np.repeat([0, 1], 50)
    fit = G.local_pca(x, labels, 1)
    assert abs(abs(fit["components"][0][0, 0]) - 1) < 0.01 and abs(abs(fit["components"][1][0, 1]) - 1) < 0.01
    assert G.local_pca(x, labels, 3)["mse"] < 1e-20  # full rank is exact
    # K = 0 is k-means: same error as sklearn's Lloyd from the same start; error never increases
    km = G.kflats(x, 2, 0, seed=0)
    assert all(b <= a + 1e-12 for a, b in zip(km["history"], km["history"][1:]))
    sk = KMeans(2, n_init=10, random_state=0).fit(x)
    assert np.isclose(km["mse"], sk.inertia_ / x.size)
    kf = G.kflats(x, 2, 1, seed=0)
    assert all(b <= a + 1e-12 for a, b in zip(kf["history"], kf["history"][1:]))
    assert kf["mse"] <= km["mse"]


# --- item 6: lifting -------------------------------------------------------------------------------

@pytest.mark.parametrize("t0,C", [(0.0, 0.0), (-2.5, 3.0), (1.0, 10.0)])
def test_lifted_voronoi_section_is_power_diagram(t0, C):
    rng = np.random.default_rng(int(10 * C))
    sites = rng.uniform(-1, 1, (15, 2))
    heights = rng.uniform(-1, 1, 15)
    lifted = G.lift(sites, heights)
    pts, _, _ = grid((-2, 2), (-2, 2), 120)
    weights = G.lifted_power_weights(heights, t0, C)
    # distance identity, then labels: nearest lifted site in 3-D == power-nearest site in 2-D
    d3 = ((np.c_[pts, np.full(len(pts), t0)][:, None] - lifted[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d3, G.power_distance(pts, sites, weights) + C, atol=1e-9)
    assert np.array_equal(G.plane_section_labels(lifted, pts, t0), G.power_distance(pts, sites, weights).argmin(1))


def test_power_weights_lift_to_voronoi():
    rng = np.random.default_rng(2)
    sites = rng.uniform(-2, 2, (10, 2))
    weights = rng.uniform(0, 3, 10)
    for t0, A in [(0.0, None), (-1.0, 5.0)]:
        h, A_used = G.lift_heights(weights, t0, A)
        np.testing.assert_allclose(G.lifted_power_weights(h, t0, A_used), weights, atol=1e-12)
        pts, _, _ = grid((-3, 3), (-3, 3), 100)
        assert np.array_equal(G.plane_section_labels(G.lift(sites, h), pts, t0),
                              G.power_distance(pts, sites, weights).argmin(1))
    with pytest.raises(ValueError):
        G.lift_heights(weights, 0.0, A=weights.max() - 1)


def test_3d_voronoi_cells_section_equals_2d_power_cells():
    rng = np.random.default_rng(3)
    sites, heights, t0 = rng.uniform(-1, 1, (12, 2)), rng.uniform(0, 1.5, 12), -0.5
    lifted = G.lift(sites, heights)
    box3 = (-2, 2, -2, 2, -1, 2)
    cells3 = G.power_cells(lifted, np.zeros(12), box3)
    # the halfspace cells equal scipy.spatial.Voronoi's (mirror points): same volumes, each holds its site
    cells_scipy = G.voronoi_cells(lifted, box3)
    for i, v in enumerate(cells3):
        hull = ConvexHull(v)
        assert np.isclose(hull.volume, ConvexHull(cells_scipy[i]).volume, atol=1e-9)
        assert np.all(hull.equations[:, :3] @ lifted[i] + hull.equations[:, 3] <= 1e-9)
    assert np.isclose(sum(ConvexHull(v).volume for v in cells3), 4 * 4 * 3)
    cells2 = G.power_cells(sites, G.lifted_power_weights(heights, t0, 0.0), box3[:4])
    for i in range(12):
        sec = G.section_polygon(cells3[i], t0)
        if cells2[i] is None:
            assert sec is None or G.polygon_area(sec) < 1e-9
            continue
        assert np.isclose(G.polygon_area(sec), G.polygon_area(cells2[i]), atol=1e-9)
        # same vertex set
        dists = np.abs(sec[:, None] - cells2[i][None]).max(-1)
        assert dists.min(1).max() < 1e-8 and dists.min(0).max() < 1e-8


# --- cells, labels -----------------------------------------------------------------------------------

def test_power_cells_match_labels_and_tile_the_box():
    rng = np.random.default_rng(4)
    sites, weights = rng.uniform(-3, 3, (9, 2)), rng.uniform(0, 4, 9)
    weights[0] = -20.0  # a site whose cell is empty
    box = (-4, 4, -4, 4)
    cells = G.power_cells(sites, weights, box)
    areas = [0.0 if c is None else G.polygon_area(c) for c in cells]
    assert np.isclose(sum(areas), 64.0)
    pts, _, _ = grid(box[:2], box[2:], 200)
    lab = G.power_distance(pts, sites, weights).argmin(1)
    frac = np.bincount(lab, minlength=9) / len(pts)
    np.testing.assert_allclose(frac, np.array(areas) / 64.0, atol=0.01)
    assert cells[0] is None and frac[0] == 0


def test_voronoi_cells_scipy_mirror_equals_halfspaces():
    rng = np.random.default_rng(42)
    pts = rng.uniform(-4, 4, (12, 2))
    box = (-4.5, 4.5, -4.5, 4.5)
    a = G.voronoi_cells(pts, box)
    b = G.power_cells(pts, np.zeros(12), box)
    for pa, pb in zip(a, b):
        assert np.isclose(G.polygon_area(pa), G.polygon_area(pb), atol=1e-9)
    with pytest.raises(ValueError):
        G.voronoi_cells(np.array([[5.0, 0.0]]), box)


def test_label_ids_are_lexicographic_and_order_free():
    sets = np.array([[3, 1], [0, 2], [1, 3], [2, 0], [0, 1]])
    ids, uniq = G.label_sets(sets)
    assert uniq.tolist() == [[0, 1], [0, 2], [1, 3]]
    assert ids.tolist() == [2, 1, 2, 1, 0]
    perm = np.array([4, 2, 0, 3, 1])
    ids_p, uniq_p = G.label_sets(sets[perm])
    assert np.array_equal(uniq_p, uniq) and np.array_equal(ids_p, ids[perm])


def test_polytope_faces_and_section_of_a_cube():
    cube = np.array(list(product([0.0, 1.0], repeat=3)))
    faces = G.polytope_faces(cube)
    assert len(faces) == 6 and all(len(f) == 4 for f in faces)
    for f in faces:  # ordered around the facet: consecutive vertices share an edge of the cube
        v = cube[f]
        assert np.allclose(np.abs(v - np.roll(v, -1, axis=0)).sum(1), 1.0)
    sec = G.section_polygon(cube, 0.3)
    assert np.isclose(G.polygon_area(sec), 1.0) and G.section_polygon(cube, 1.5) is None
