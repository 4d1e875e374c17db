"""Figure 7: a 2-D power diagram is the plane section of a 3-D Voronoi diagram (docs/DESIGN.md, section 2, item 6).

Sites p_i in [-1, 1]^2 are lifted to (p_i, h_i). We compute the true 3-D Voronoi cells of the lifted
sites (halfspace intersection, clipped to a box), render them as translucent polyhedra (pyvista,
off-screen), and cut them with the plane t = T0. The section is exactly the power diagram of the p_i
with weights omega_i = C - (h_i - T0)^2; we draw the section polygons, the projection line of every
lifted site, and circles of the true radius sqrt(omega_i): where spheres of radius sqrt(C) around the
lifted sites meet the plane. A companion 2-D figure overlays the section polygons on the power
diagram computed from power distances, and the JSON records their agreement.

Variation: a Top-1 SAE trained on the E1 data; its encoder rows w_i (sites) with weights
omega_i = ||w_i||^2 + 2 b_i are lifted to h_i = T0 + sqrt(A - omega_i), above the power diagram they
induce on the data (its Top-1 regions). Both views use x1 to the right and x2 away from / up for the
viewer (the original variation was mirrored).

    python fig_7_voronoi_3d_to_power_2d.py [--quick] [--out DIR] [--seed N]
"""
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Circle, Polygon
from scipy.spatial import ConvexHull

from common.experiments import e1, plotting
from common.experiments.config import above, at_least, box, configure, finite, satisfies
from common.infra.data import grid, toy_e1
from common.infra.outputs import atomic_write, write_json
from common.maths import geometry as G

SEED = 42
N_SITES = 12
SITE_LOW, SITE_HIGH = -1.0, 1.0
HEIGHT_LOW, HEIGHT_HIGH = 0.2, 0.8
T0 = 0.0                       # the cutting plane t = T0
SPHERE_RADIUS = 0.9            # C = SPHERE_RADIUS^2 > max (h - T0)^2, so every weight is positive
BOX = (-1.6, 1.6, -1.6, 1.6, -0.4, 1.2)   # x1, x2, t: where the 3-D cells are clipped
GRID_RES = 400
WINDOW_W, WINDOW_H = 1500, 1100
# variation: a Top-1 SAE on the E1 data
VAR_N_POINTS = 100
VAR_DATA_SEED = 0
VAR_N_LATENTS = 12
VAR_STEPS = 3000
VAR_LR = 1e-2
VAR_A_MARGIN = 0.3             # A = max weight + margin: the lowest lifted site sits sqrt(margin) above T0
VAR_BOX = (-2.0, 2.0, -2.0, 2.0)

ACCEPT = {  # what each constant accepts: checked by configure() before any work (common/experiments/config.py)
    "SEED": at_least(0),
    "N_SITES": at_least(1),
    "SITE_LOW": finite(),
    "SITE_HIGH": above("SITE_LOW"),
    "HEIGHT_LOW": finite(),
    "HEIGHT_HIGH": above("HEIGHT_LOW"),
    "T0": satisfies(lambda t, c: c["BOX"][4] < t < c["BOX"][5], "a number strictly inside BOX's t range"),
    "SPHERE_RADIUS": satisfies(lambda r, c: r > max(abs(c["HEIGHT_LOW"] - c["T0"]), abs(c["HEIGHT_HIGH"] - c["T0"])),
                               "a number > every |height - T0| (max(|HEIGHT_LOW - T0|, |HEIGHT_HIGH - T0|))"),
    "BOX": box("x1", "x2", "t"),
    "GRID_RES": at_least(2),
    "WINDOW_W": at_least(100),
    "WINDOW_H": at_least(100),
    "VAR_N_POINTS": at_least(1),
    "VAR_DATA_SEED": at_least(0),
    "VAR_N_LATENTS": at_least(1),
    "VAR_STEPS": at_least(1),
    "VAR_LR": above(0),
    "VAR_A_MARGIN": above(0),
    "VAR_BOX": box("x", "y"),
}

QUICK = dict(GRID_RES=60, VAR_STEPS=50, WINDOW_W=700, WINDOW_H=520)


def lifted_cells(lifted, box3, t0):
    """3-D Voronoi cells of the lifted sites (vertex arrays or None) and their sections by t = t0."""
    cells = G.power_cells(lifted, np.zeros(len(lifted)), box3)
    sections = [None if v is None else G.section_polygon(v, t0) for v in cells]
    return cells, sections


def section_check(sites, weights, lifted, sections, box2, t0, res):
    """Agreement of the plane section with the 2-D power diagram: grid labels (nearest lifted site in
    3-D vs power-nearest site in 2-D) and polygon vertices (3-D section vs 2-D halfspace cells)."""
    pts, shape, extent = grid(box2[:2], box2[2:], res)
    lab3 = G.plane_section_labels(lifted, pts, t0)
    lab2 = G.power_distance(pts, sites, weights).argmin(1)
    cells2 = G.power_cells(sites, weights, box2)
    gaps, missing = [], 0
    for s3, s2 in zip(sections, cells2):
        if (s3 is None or G.polygon_area(s3) < 1e-12) != (s2 is None):
            missing += 1
        elif s2 is not None:
            d = np.abs(s3[:, None] - s2[None]).max(-1)
            gaps.append(max(d.min(1).max(), d.min(0).max()))
    return {"grid_label_agreement": float(np.mean(lab3 == lab2)), "n_grid_points": int(len(pts)),
            "max_vertex_gap": float(max(gaps) if gaps else 0.0), "cells_present_mismatch": missing,
            "labels2d": lab2.reshape(shape), "extent": extent}


def render_3d(path, lifted, cells, sections, t0, box3, colors, radii, title, subtitle, window,
              data=None, label_every=3, zoom=1.0):
    """Off-screen pyvista render of the lifted Voronoi cells, their section, projections and circles."""
    import pyvista as pv
    pv.OFF_SCREEN = True
    pl = pv.Plotter(off_screen=True, window_size=window)
    pl.set_background("white")
    # no depth peeling: with the off-screen Mesa/EGL context it hides all translucent geometry
    eps = 1e-3 * (box3[5] - box3[4])
    for i, v in enumerate(cells):
        if v is None:
            continue
        faces = G.polytope_faces(v)
        mesh = pv.PolyData(v, faces=np.hstack([[len(f), *f] for f in faces]))
        pl.add_mesh(mesh, color=colors[i], opacity=0.16, smooth_shading=False)
        pl.add_mesh(mesh.extract_all_edges(), color=(0.35, 0.35, 0.35), line_width=1, opacity=0.5)
    for i, s in enumerate(sections):
        if s is None:
            continue
        poly = pv.PolyData(np.c_[s, np.full(len(s), t0 + eps)], faces=np.r_[len(s), np.arange(len(s))])
        pl.add_mesh(poly, color=colors[i], opacity=0.95)
        rim = pv.PolyData(np.c_[s, np.full(len(s), t0 + 4 * eps)], faces=np.r_[len(s), np.arange(len(s))])
        pl.add_mesh(rim.extract_all_edges(), color="black", line_width=4)
    plane = pv.Plane(center=((box3[0] + box3[1]) / 2, (box3[2] + box3[3]) / 2, t0 - eps), direction=(0, 0, 1),
                     i_size=box3[1] - box3[0], j_size=box3[3] - box3[2])
    pl.add_mesh(plane, color=(0.85, 0.85, 0.85), opacity=0.3)
    theta = np.linspace(0, 2 * np.pi, 90)
    for i, p in enumerate(lifted):
        pl.add_mesh(pv.Line(p, (p[0], p[1], t0)), color="purple", line_width=2)
        if radii[i] > 0:
            ring = np.c_[p[0] + radii[i] * np.cos(theta), p[1] + radii[i] * np.sin(theta), np.full(90, t0 + 2 * eps)]
            pl.add_mesh(pv.MultipleLines(ring), color="crimson", line_width=2)
    pl.add_points(lifted, color="gold", point_size=16, render_points_as_spheres=True)
    pl.add_points(np.c_[lifted[:, :2], np.full(len(lifted), t0 + 2 * eps)], color="black", point_size=8,
                  render_points_as_spheres=True)
    if data is not None:
        pl.add_points(np.c_[data, np.full(len(data), t0 + 3 * eps)], color=(0.1, 0.1, 0.1), point_size=5,
                      render_points_as_spheres=True)
    idx = np.arange(0, len(lifted), label_every)
    pl.add_point_labels(lifted[idx] + [0, 0, 0.08], [f"{i}: h={lifted[i, 2]:.2f}" for i in idx], font_size=14,
                        shape_opacity=0.6, always_visible=True, show_points=False)
    pl.show_bounds(bounds=box3, xtitle="x1", ytitle="x2", ztitle="t (height)", grid=False, location="outer",
                   font_size=12, color="black")
    pl.add_text(title + "\n" + subtitle, position="upper_edge", font_size=12, color="black")
    c = np.array([(box3[0] + box3[1]) / 2, (box3[2] + box3[3]) / 2, (box3[4] + box3[5]) / 2])
    span = max(box3[1] - box3[0], box3[3] - box3[2], box3[5] - box3[4])
    # viewer on the -x2 side, a little to the left and above: x1 points right, x2 away (not mirrored)
    pl.camera_position = [tuple(c + span * np.array([-0.9, -2.3, 1.3])), tuple(c), (0, 0, 1)]
    pl.camera.zoom(zoom)
    try:
        atomic_write(path, lambda tmp: pl.screenshot(str(tmp)))
    finally:
        pl.close()
    return path


def top_view(ax, check, sites, sections, radii, colors, title, data=None):
    """2-D companion: power diagram from power distances (raster), 3-D section polygons (dashed)."""
    plotting.region_map(ax, check["labels2d"], check["extent"], colors=colors, alpha=0.45)
    for s in sections:
        if s is not None and G.polygon_area(s) > 1e-12:
            ax.add_patch(Polygon(s, closed=True, fill=False, edgecolor="black", lw=1.4, ls="--"))
    for p, r in zip(sites, radii):
        if r > 0:
            ax.add_patch(Circle(p, r, fill=False, edgecolor="crimson", lw=1.3, alpha=0.8))
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=10, c="0.1", zorder=4, label="E1 data")
    ax.scatter(sites[:, 0], sites[:, 1], c=colors[:len(sites)], s=45, edgecolors="k", zorder=5, label="sites")
    for i, p in enumerate(sites):
        ax.annotate(f"{i}", p, xytext=(4, 3), textcoords="offset points", fontsize=8, zorder=6)
    agree = 100 * check["grid_label_agreement"]
    plotting.finish_map(ax, check["extent"], title + f"\ngrid agreement 3-D section vs 2-D power labels: {agree:.2f}%,"
                        f" max vertex gap {check['max_vertex_gap']:.1e}", title_size=10)
    ax.legend(loc="lower right", fontsize=8)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    window = (WINDOW_W, WINDOW_H)

    # the variation's Top-1 SAE is trained first: a diverged training is refused before anything is drawn
    x = toy_e1(VAR_N_POINTS, seed=VAR_DATA_SEED)
    model = e1.init_sae(x, VAR_N_LATENTS, 1, "data", seed=run.seed_for("variation_sae"), bias_scale=0.1,
                        dec_scale=0.1)
    e1.train_e1(model, x, "topk", VAR_STEPS, VAR_LR, None, unit_norm=False, dec_bias=True, desc="variation SAE")
    with torch.no_grad():
        recon, _, _ = model(torch.as_tensor(x))
        _, top1, _ = model.encode_sparse(torch.as_tensor(x))
    try:
        e1.check_converged(model, x, float(np.mean((x - recon.numpy()) ** 2)))
    except e1.Diverged as err:
        run.fail(f"--VAR_LR={VAR_LR:g}: {err}")

    # --- random sites, lifted ------------------------------------------------------------------
    rng = np.random.default_rng(run.seed_for("sites"))
    sites = rng.uniform(SITE_LOW, SITE_HIGH, (N_SITES, 2))
    heights = rng.uniform(HEIGHT_LOW, HEIGHT_HIGH, N_SITES)
    C = SPHERE_RADIUS ** 2
    if C <= np.max((heights - T0) ** 2):
        raise ValueError(f"SPHERE_RADIUS={SPHERE_RADIUS} must exceed every |h - T0| "
                         f"(max {np.abs(heights - T0).max():.3f})")
    weights = G.lifted_power_weights(heights, T0, C)
    lifted = G.lift(sites, heights)
    cells, sections = lifted_cells(lifted, BOX, T0)
    check = section_check(sites, weights, lifted, sections, BOX[:4], T0, GRID_RES)
    colors = plotting.label_colors(N_SITES)
    radii = np.sqrt(weights)
    path3d = render_3d(run.path("fig_7_voronoi_3d_to_power_2d.png"), lifted, cells, sections, T0, BOX, colors, radii,
              "3-D Voronoi cells of lifted sites; their section by the plane t = 0 is a power diagram",
              f"weights omega_i = C - h_i^2 (C = {C:.2f}); red circles: radius sqrt(omega_i)\n"
              "higher site -> smaller weight -> smaller cell (some cells miss the plane)", window, zoom=1.15)
    fig, ax = plt.subplots(figsize=(7.5, 7.8))
    top_view(ax, check, sites, sections, radii, colors,
             "Power diagram, weights $C - h_i^2$ (raster) and the section of the 3-D cells (dashed)")
    fig.tight_layout()
    numbers = {"sites": sites, "heights": heights, "t0": T0, "C": C, "weights": weights, "box": BOX,
               **{k: v for k, v in check.items() if k not in ("labels2d", "extent")},
               "cell_volumes": [None if v is None else ConvexHull(v).volume for v in cells],
               "section_areas": [None if s is None else G.polygon_area(s) for s in sections]}
    plotting.save(fig, run.path("fig_7_section_check.png"), numbers)
    write_json(path3d.with_suffix(".json"), numbers)

    # --- variation: a Top-1 SAE's sites lifted above the power diagram they induce on E1 ----------
    v_sites, v_weights, _ = G.sae_sites_weights(model)
    v_h, A = G.lift_heights(v_weights, T0, v_weights.max() + VAR_A_MARGIN)
    v_lifted = G.lift(v_sites, v_h)
    used = np.unique(top1.numpy())
    top = float(np.max(v_h[used])) + 0.4
    v_box = (*VAR_BOX, T0 - 0.3, max(top, T0 + 1.0))
    v_cells, v_sections = lifted_cells(v_lifted, v_box, T0)
    v_check = section_check(v_sites, v_weights, v_lifted, v_sections, VAR_BOX, T0, GRID_RES)
    v_colors = plotting.label_colors(VAR_N_LATENTS)
    v_radii = np.sqrt(np.maximum(v_weights, 0))
    v_path3d = render_3d(run.path("fig_7_variation_sae_lifted.png"), v_lifted, v_cells, v_sections, T0, v_box, v_colors,
              v_radii, "Top-1 SAE on E1: encoder rows w lifted to h = sqrt(A - omega), omega = w.w + 2b",
              f"A = {A:.2f}; the section at t = 0 is the SAE's Top-1 partition (black dots: E1 data);\n"
              "red circles: radius sqrt(omega) where omega > 0", window, data=x, label_every=1)
    fig, ax = plt.subplots(figsize=(7.5, 7.8))
    top_view(ax, v_check, v_sites, v_sections, v_radii, v_colors,
             "Top-1 SAE on E1: its power diagram (raster) and the section of the lifted cells (dashed)", data=x)
    fig.tight_layout()
    mse = float(np.mean((x - recon.numpy()) ** 2))
    v_numbers = {"sites": v_sites, "weights": v_weights, "heights": v_h, "A": A, "t0": T0, "box": v_box,
                 "sae_mse": mse, "latents_used_on_data": used,
                 "top1_equals_power_label_on_data": bool(np.array_equal(
                     top1[:, 0].numpy(), G.power_distance(x, v_sites, v_weights).argmin(1))),
                 **{k: v for k, v in v_check.items() if k not in ("labels2d", "extent")}}
    plotting.save(fig, run.path("fig_7_variation_top_view.png"), v_numbers)
    write_json(v_path3d.with_suffix(".json"), v_numbers)
    print(f"[{run.name}] section vs power labels: {check['grid_label_agreement']:.4f} (variation "
          f"{v_check['grid_label_agreement']:.4f}), max vertex gap {check['max_vertex_gap']:.1e}; "
          f"variation SAE MSE {mse:.4f} -> {run.out}")
    run.finish()
    return {"main": numbers, "variation": v_numbers}


if __name__ == "__main__":
    main(sys.argv[1:])
