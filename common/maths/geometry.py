"""Geometry of SAEs (docs/DESIGN.md, section 2): power distances, power diagrams of any order, SAE -> sites and
weights, clipped cells, lifting to a Voronoi diagram one dimension up, local PCA.

Everything here is a pure function on numpy arrays (torch tensors are accepted and converted; results
are float64 numpy). Shapes: ``x`` (n_samples, n_features); ``sites`` (n_sites, n_features);
``weights`` (n_sites,). Every public function checks its inputs once on entry (``common.infra.data.check_array``
and friends): a wrong shape, a non-numeric dtype, a NaN/Inf value, a label or ``k`` out of range raises a
ValueError naming the argument and what it should be, never a result computed from bad input.

Power distance of x to site i (``p_i``, row i of ``sites``) with weight ``omega_i`` (``weights[i]``):
``pi_i(x) = ||x - p_i||^2 - omega_i``.

An SAE with pre-activations ``a_i(x) = w_i . x + b_i`` has sites ``w_i`` and weights
``omega_i = ||w_i||^2 + 2 b_i``, so that ``pi_i(x) = ||x||^2 - 2 a_i(x)``: the TopK set of x is the
set of its K power-nearest sites (its cell in the order-K power diagram).

Active-set ids (``label_sets``): each row's set of site indices is sorted ascending, the distinct
sorted tuples are ordered lexicographically, and a row's id is the position of its tuple in that
order. The ids therefore depend only on which sets occur, never on the order of the points.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection, Voronoi

from ..infra.data import check_array, check_int, check_scalar


def _np(a, name: str = "array", shape=None, hint: str = "") -> np.ndarray:
    """float64 numpy array of an array or (detached) torch tensor, checked: shape, real dtype, finite."""
    return check_array(a, name, shape, hint=hint)


def _points_sites_weights(x, sites, weights):
    """Checked (x (n_samples, n_features), sites (n_sites, n_features), weights (n_sites,))."""
    x = _np(x, "x", ("n_samples", "n_features"))
    sites = _np(sites, "sites", ("n_sites", x.shape[1]), f" to match x {x.shape}")
    weights = _np(weights, "weights", (sites.shape[0],), f" to match sites {sites.shape}")
    return x, sites, weights


def _sites_weights(sites, weights):
    sites = _np(sites, "sites", ("n_sites", "n_features"))
    return sites, _np(weights, "weights", (sites.shape[0],), f" to match sites {sites.shape}")


def _encoder(W_enc, b_enc):
    W = _np(W_enc, "W_enc", ("n_latents", "n_features"))
    return W, _np(b_enc, "b_enc", (W.shape[0],), f" to match W_enc {W.shape}")


def _box(box, m: int) -> np.ndarray:
    """Checked box (lo_1, hi_1, ..., lo_m, hi_m) as an (m, 2) array with lo < hi."""
    b = _np(box, "box").reshape(-1)
    if b.size != 2 * m:
        raise ValueError(f"box must hold {2 * m} numbers (lo, hi per dimension), got {b.size}")
    b = b.reshape(m, 2)
    if not (b[:, 0] < b[:, 1]).all():
        raise ValueError(f"box must have lo < hi in every dimension, got {b.reshape(-1).tolist()}")
    return b


# --- power distance and labels -----------------------------------------------------------------

def _power_distance(x: np.ndarray, sites: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # expanded form: exact enough in float64 and O(n m) memory instead of O(n m n_features)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        d = (x * x).sum(1)[:, None] - 2.0 * x @ sites.T + (sites * sites).sum(1)[None, :]
        d -= weights[None, :]
    if not np.isfinite(d).all():
        raise ValueError("power distances overflow float64 (inputs of magnitude ~1e154 or more); "
                         "rescale x, sites and weights")
    return d


def power_distance(x, sites, weights) -> np.ndarray:
    """``pi_i(x) = ||x - p_i||^2 - omega_i`` for every point and site: (n_samples, n_sites)."""
    return _power_distance(*_points_sites_weights(x, sites, weights))


def nearest_k(x, sites, weights, k: int, chunk: int = 65536) -> np.ndarray:
    """Indices of the ``k`` power-nearest sites of each point, sorted ascending: (n_samples, k)."""
    x, sites, weights = _points_sites_weights(x, sites, weights)
    k = check_int(k, "k", 1, sites.shape[0], high_name="n_sites")
    chunk = check_int(chunk, "chunk", 1)
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for s in range(0, x.shape[0], chunk):
        d = _power_distance(x[s:s + chunk], sites, weights)
        idx = np.argpartition(d, k - 1, axis=1)[:, :k] if k < sites.shape[0] else np.tile(
            np.arange(k), (d.shape[0], 1))
        out[s:s + chunk] = np.sort(idx, axis=1)
    return out


def label_sets(sets) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids for rows of site indices (n, k): (ids (n,), distinct sorted sets (n_sets, k)).

    Each row is sorted; ids number the distinct sets in lexicographic order (module docstring).
    """
    sets = np.sort(check_array(sets, "sets", ("n", "k"), dtype="int"), axis=1)
    uniq, inverse = np.unique(sets, axis=0, return_inverse=True)
    return inverse.reshape(-1), uniq


def order_k_labels(x, sites, weights, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order-k power-diagram cell of each point: (ids (n,), sets (n_sets, k)).

    ``sets[ids[j]]`` is the sorted tuple of the k sites power-nearest to ``x[j]``; ids as in
    ``label_sets``.
    """
    return label_sets(nearest_k(x, sites, weights, k))


# --- SAE -> sites and weights --------------------------------------------------------------------

def topk_sites_weights(W_enc, b_enc) -> tuple[np.ndarray, np.ndarray]:
    """TopK SAE: sites ``w_i`` (n_latents, n_features), weights ``||w_i||^2 + 2 b_i`` (n_latents,)."""
    W, b = _encoder(W_enc, b_enc)
    return W.copy(), (W * W).sum(1) + 2.0 * b


def topk_abs_sites_weights(W_enc, b_enc) -> tuple[np.ndarray, np.ndarray]:
    """topk_abs SAE: 2d sites ``[w_1..w_d, -w_1..-w_d]`` and weights ``||w_i||^2 +- 2 b_i``.

    Site i < d stands for latent i selected with a positive pre-activation, site d + i for latent i
    selected with a negative one (``pi = ||x||^2 -+ 2 a_i``); the K nearest sites are the K entries of
    largest |a_i| (K <= d), each with its sign.
    """
    W, b = _encoder(W_enc, b_enc)
    sq = (W * W).sum(1)
    return np.vstack([W, -W]), np.concatenate([sq + 2.0 * b, sq - 2.0 * b])


def relu_sites_weights(W_enc, b_enc, patterns) -> tuple[np.ndarray, np.ndarray]:
    """ReLU SAE: pattern q in {0,1}^d (rows of ``patterns`` (n_patterns, d)) has site ``W_enc^T q``
    and weight ``||W_enc^T q||^2 + 2 b^T q``; the cell of x is its pattern ``q = [a(x) > 0]``."""
    W, b = _encoder(W_enc, b_enc)
    q = _np(patterns, "patterns", ("n_patterns", W.shape[0]), f" (one 0/1 entry per latent of W_enc {W.shape})")
    if not np.isin(q, (0.0, 1.0)).all():
        raise ValueError("patterns must hold only 0 and 1 (which latents are active)")
    sites = q @ W
    return sites, (sites * sites).sum(1) + 2.0 * q @ b


def ksubset_sites_weights(W_enc, b_enc, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-order form of a TopK SAE's order-k diagram: one cell per k-subset S of the latents.

    Returns (subsets (C, k) in lexicographic order, sites ``sum_{i in S} w_i`` (C, n_features), weights
    ``||sum w_i||^2 + 2 sum b_i`` (C,)); the power-nearest subset of x is its TopK set.
    """
    W, b = _encoder(W_enc, b_enc)
    k = check_int(k, "k", 1, W.shape[0], high_name="n_latents")
    subsets = np.array(list(combinations(range(W.shape[0]), k)), dtype=np.int64)
    sites = W[subsets].sum(1)
    return subsets, sites, (sites * sites).sum(1) + 2.0 * b[subsets].sum(1)


def order_k_sites_weights(sites, weights, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-order form of any order-k power diagram: (subsets (C, k), sites (C, m), weights (C,)).

    ``sum_{i in S} pi_i(x) / k = ||x - mean_S p||^2 - (||mean_S p||^2 - mean_S(||p_i||^2 - omega_i))``,
    so cell S of the order-k diagram is the power cell of site ``mean_S p`` with that weight.
    """
    sites, weights = _sites_weights(sites, weights)
    k = check_int(k, "k", 1, sites.shape[0], high_name="n_sites")
    subsets = np.array(list(combinations(range(sites.shape[0]), k)), dtype=np.int64)
    centre = sites[subsets].mean(1)
    offset = ((sites * sites).sum(1) - weights)[subsets].mean(1)
    return subsets, centre, (centre * centre).sum(1) - offset


def sae_sites_weights(model) -> tuple[np.ndarray, np.ndarray, int]:
    """(sites, weights, order) of a TopK ``common.maths.sae.SAE``: its regions are the order-``k`` cells.

    ``topk`` and ``topk_relu`` use ``topk_sites_weights`` (for ``topk_relu`` the selected set is the
    cell; ReLU may further zero some of its codes); ``topk_abs`` uses the 2d signed sites. The bias is
    ``model.encoder_bias`` (b_enc - W_enc centre for a centred model).
    """
    b = model.encoder_bias.detach()
    if model.act.regions == "order_k":
        s, w = topk_sites_weights(model.W_enc.detach(), b)
    elif model.act.regions == "order_k_signed":
        s, w = topk_abs_sites_weights(model.W_enc.detach(), b)
    else:
        raise ValueError(f"sae_sites_weights needs a TopK activation, got {model.activation!r}; "
                         "for its activation patterns use sae_pattern_sites_weights")
    return s, w, int(model.k)


def sae_pattern_sites_weights(model, patterns) -> tuple[np.ndarray, np.ndarray]:
    """(sites, weights) of activation patterns (rows of ``patterns`` (n_patterns, n_latents)) of a ``common.maths.sae.SAE``
    whose regions are activation patterns: ``relu_sites_weights`` with the bias ``b'`` for which code i is
    non-zero exactly when ``w_i . x + b'_i > 0``: relu ``encoder_bias``; jumprelu and batchtopk (at inference)
    ``encoder_bias - threshold`` (docs/DESIGN.md 2.3, 2.7). The cell of x is its pattern ``[z(x) != 0]``."""
    threshold = None if model.threshold is None else model.threshold.detach()
    bias = model.act.pattern_bias(model.encoder_bias.detach(), threshold)
    return relu_sites_weights(model.W_enc.detach(), bias.expand(model.n_latents), patterns)


# --- cells as polytopes ----------------------------------------------------------------------------

def _box_halfspaces(box: np.ndarray) -> np.ndarray:
    """Halfspaces [A; c] (A x + c <= 0) of a checked box (m, 2) of (lo, hi) rows."""
    m = box.shape[0]
    eye = np.eye(m)
    return np.vstack([np.c_[eye, -box[:, 1]], np.c_[-eye, box[:, 0]]])


def _order_polygon(v: np.ndarray) -> np.ndarray:
    """Vertices of a convex polygon (p, 2), counter-clockwise."""
    c = v.mean(0)
    return v[np.argsort(np.arctan2(v[:, 1] - c[1], v[:, 0] - c[0]))]


def _dedupe(v: np.ndarray, tol: float) -> np.ndarray:
    keep = []
    for p in v:
        if all(np.abs(p - q).max() > tol for q in keep):
            keep.append(p)
    return np.array(keep)


def power_cells(sites, weights, box, tol: float = 1e-9) -> list:
    """The power cell of every site clipped to an axis-aligned box, in any dimension m.

    ``box`` = (lo_1, hi_1, ..., lo_m, hi_m). Cell i = {x in box : pi_i(x) <= pi_j(x) for all j}, computed
    by halfspace intersection (scipy/Qhull) from a Chebyshev centre. Returns a list over sites of vertex
    arrays (p_i, m) (for m = 2 ordered counter-clockwise) or None when the cell misses the box or has
    no interior (a power cell can be empty).
    """
    sites, weights = _sites_weights(sites, weights)
    m = sites.shape[1]
    bound = _box_halfspaces(_box(box, m))
    tol = check_scalar(tol, "tol", low=0.0)
    const = (sites * sites).sum(1) - weights
    cells = []
    for i in range(sites.shape[0]):
        # pi_i <= pi_j  <=>  2 (p_j - p_i) . x + const_i - const_j <= 0
        A = 2.0 * (sites - sites[i])
        c = const[i] - const
        same = np.abs(A).max(1) <= tol
        if np.any(same & (c > tol)):  # a coincident site with a larger weight takes the whole cell
            cells.append(None)
            continue
        hs = np.vstack([np.c_[A[~same], c[~same]], bound])
        norms = np.linalg.norm(hs[:, :-1], axis=1)
        # Chebyshev centre: maximise r subject to A x + r ||A|| <= -c
        res = linprog(np.r_[np.zeros(m), -1.0], A_ub=np.c_[hs[:, :-1], norms], b_ub=-hs[:, -1],
                      bounds=[(None, None)] * m + [(0, None)], method="highs")
        if res.status != 0 or res.x[-1] <= 1e-9:
            cells.append(None)
            continue
        v = _dedupe(HalfspaceIntersection(hs, res.x[:m]).intersections, 1e-9)
        cells.append(_order_polygon(v) if m == 2 else v)
    return cells


def voronoi_cells(points, box) -> list:
    """Voronoi cells of ``points`` (n, m), all strictly inside ``box`` = (lo_1, hi_1, ..., lo_m, hi_m),
    clipped to the box, via scipy.spatial.Voronoi with the points mirrored in the 2m faces of the box
    (the mirrored diagram's cells of the original points are exactly the clipped cells).

    Returns a list of vertex arrays (p_i, m), counter-clockwise polygons when m = 2.
    """
    p = _np(points, "points", ("n_points", "m"))
    bounds = _box(box, p.shape[1])
    inside = ((p > bounds[:, 0]) & (p < bounds[:, 1])).all(1)
    if not inside.all():
        raise ValueError(f"voronoi_cells needs every point strictly inside the box {tuple(box)}; "
                         f"{int((~inside).sum())} are not (use power_cells with zero weights)")
    mirrors = []
    for dim, (lo, hi) in enumerate(bounds):
        for edge in (lo, hi):
            q = p.copy()
            q[:, dim] = 2 * edge - p[:, dim]
            mirrors.append(q)
    vor = Voronoi(np.vstack([p] + mirrors))
    cells = []
    for i in range(p.shape[0]):
        region = vor.regions[vor.point_region[i]]
        if -1 in region or not region:
            raise RuntimeError(f"Voronoi cell of point {i} is unbounded despite the mirror points")
        v = vor.vertices[region]
        cells.append(_order_polygon(v) if p.shape[1] == 2 else v)
    return cells


def polytope_faces(vertices) -> list:
    """Facets of a convex 3-D polytope given by its vertices (p, 3): a list of vertex-index arrays, each
    ordered around its facet (coplanar hull triangles merged)."""
    v = _np(vertices, "vertices", ("n_vertices", 3))
    hull = ConvexHull(v)
    faces = []
    eq = np.round(hull.equations, 9)
    for key in np.unique(eq, axis=0):
        tri = np.where((eq == key).all(1))[0]
        idx = np.unique(hull.simplices[tri])
        normal = key[:3]
        pts = v[idx]
        # order around the facet centre in the facet's own 2-D frame
        u = np.cross(normal, [1.0, 0, 0] if abs(normal[0]) < 0.9 else [0, 1.0, 0])
        u /= np.linalg.norm(u)
        w = np.cross(normal, u)
        rel = pts - pts.mean(0)
        faces.append(idx[np.argsort(np.arctan2(rel @ w, rel @ u))])
    return faces


def section_polygon(vertices, t0: float, axis: int = -1, tol: float = 1e-12):
    """Section of a convex polytope (vertices (p, m+1)) by the plane ``x[axis] = t0``: the section's
    vertices (q, m) with the ``axis`` coordinate dropped (ordered counter-clockwise when m = 2), or
    None if the plane misses it. Every segment between two vertices lies in the polytope, so the
    section is the convex hull of those segments' crossings."""
    v = _np(vertices, "vertices", ("n_vertices", "m + 1"))
    t0 = check_scalar(t0, "t0")
    axis = check_int(axis, "axis", -v.shape[1], v.shape[1] - 1)
    tol = check_scalar(tol, "tol", low=0.0)
    t = v[:, axis] - t0
    rest = np.delete(v, axis % v.shape[1], axis=1)
    pts = [rest[j] for j in np.where(np.abs(t) <= tol)[0]]
    for a, b in combinations(range(v.shape[0]), 2):
        if t[a] * t[b] < 0:
            s = t[a] / (t[a] - t[b])
            pts.append(rest[a] + s * (rest[b] - rest[a]))
    if len(pts) < rest.shape[1] + 1:
        return None
    pts = np.array(pts)
    hull = ConvexHull(pts)
    q = pts[hull.vertices]
    return _order_polygon(q) if q.shape[1] == 2 else q


def polygon_area(poly) -> float:
    """Area of a simple polygon (p, 2) (shoelace)."""
    p = _np(poly, "poly", ("n_vertices", 2))
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --- lifting (docs/DESIGN.md, section 2, item 6) -------------------------------------------------------------

def lift(sites, heights) -> np.ndarray:
    """Sites (n_sites, m) and heights (n_sites,) -> lifted sites (n_sites, m + 1), height last."""
    sites = _np(sites, "sites", ("n_sites", "m"))
    return np.c_[sites, _np(heights, "heights", (sites.shape[0],), f" to match sites {sites.shape}")]


def lifted_power_weights(heights, t0: float = 0.0, C: float = 0.0) -> np.ndarray:
    """Weights ``omega_i = C - (h_i - t0)^2`` of the power diagram cut out of the lifted Voronoi
    diagram by the plane t = t0: ``||(x, t0) - (p_i, h_i)||^2 = pi_i(x) + C``."""
    h = _np(heights, "heights", ("n_sites",))
    return check_scalar(C, "C") - (h - check_scalar(t0, "t0")) ** 2


def lift_heights(weights, t0: float = 0.0, A: float | None = None) -> tuple[np.ndarray, float]:
    """Heights ``h_i = t0 + sqrt(A - omega_i)`` realising power weights omega_i <= A as a lifted
    Voronoi diagram (``A`` defaults to max omega). Returns (heights (n_sites,), A); then
    ``lifted_power_weights(h, t0, C=A) == weights``."""
    weights = _np(weights, "weights", ("n_sites",))
    if weights.size == 0:
        raise ValueError("weights must have shape (n_sites,) with n_sites >= 1, got (0,)")
    t0 = check_scalar(t0, "t0")
    A = float(weights.max()) if A is None else check_scalar(A, "A")
    if np.any(weights > A + 1e-12):
        raise ValueError(f"every weight must be <= A={A}; the largest is {weights.max()}")
    return t0 + np.sqrt(np.maximum(A - weights, 0.0)), A


def plane_section_labels(lifted_sites, x, t0: float = 0.0) -> np.ndarray:
    """Index of the lifted site (n_sites, m + 1) nearest (Euclidean, in R^(m+1)) to each (x, t0):
    the Voronoi cell of the lifted diagram that the plane t = t0 meets at x. (n_samples,)."""
    L = _np(lifted_sites, "lifted_sites", ("n_sites", "m + 1"))
    if L.shape[0] == 0 or L.shape[1] < 2:
        raise ValueError(f"lifted_sites must have shape (n_sites, m + 1) with n_sites >= 1 and m >= 1, "
                         f"got {L.shape}")
    x = _np(x, "x", ("n_samples", L.shape[1] - 1), f" (one less column than lifted_sites {L.shape})")
    pts = np.c_[x, np.full(x.shape[0], check_scalar(t0, "t0"))]
    d = (pts * pts).sum(1)[:, None] - 2.0 * pts @ L.T + (L * L).sum(1)[None, :]
    return d.argmin(1)


# --- local PCA and the K-flats alternation (docs/DESIGN.md, section 2, item 5) --------------------------------

def _labels(labels, n: int, n_labels: int | None, name: str = "labels") -> np.ndarray:
    """Checked integer labels (n,) in 0..n_labels - 1 (any label >= 0 when n_labels is None)."""
    labels = check_array(labels, name, (n,), dtype="int", hint=" (one per row of x)")
    high = None if n_labels is None else n_labels - 1
    bad = (labels < 0) if high is None else ((labels < 0) | (labels > high))
    if bad.any():
        j = int(np.argmax(bad))
        need = "0..n_labels - 1 = 0.." + str(high) if high is not None else ">= 0"
        raise ValueError(f"{name} must be in {need}; {int(bad.sum())} are not (first: {name}[{j}] = {labels[j]})")
    return labels


def local_pca(x, labels, rank: int, n_labels: int | None = None) -> dict:
    """Per-region mean plus top-``rank`` principal directions: the best affine map of rank <= rank on
    each region (Eckart-Young).

    ``labels`` (n,) integers in 0..n_labels - 1; ``n_labels`` defaults to labels.max() + 1.
    Returns {recon (n, n_features), means (n_labels, n_features), components: list of (r_l, n_features)
    orthonormal rows, mse: mean over samples and features of (x - recon)^2}; regions without points get a
    NaN mean and no components.
    """
    x = _np(x, "x", ("n_samples", "n_features"))
    if n_labels is not None:
        n_labels = check_int(n_labels, "n_labels", 1)
    labels = _labels(labels, x.shape[0], n_labels)
    rank = check_int(rank, "rank", 0)
    return _local_pca(x, labels, rank, n_labels)


def _local_pca(x: np.ndarray, labels: np.ndarray, rank: int, n_labels: int | None = None) -> dict:
    n_regions = n_labels if n_labels is not None else (int(labels.max()) + 1 if labels.size else 0)
    recon = np.empty_like(x)
    means = np.full((n_regions, x.shape[1]), np.nan)
    comps = []
    for r in range(n_regions):
        idx = np.where(labels == r)[0]
        if idx.size == 0:
            comps.append(np.zeros((0, x.shape[1])))
            continue
        mean = x[idx].mean(0)
        centred = x[idx] - mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        v = vt[:min(rank, vt.shape[0])]
        recon[idx] = mean + centred @ v.T @ v
        means[r] = mean
        comps.append(v)
    return {"recon": recon, "means": means, "components": comps,
            "mse": float(np.mean((x - recon) ** 2))}


def flat_residuals(x, means, components) -> np.ndarray:
    """Squared distance of each point to each affine flat ``mean_l + span(components_l)``: (n, L).

    ``means`` (L, n_features), ``components`` a list of L arrays (r_l, n_features)."""
    x = _np(x, "x", ("n_samples", "n_features"))
    means = _np(means, "means", ("n_flats", x.shape[1]), f" to match x {x.shape}")
    if len(components) != means.shape[0]:
        raise ValueError(f"components must be a list of {means.shape[0]} arrays (one per row of means "
                         f"{means.shape}), got {len(components)}")
    comps = [_np(v, f"components[{j}]", ("rank", x.shape[1]), f" to match x {x.shape}")
             for j, v in enumerate(components)]
    return _flat_residuals(x, means, comps)


def _flat_residuals(x: np.ndarray, means: np.ndarray, components: list) -> np.ndarray:
    out = np.empty((x.shape[0], len(components)))
    for j, (m, v) in enumerate(zip(means, components)):
        c = x - m
        out[:, j] = (c * c).sum(1) - ((c @ v.T) ** 2).sum(1)
    return out


def kflats(x, n_flats: int, rank: int, n_iter: int = 100, seed: int = 0, init_labels=None) -> dict:
    """k-means-like alternation: assign each point to its nearest rank-``rank`` affine flat, refit
    local PCA on the new regions; ``rank = 0`` is Lloyd's k-means. The error never increases.

    ``init_labels``: (n,) integers in 0..n_flats - 1 (default: uniform random with ``seed``).
    Returns {labels (n,), recon, means, components, mse, history: mse after each refit}.
    """
    x = _np(x, "x", ("n_samples", "n_features"))
    n_flats = check_int(n_flats, "n_flats", 1)
    rank = check_int(rank, "rank", 0)
    n_iter = check_int(n_iter, "n_iter", 0)
    rng = np.random.default_rng(seed)
    labels = (rng.integers(0, n_flats, x.shape[0]) if init_labels is None
              else _labels(init_labels, x.shape[0], n_flats, "init_labels").copy())
    fit = _local_pca(x, labels, rank)
    history = [fit["mse"]]
    for _ in range(n_iter):
        means, comps = fit["means"], fit["components"]
        live = [j for j in range(len(comps)) if not np.isnan(means[j]).any()]
        res = _flat_residuals(x, means[live], [comps[j] for j in live])
        new = np.asarray(live)[res.argmin(1)]
        # keep the current flat on ties so the error cannot go up through tie-breaking
        cur = res[np.arange(x.shape[0]), np.searchsorted(live, labels)]
        new = np.where(res.min(1) < cur - 1e-12, new, labels)
        if np.array_equal(new, labels):
            break
        labels = new
        fit = _local_pca(x, labels, rank)
        history.append(fit["mse"])
    return {**fit, "labels": labels, "history": history}
