"""Figure 5: from Voronoi to power diagrams, in four panels.

(a) the Voronoi diagram of 12 random sites in [-4, 4]^2 (scipy.spatial.Voronoi, cells bounded by the
view box); (b) 1-nearest-neighbour classification with 3 random classes (its boundaries are Voronoi
edges); (c) k-means (k = 3) on 200 points from three Gaussian blobs (the clusters are the Voronoi
cells of the centroids); (d) the power diagram of the same 12 sites with weights U(0.5, 2.5), each
site's circle of the true radius sqrt(weight). Rasters are drawn without interpolation (labels
never blend); cell outlines are exact polygons.

    python fig_5_voronoi_knn_kmeans_power_evolution.py [--quick] [--out DIR] [--seed N]
"""
import sys

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, Polygon
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from common.experiments import plotting
from common.experiments.config import above, at_least, box, configure, each, finite, satisfies
from common.infra.data import grid
from common.maths import geometry as G

SEED = 42
N_SITES = 12
SITE_LOW, SITE_HIGH = -4.0, 4.0
N_CLASSES = 3
WEIGHT_LOW, WEIGHT_HIGH = 0.5, 2.5
N_KMEANS_POINTS = 200
BLOB_CENTERS = (-2.0, -2.0, 2.0, -2.0, 0.0, 0.0)   # three unit Gaussian blobs (x, y pairs)
N_CLUSTERS = 3
VIEW = (-4.5, 4.5, -4.5, 4.5)
GRID_RES = 450

ACCEPT = {  # what each constant accepts: checked by configure() before any work (common/experiments/config.py)
    "SEED": at_least(0),
    "N_SITES": at_least(4),                 # scipy's Voronoi needs 4 sites in 2-D
    "SITE_LOW": finite(),
    "SITE_HIGH": above("SITE_LOW"),
    "N_CLASSES": at_least(1),
    "WEIGHT_LOW": at_least(0),              # circles of radius sqrt(weight)
    "WEIGHT_HIGH": above("WEIGHT_LOW"),
    "N_KMEANS_POINTS": at_least("N_CLUSTERS"),
    "BLOB_CENTERS": each(finite(), distinct=False) & satisfies(lambda v, c: len(v) % 2 == 0, "x, y pairs"),
    "N_CLUSTERS": at_least(1),
    "VIEW": box("x", "y"),
    "GRID_RES": at_least(2),
}

QUICK = dict(GRID_RES=80)


def _outline(ax, poly, **kw):
    ax.add_patch(Polygon(poly, closed=True, fill=False, **kw))


def _finish(ax, title):
    plotting.finish_map(ax, VIEW, title, title_size=12)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    rng = np.random.default_rng(run.seed_for("sites"))
    sites = rng.uniform(SITE_LOW, SITE_HIGH, (N_SITES, 2))
    classes = rng.integers(0, N_CLASSES, N_SITES)
    weights = rng.uniform(WEIGHT_LOW, WEIGHT_HIGH, N_SITES)
    blobs = np.asarray(BLOB_CENTERS).reshape(-1, 2)
    rng_b = np.random.default_rng(run.seed_for("blobs"))
    which = np.arange(N_KMEANS_POINTS) * len(blobs) // N_KMEANS_POINTS
    data = blobs[which] + rng_b.normal(size=(N_KMEANS_POINTS, 2))

    pts, shape, extent = grid(VIEW[:2], VIEW[2:], GRID_RES)
    site_cols = plotting.label_colors(N_SITES)
    class_cols = plotting.label_colors(2 * N_CLASSES)[::2]  # tab20's saturated half: tab10

    # (a) Voronoi cells from scipy (bounded by mirroring the sites in the view box)
    vor = G.voronoi_cells(sites, VIEW)
    vor_labels = G.power_distance(pts, sites, np.zeros(N_SITES)).argmin(1)
    # (b) 1-NN classification
    knn = KNeighborsClassifier(n_neighbors=1).fit(sites, classes)
    knn_grid = knn.predict(pts)
    # (c) k-means
    km = KMeans(n_clusters=N_CLUSTERS, init="k-means++", n_init=10, random_state=run.seed_for("kmeans")).fit(data)
    km_grid = km.predict(pts)
    km_cells = G.power_cells(km.cluster_centers_, np.zeros(N_CLUSTERS), VIEW)
    # (d) power diagram: raster from power distances, outlines from halfspace intersection
    pow_grid = G.power_distance(pts, sites, weights).argmin(1)
    pow_cells = G.power_cells(sites, weights, VIEW)

    fig, axes = plt.subplots(2, 2, figsize=(13, 13))
    ax = axes[0, 0]
    for i, poly in enumerate(vor):
        ax.add_patch(Polygon(poly, closed=True, facecolor=site_cols[i], alpha=0.5, edgecolor="0.2", lw=1))
    ax.scatter(sites[:, 0], sites[:, 1], c=site_cols, s=70, edgecolors="k", zorder=5)
    _finish(ax, "(a) Voronoi diagram: each site owns the points nearest to it")

    ax = axes[0, 1]
    plotting.region_map(ax, knn_grid.reshape(shape), extent, colors=class_cols, alpha=0.35)
    for poly in vor:
        _outline(ax, poly, edgecolor="0.4", lw=0.8, ls="--")
    for c in range(N_CLASSES):
        m = classes == c
        ax.scatter(sites[m, 0], sites[m, 1], color=class_cols[c], s=80, edgecolors="k", zorder=5, label=f"class {c}")
    ax.legend(loc="lower right", fontsize=9)
    _finish(ax, "(b) 1-nearest-neighbour classification\n(boundaries are Voronoi edges, dashed)")

    ax = axes[1, 0]
    km_cols = plotting.label_colors(2 * N_CLUSTERS)[::2]
    plotting.region_map(ax, km_grid.reshape(shape), extent, colors=km_cols, alpha=0.35)
    for poly in km_cells:
        _outline(ax, poly, edgecolor="0.2", lw=1.2)
    ax.scatter(data[:, 0], data[:, 1], c=km_cols[km.labels_], s=14, edgecolors="none", alpha=0.9)
    ax.scatter(*km.cluster_centers_.T, marker="*", s=260, c=km_cols, edgecolors="k", lw=1.5, zorder=5,
               label="centroids")
    ax.legend(loc="lower right", fontsize=9)
    _finish(ax, f"(c) k-means (k={N_CLUSTERS}) on {N_KMEANS_POINTS} points:\n"
                "the clusters are the centroids' Voronoi cells")

    ax = axes[1, 1]
    plotting.region_map(ax, pow_grid.reshape(shape), extent, colors=site_cols, alpha=0.45)
    for poly in pow_cells:
        if poly is not None:
            _outline(ax, poly, edgecolor="0.2", lw=1)
    gaps = np.linalg.norm(sites[:, None] - sites[None], axis=-1) + np.diag(np.full(N_SITES, np.inf))
    for i in range(N_SITES):
        ax.add_patch(Circle(sites[i], np.sqrt(weights[i]), fill=False, edgecolor=site_cols[i] * 0.7, lw=1.8))
        away = sites[i] - sites[gaps[i].argmin()]  # label on the side away from the nearest other site
        pos = sites[i] + 0.45 * away / np.linalg.norm(away)
        ax.text(pos[0], pos[1], f"ω={weights[i]:.2f}", ha="center", va="center", fontsize=8,
                bbox=dict(facecolor="white", alpha=0.8, pad=1, edgecolor="none"), zorder=6)
    ax.scatter(sites[:, 0], sites[:, 1], c=site_cols, s=70, edgecolors="k", zorder=5)
    empty = np.array([c is None for c in pow_cells])
    if empty.any():
        ax.scatter(sites[empty, 0], sites[empty, 1], marker="x", c="k", s=120, lw=2, zorder=6,
                   label="site with an empty cell")
        ax.legend(loc="lower right", fontsize=9)
    _finish(ax, f"(d) power diagram, weights ω ~ U({WEIGHT_LOW:g}, {WEIGHT_HIGH:g}):\n"
                r"cell $i$ = argmin $\|x-p_i\|^2 - \omega_i$; circles of radius $\sqrt{\omega_i}$")
    fig.suptitle("From Voronoi diagrams to power diagrams", fontsize=16)
    fig.tight_layout()

    cell_area = lambda cells: [0.0 if c is None else G.polygon_area(c) for c in cells]  # noqa: E731
    box_area = (VIEW[1] - VIEW[0]) * (VIEW[3] - VIEW[2])
    numbers = {
        "sites": sites, "classes": classes, "weights": weights,
        "voronoi_cell_areas": cell_area(vor),
        "voronoi_raster_fractions": np.bincount(vor_labels, minlength=N_SITES) / len(pts),
        "power_cell_areas": cell_area(pow_cells),
        "power_raster_fractions": np.bincount(pow_grid, minlength=N_SITES) / len(pts),
        "box_area": box_area,
        "knn_class_fractions": np.bincount(knn_grid, minlength=N_CLASSES) / len(pts),
        "kmeans_centers": km.cluster_centers_, "kmeans_inertia": km.inertia_,
        "kmeans_points": data, "kmeans_labels": km.labels_,
    }
    plotting.save(fig, run.path("fig_5_voronoi_knn_kmeans_power.png"), numbers)
    print(f"[{run.name}] power cell areas {np.round(numbers['power_cell_areas'], 2).tolist()} -> {run.out}")
    run.finish()
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
