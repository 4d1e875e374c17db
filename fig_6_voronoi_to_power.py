"""Figure 6: Voronoi diagram, power diagram, 2nd-order power diagram of the same 7 sites.

Sites uniform in [-3, 3]^2; weights U(0, 2) with +4 on the first site. The 2nd-order diagram has one
cell per unordered pair of power-nearest sites, each pair its own colour (the original folded pair ids
modulo 20, merging cells). Circles have radius sqrt(omega) (where the power distance is 0; omega: a site's
weight). The variation figure draws the same diagrams with circles of radius sqrt(omega - min omega): shifting
all weights by a constant changes no cell.

    python fig_6_voronoi_to_power.py [--quick] [--out DIR] [--seed N]
"""
import math
import sys

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, Polygon

from common.experiments import plotting
from common.experiments.config import above, at_least, box, configure, finite, satisfies
from common.infra.data import grid
from common.maths import geometry as G

SEED = 42
N_SITES = 7
SITE_LOW, SITE_HIGH = -3.0, 3.0
WEIGHT_LOW, WEIGHT_HIGH = 0.0, 2.0
FIRST_SITE_BONUS = 4.0
VIEW = (-4.0, 4.0, -4.0, 4.0)
GRID_RES = 500

_MAX_RADIUS_VIEWS = 100   # a circle of radius sqrt(ω) wider than this many views is a degenerate figure


def _span(view) -> float:
    return max(view[1] - view[0], view[3] - view[2])


ACCEPT = {  # what each constant accepts: checked by configure() before any work (common/experiments/config.py)
    "SEED": at_least(0),
    "N_SITES": at_least(3),                 # the 2nd-order diagram needs pairs of sites, and a third site
    "SITE_LOW": finite(),
    "SITE_HIGH": above("SITE_LOW"),
    "WEIGHT_LOW": at_least(0),              # circles of radius sqrt(weight)
    "WEIGHT_HIGH": above("WEIGHT_LOW") & satisfies(
        lambda w, c: math.sqrt(w + c["FIRST_SITE_BONUS"]) <= _MAX_RADIUS_VIEWS * _span(c["VIEW"]),
        "such that the largest circle, of radius sqrt(--WEIGHT_HIGH + --FIRST_SITE_BONUS), is at most 100 view widths"),
    "FIRST_SITE_BONUS": at_least(0),
    "VIEW": box("x", "y"),
    "GRID_RES": at_least(2),
}

QUICK = dict(GRID_RES=80)


def order2_cells(pts, sites, weights):
    """Order-2 labels of ``pts``: (ids (n,), pairs (n_pairs, 2)), ids lexicographic over the pairs that
    occur (``geometry.order_k_labels``), so every pair gets its own id and colour."""
    return G.order_k_labels(pts, sites, weights, 2)


def draw(ax, labels, extent, cells, sites, weights, radii, title, colors, names=None):
    plotting.region_map(ax, labels, extent, colors=colors, alpha=0.5)
    for i, poly in enumerate(cells):
        if poly is None:
            continue
        ax.add_patch(Polygon(poly, closed=True, fill=False, edgecolor="0.15", lw=1.2))
        if names is not None:
            c = poly.mean(0)
            ax.text(c[0], c[1], names[i], ha="center", va="center", fontsize=8, color="0.1",
                    bbox=dict(facecolor="white", alpha=0.6, pad=0.5, edgecolor="none"))
    for i, (p, r) in enumerate(zip(sites, radii)):
        if r > 0:
            ax.add_patch(Circle(p, r, fill=False, edgecolor="crimson", lw=1.6, alpha=0.8))
    ax.scatter(sites[:, 0], sites[:, 1], c="black", s=30, zorder=5)
    for i, p in enumerate(sites):
        ax.annotate(f"{i}: ω={weights[i]:.2f}", p, xytext=(4, 4), textcoords="offset points", fontsize=8, zorder=6)
    plotting.finish_map(ax, extent, title, title_size=11)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    rng = np.random.default_rng(run.seed_for("sites"))
    sites = rng.uniform(SITE_LOW, SITE_HIGH, (N_SITES, 2))
    weights = rng.uniform(WEIGHT_LOW, WEIGHT_HIGH, N_SITES)
    weights[0] += FIRST_SITE_BONUS
    zero = np.zeros(N_SITES)
    pts, shape, extent = grid(VIEW[:2], VIEW[2:], GRID_RES)

    vor_lab = G.power_distance(pts, sites, zero).argmin(1)
    pow_lab = G.power_distance(pts, sites, weights).argmin(1)
    o2_ids, pairs = order2_cells(pts, sites, weights)
    # exact order-2 polygons from the first-order form (one power cell per pair), ordered like ``pairs``
    all_pairs, pair_sites, pair_w = G.order_k_sites_weights(sites, weights, 2)
    all_cells = G.power_cells(pair_sites, pair_w, VIEW)
    lookup = {tuple(p): c for p, c in zip(all_pairs.tolist(), all_cells)}
    o2_cells = [lookup[tuple(p)] for p in pairs.tolist()]
    site_cols = plotting.label_colors(N_SITES)
    pair_cols = plotting.label_colors(len(pairs), seed=3)

    panels = [
        (vor_lab, G.power_cells(sites, zero, VIEW), zero, "Voronoi diagram\n(all ω = 0)", site_cols, None),
        (pow_lab, G.power_cells(sites, weights, VIEW), weights,
         f"Power diagram\n(ω ~ U({WEIGHT_LOW:g}, {WEIGHT_HIGH:g}), ω₀ += {FIRST_SITE_BONUS:g})", site_cols, None),
        (o2_ids, o2_cells, weights, "2nd-order power diagram\n(cell = the two power-nearest sites)", pair_cols,
         [f"{a},{b}" for a, b in pairs]),
    ]
    numbers = {
        "sites": sites, "weights": weights,
        "order2_pairs": pairs, "order2_color_ids": np.arange(len(pairs)), "order2_colors": pair_cols,
        "order2_raster_fractions": np.bincount(o2_ids, minlength=len(pairs)) / len(pts),
        "order2_cell_areas": [0.0 if c is None else G.polygon_area(c) for c in o2_cells],
        "power_raster_fractions": np.bincount(pow_lab, minlength=N_SITES) / len(pts),
        "voronoi_raster_fractions": np.bincount(vor_lab, minlength=N_SITES) / len(pts),
    }
    for name, radii, note in (
            ("fig_6_voronoi_to_power.png", np.sqrt(np.maximum(weights, 0)), "circles: radius √ω"),
            ("fig_6_voronoi_to_power_variation.png", np.sqrt(weights - weights.min()),
             "variation: circles of radius √(ω − min ω); same cells (weights shifted by a constant)")):
        fig, axes = plt.subplots(1, 3, figsize=(19, 6.8))
        for ax, (lab, cells, w, title, cols, names) in zip(axes, panels):
            r = np.zeros(N_SITES) if not w.any() else radii
            draw(ax, lab.reshape(shape), extent, cells, sites, w, r, title, cols, names)
        fig.suptitle(f"Power diagrams and Voronoi diagrams ({note})", fontsize=14)
        fig.tight_layout()
        plotting.save(fig, run.path(name), {**numbers, "circle_radii": radii})
    print(f"[{run.name}] {len(pairs)} order-2 cells on view: {pairs.tolist()} -> {run.out}")
    run.finish()
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
