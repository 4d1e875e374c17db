"""Geometry functions (docs/DESIGN.md, section 2) against independent brute-force computations.

The statements themselves (piecewise affinity, TopK / topk_abs / ReLU regions are power cells, k-means as
Top-1 and its autoencoder, lifting, k-flats optimality) are common/maths/theory.py's checks: the claims report
runs them and tests/test_theory.py pins them with negative controls. Where a test here is the same check,
it calls common/maths/theory.py; the rest test what those checks do not cover.
"""
from itertools import combinations, product

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull
from sklearn.cluster import KMeans

from common.infra.data import grid
from common.maths import geometry as G
from common.maths import theory as T
from common.maths.sae import SAE


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
    assert T.check_topk_abs(np.random.default_rng(5), 600, n_features=4, n_latents=10, k=k) == (600, 600)
    sites, weights, order = G.sae_sites_weights(random_sae(4, 10, activation="topk_abs", k=k, seed=5))
    assert sites.shape == (20, 4) and weights.shape == (20,) and order == k


def test_relu_cells_are_power_cells_of_patterns():
    assert T.check_relu(np.random.default_rng(8), 800, n_features=3, n_latents=6) == (800, 800)


# --- item 7: thresholded activations are ReLU patterns with shifted biases -------------------------

ALL_PATTERNS = np.array(list(product([0, 1], repeat=7)), dtype=float)


def power_cell_patterns(x, sites, weights):
    return ALL_PATTERNS[G.power_distance(x, sites, weights).argmin(1)]


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_thresholded_patterns_are_power_cells_with_shifted_biases(activation):
    """docs/DESIGN.md 2.7: the pattern [z(x) != 0] is x's power cell among all 2^d patterns with the biases
    encoder_bias - theta (jumprelu: per latent; batchtopk at inference: one theta); with the unshifted biases
    (plain ReLU's cells) it is not."""
    model = random_sae(3, 7, activation=activation, k=2, seed=30)
    model.set_centre(torch.full((3,), 0.3, dtype=torch.float64))
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        model.threshold.copy_(torch.rand(model.threshold.shape, generator=g, dtype=torch.float64) + 0.2)
    x = 1.5 * torch.randn(800, 3, generator=g, dtype=torch.float64)
    q = (model.encode(x) != 0).double().numpy()
    cells = power_cell_patterns(x, *G.sae_pattern_sites_weights(model, ALL_PATTERNS))
    assert (cells == q).all()
    shifted = model.encoder_bias.detach() - model.threshold.detach()  # the sites and weights by hand (2.3)
    sites = ALL_PATTERNS @ model.W_enc.detach().numpy()
    weights = (sites * sites).sum(1) + 2 * ALL_PATTERNS @ shifted.expand(7).numpy()
    np.testing.assert_allclose(G.sae_pattern_sites_weights(model, ALL_PATTERNS)[1], weights, rtol=1e-12)
    relu_cells = power_cell_patterns(x, *G.relu_sites_weights(model.W_enc, model.encoder_bias, ALL_PATTERNS))
    assert (relu_cells != q).any(1).mean() > 0.2  # the shift matters


def test_batchtopk_training_pattern_is_a_shifted_power_cell_of_the_batch():
    """In training a BatchTopK batch keeps a_i(x_r) > t, t the largest value it did not keep: the same cells with
    theta = t for every latent (docs/DESIGN.md 2.7)."""
    model = random_sae(3, 7, activation="batchtopk", k=2, seed=32)
    x = 1.5 * torch.randn(50, 3, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    codes = model.forward_train(x).codes.detach()
    q = (codes != 0).double().numpy()
    assert q.sum() == 2 * 50
    t = model.preacts(x).detach().clamp(min=0)[codes == 0].max()
    sites, weights = G.relu_sites_weights(model.W_enc, model.encoder_bias - t, ALL_PATTERNS)
    assert (power_cell_patterns(x, sites, weights) == q).all()


def test_relu_patterns_through_the_table_are_the_unshifted_cells():
    assert T.check_relu(np.random.default_rng(8), 300, n_features=3, n_latents=6) == (300, 300)
    model = random_sae(3, 7, activation="relu", seed=34)
    x = 1.5 * torch.randn(400, 3, generator=torch.Generator().manual_seed(35), dtype=torch.float64)
    cells = power_cell_patterns(x, *G.sae_pattern_sites_weights(model, ALL_PATTERNS))
    assert (cells == (model.encode(x) != 0).double().numpy()).all()
    with pytest.raises(ValueError, match="sae_pattern_sites_weights"):
        G.sae_sites_weights(model)
    with pytest.raises(ValueError, match="regions 'order_k', not activation patterns"):
        G.sae_pattern_sites_weights(random_sae(3, 7, k=2), ALL_PATTERNS)


# --- item 4: k-means is the Top-1 special case ---------------------------------------------------

def test_top1_with_centroid_sites_is_kmeans():
    rng = np.random.default_rng(0)
    assert T.check_kmeans(rng, 500, n_features=2, n_centroids=3) == (500, 500)
    # a per-cell constant code decoded with atoms = centroids is the k-means autoencoder
    assert T.check_kmeans_autoencoder(rng, 300, n_features=2, n_centroids=3) == (301, 301)
    # and the Top-1 power weights ||c||^2 + 2 (-||c||^2 / 2) are all 0: the order-1 diagram is Voronoi
    model = T.kmeans_sae(rng.normal(size=(4, 2)))
    np.testing.assert_allclose(G.topk_sites_weights(model.W_enc, model.b_enc)[1], 0, atol=1e-12)


# --- item 1: piecewise affine with constant Jacobian ---------------------------------------------

def test_constant_jacobian_on_a_region():
    assert T.check_jacobian(np.random.default_rng(12), 300, n_features=3, n_latents=8, k=2) == (300, 300)
    assert T.check_relu_jacobian(np.random.default_rng(12), 300, n_features=3, n_latents=8) == (300, 300)


# --- item 5: local PCA on the SAE's regions beats the SAE (Eckart-Young) ---------------------------
# An implementation test, not evidence for the paper: it cannot fail for a correct local_pca (so it is
# not a theory claim); k-flats optimality itself is common/maths/theory.py's T7.

@pytest.mark.parametrize("n_features,k", [(2, 1), (6, 2), (10, 3)])
def test_local_pca_on_sae_regions_beats_sae(n_features, k):
    model = random_sae(n_features, 12, k=k, seed=20 + k, bias_scale=0.3)
    x = torch.randn(600, n_features, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    recon = model(x)[0].detach().numpy()
    sae_mse = np.mean((x.numpy() - recon) ** 2)
    labels, _ = G.order_k_labels(x, *G.sae_sites_weights(model)[:2], k)
    fit = G.local_pca(x, labels, k)
    assert fit["mse"] <= sae_mse + 1e-12
    # that no rank-k affine flat does better on a region (random flats, local optimisation) is T7


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
    # the distance identity behind the lifting (the labels are theory check T6, below)
    d3 = ((np.c_[pts, np.full(len(pts), t0)][:, None] - lifted[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d3, G.power_distance(pts, sites, weights) + C, atol=1e-9)


@pytest.mark.parametrize("n_features,n_sites", [(2, 15), (3, 6)])
def test_lifted_section_labels_are_power_labels(n_features, n_sites):
    assert T.check_lifting(np.random.default_rng(n_sites), 1000, n_features=n_features, n_sites=n_sites) == (
        2000, 2000)


def test_power_weights_lift_to_voronoi():
    rng = np.random.default_rng(2)
    rng.uniform(-2, 2, (10, 2))  # sites are not needed here; drawn so that the weights stay those of this seed
    weights = rng.uniform(0, 3, 10)
    for t0, A in [(0.0, None), (-1.0, 5.0)]:
        h, A_used = G.lift_heights(weights, t0, A)
        np.testing.assert_allclose(G.lifted_power_weights(h, t0, A_used), weights, atol=1e-12)
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


# --- input checks: bad input raises a ValueError naming the argument, never a plausible answer ------

def test_nan_point_raises_instead_of_getting_a_label():
    rng = np.random.default_rng(0)
    x, sites, weights = rng.normal(size=(20, 3)), rng.normal(size=(6, 3)), rng.normal(size=6)
    x[7, 2] = np.nan
    for call in (lambda: G.power_distance(x, sites, weights), lambda: G.nearest_k(x, sites, weights, 2),
                 lambda: G.order_k_labels(x, sites, weights, 2), lambda: G.local_pca(x, np.zeros(20, int), 1),
                 lambda: G.kflats(x, 2, 0), lambda: G.plane_section_labels(G.lift(sites, weights), x)):
        with pytest.raises(ValueError, match=r"x holds 1 NaN/Inf value\(s\) \(first at index \(7, 2\)\)"):
            call()
    x[7, 2] = 0.0
    bad_w = weights.copy()
    bad_w[1] = np.inf
    with pytest.raises(ValueError, match="weights holds 1 NaN/Inf"):
        G.nearest_k(x, sites, bad_w, 2)
    with pytest.raises(ValueError, match=r"W_enc holds 1 NaN/Inf value\(s\) \(first at index \(5, 0\)\)"):
        G.topk_sites_weights(np.r_[sites[:5], [[np.nan, 0, 0]]], weights)
    with pytest.raises(ValueError, match="power distances overflow"):  # finite inputs, overflowing result
        G.nearest_k(x * 1e160, sites, weights, 2)


def test_local_pca_rejects_labels_out_of_range():
    x = np.random.default_rng(1).normal(size=(12, 3))
    labels = np.repeat([0, 1, 2], 4)
    labels[5] = -1  # e.g. "no region": previously returned an uninitialised recon row and counted it in mse
    with pytest.raises(ValueError, match=r"labels must be in >= 0; 1 are not \(first: labels\[5\] = -1\)"):
        G.local_pca(x, labels, 1)
    labels[5] = 3
    with pytest.raises(ValueError, match=r"labels must be in 0..n_labels - 1 = 0..2; .*labels\[5\] = 3"):
        G.local_pca(x, labels, 1, n_labels=3)
    fit = G.local_pca(x, labels, 1, n_labels=5)  # explicit n_labels: empty regions get NaN means
    assert fit["means"].shape == (5, 3) and np.isnan(fit["means"][4]).all() and np.isfinite(fit["recon"]).all()
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\) \(one per row of x\), got \(11,\)"):
        G.local_pca(x, labels[:11], 1)
    with pytest.raises(ValueError, match="labels must hold integers"):
        G.local_pca(x, labels + 0.5, 1)
    with pytest.raises(ValueError, match="rank must be an int with 0 <= rank"):
        G.local_pca(x, labels, -1)
    with pytest.raises(ValueError, match=r"init_labels must be in 0..n_labels - 1 = 0..1"):
        G.kflats(x, 2, 0, init_labels=np.repeat([0, 1, 2], 4))


def test_k_out_of_range_raises():
    rng = np.random.default_rng(2)
    W, b, x = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(4, 3))
    sites, weights = G.topk_sites_weights(W, b)
    for k in (0, 6, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n_sites = 5"):
            G.nearest_k(x, sites, weights, k)
        with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n_sites = 5"):
            G.order_k_labels(x, sites, weights, k)
        with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n_latents = 5"):
            G.ksubset_sites_weights(W, b, k)
        with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n_sites = 5"):
            G.order_k_sites_weights(sites, weights, k)
    assert G.ksubset_sites_weights(W, b, np.int64(5))[0].shape == (1, 5)


def test_mismatched_shapes_name_both_arrays():
    rng = np.random.default_rng(3)
    x, sites, weights = rng.normal(size=(10, 3)), rng.normal(size=(5, 4)), rng.normal(size=5)
    with pytest.raises(ValueError, match=r"sites must have shape \(n_sites, 3\) to match x \(10, 3\), got \(5, 4\)"):
        G.power_distance(x, sites, weights)
    with pytest.raises(ValueError, match=r"weights must have shape \(5,\) to match sites \(5, 4\), got \(4,\)"):
        G.nearest_k(rng.normal(size=(2, 4)), sites, weights[:4], 1)
    with pytest.raises(ValueError, match=r"x must have shape \(n_samples, n_features\), got \(3,\)"):
        G.nearest_k(x[0], sites[:, :3], weights, 1)
    with pytest.raises(ValueError, match=r"b_enc must have shape \(5,\) to match W_enc \(5, 4\), got \(3,\)"):
        G.topk_sites_weights(sites, weights[:3])
    with pytest.raises(ValueError, match=r"patterns must have shape \(n_patterns, 5\)"):
        G.relu_sites_weights(sites, weights, np.ones((2, 4)))
    with pytest.raises(ValueError, match="patterns must hold only 0 and 1"):
        G.relu_sites_weights(sites, weights, np.full((2, 5), 0.5))
    with pytest.raises(ValueError, match=r"x must have shape \(n_samples, 2\) \(one less column than lifted_sites"):
        G.plane_section_labels(G.lift(sites[:, :2], weights), x)
    with pytest.raises(ValueError, match=r"box must have lo < hi"):
        G.power_cells(sites[:, :2], weights, (1, -1, -1, 1))
    with pytest.raises(ValueError, match=r"sets must hold integers"):
        G.label_sets(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"means must have shape \(n_flats, 3\) to match x \(10, 3\)"):
        G.flat_residuals(x, np.zeros((2, 4)), [np.zeros((1, 4))] * 2)
