"""The E1 and figure scripts: --quick runs write their files, the geometry in them is right, the E1 options
do what they say, region maps are drawn the right way up."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common.experiments import plotting  # noqa: E402
from common.experiments import e1, e1_2d
from common.infra.data import grid, toy_e1  # noqa: E402
from common.maths import geometry as G  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
E1_SCRIPTS = ["exp_e1_between_kmeans_and_pca_k_1", "exp_e1_between_kmeans_and_pca_k_3",
              "exp_e1_between_kmeans_and_pca_k_3hard"]
FIG_SCRIPTS = ["fig_5_voronoi_knn_kmeans_power_evolution", "fig_6_voronoi_to_power", "fig_7_voronoi_3d_to_power_2d"]
EXPECTED = {
    "exp_e1_between_kmeans_and_pca_k_1": ["partitions", "evolution", "training"],
    "exp_e1_between_kmeans_and_pca_k_3": ["partitions", "evolution", "training"],
    "exp_e1_between_kmeans_and_pca_k_3hard": ["partitions", "evolution", "training"],
    "fig_5_voronoi_knn_kmeans_power_evolution": ["fig_5_voronoi_knn_kmeans_power"],
    "fig_6_voronoi_to_power": ["fig_6_voronoi_to_power", "fig_6_voronoi_to_power_variation"],
    "fig_7_voronoi_3d_to_power_2d": ["fig_7_voronoi_3d_to_power_2d", "fig_7_section_check",
                                     "fig_7_variation_sae_lifted", "fig_7_variation_top_view"],
}


def load_script(name):
    """A fresh module object for a top-level script (configure() rewrites its constants in place)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}_{os.urandom(4).hex()}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every script's --quick run, in-process, each into its own folder: {name: (out dir, returned numbers)}."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    base = tmp_path_factory.mktemp("quick")
    out = {}
    for name in E1_SCRIPTS + FIG_SCRIPTS:
        d = base / name
        out[name] = (d, load_script(name).main(["--quick", "--out", str(d)]))
        plt.close("all")
    return out


@pytest.mark.parametrize("name", E1_SCRIPTS + FIG_SCRIPTS)
def test_quick_run_writes_its_files(quick_runs, name):
    d, _ = quick_runs[name]
    assert json.loads((d / "config.json").read_text())["quick"] is True
    for stem in EXPECTED[name]:
        png, js = d / f"{stem}.png", d / f"{stem}.json"
        assert png.stat().st_size > 10_000, f"{png} missing or empty"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        json.loads(js.read_text())


def test_cli_quick_run(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(ROOT / "fig_6_voronoi_to_power.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "fig_6_voronoi_to_power.png").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "fig_6_voronoi_to_power.py"), "--no_such_option=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no_such_option" in bad.stderr


# --- E1 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", E1_SCRIPTS)
def test_e1_numbers(quick_runs, name):
    d, numbers = quick_runs[name]
    mse = json.loads((d / "partitions.json").read_text())["mse"]
    assert mse["local_pca_on_sae_regions"] <= mse["sae_topk"] + 1e-12  # docs/DESIGN.md, section 2, item 5
    assert mse["kmeans_local_pca"] <= mse["kmeans"] + 1e-12          # a rank-1 flat contains the centroid
    assert numbers["topk_sets_equal_power_cells"] == 1.0
    relaxed = "k_3hard" not in name
    assert (mse["sae_relaxed"] is not None) == relaxed and (mse["sae_hard_limit"] is not None) == relaxed


def test_e1_kmeans_numbers_match_sklearn(quick_runs):
    from sklearn.cluster import KMeans
    d, numbers = quick_runs[E1_SCRIPTS[0]]
    x = toy_e1(100, seed=0)
    km = KMeans(3, init="k-means++", n_init=10, random_state=0).fit(x)
    assert np.isclose(numbers["mse"]["kmeans"], km.inertia_ / x.size, rtol=1e-6)


def test_e1_settings_from_a_scripts_constants():
    from common.infra.outputs import ConfigError
    k1, hard = load_script(E1_SCRIPTS[0]), load_script(E1_SCRIPTS[2])
    consts = {n: getattr(k1, n) for n in k1.ACCEPT}
    s = e1_2d.E1Settings.from_constants(consts)
    assert (s.mode, s.temperature, s.k, s.box) == ("softmax", 0.3, 1, (-2.0, 2.0, -2.0, 2.0))
    exact = e1_2d.E1Settings.from_constants({n: getattr(hard, n) for n in hard.ACCEPT})
    assert exact.mode == "topk" and exact.temperature is None
    with pytest.raises(ValueError, match=r"unknown \['TEMPERATRE'\]"):          # a typo is refused by name
        e1_2d.E1Settings.from_constants({**consts, "TEMPERATRE": 0.3})
    with pytest.raises(ValueError, match=r"missing \['STEPS'\]"):
        e1_2d.E1Settings.from_constants({n: v for n, v in consts.items() if n != "STEPS"})
    no_t = {n: v for n, v in consts.items() if n != "TEMPERATURE"}
    with pytest.raises(ConfigError, match="--MODE=softmax: expected topk .*need a TEMPERATURE"):
        e1_2d.E1Settings.from_constants(no_t)                                     # a softmax mode needs one
    with pytest.raises(ConfigError, match="--TEMPERATURE=0"):
        e1_2d.E1Settings.from_constants({**consts, "TEMPERATURE": 0.0})
    with pytest.raises(ConfigError, match="--K=41"):
        e1_2d.E1Settings.from_constants({**consts, "K": 41})
    with pytest.raises(Exception):                                             # frozen
        s.k = 2
    with pytest.raises(ValueError, match="needs a temperature"):
        e1.e1_forward(e1.init_sae(toy_e1(10), 4, 1, "data", seed=0), torch.zeros(3, 2, dtype=torch.float64),
                      "softmax", None, True)


def test_e1_report_names_each_number():
    """The E1 line says which model each MSE belongs to: the trained relaxation, its exact Top-K counterpart (not
    trained as such), k-means, k-means + local PCA of the claim's rank."""
    k1, k3, hard = (load_script(n) for n in E1_SCRIPTS)
    numbers = {"mse": {"kmeans": 0.094, "sae_relaxed": 0.83, "sae_topk": 4.28, "sae_hard_limit": 1.25,
                       "kmeans_local_pca": 0.014, "kmeans_local_pca_rank_k": 2e-33, "local_pca_on_sae_regions": 0.011},
               "local_pca_rank": 2, "n_sae_regions_on_data": 10}
    line = e1_2d.report("k_3", e1_2d.E1Settings.from_constants({n: getattr(k3, n) for n in k3.ACCEPT}), numbers, "out")
    for part in ("softmax-over-top-3-relaxed SAE (trained, T=0.3) MSE 0.83",
                 "its exact Top-3 counterpart (same parameters, not trained as such) MSE 4.28",
                 "k-means (3 clusters) MSE 0.094", "k-means + rank-2 local PCA MSE 2e-33",
                 "k-means + rank-1 local PCA MSE 0.014", "the relaxation at T->0 MSE 1.25"):
        assert part in line, (part, line)
    line = e1_2d.report("k_1", e1_2d.E1Settings.from_constants({n: getattr(k1, n) for n in k1.ACCEPT}),
                     {**numbers, "local_pca_rank": 1}, "out")
    assert "softmax-relaxed SAE (trained, T=0.3) MSE 0.83" in line and "its exact Top-1 counterpart" in line
    exact = {**numbers, "mse": {**numbers["mse"], "sae_relaxed": None, "sae_hard_limit": None}}
    line = e1_2d.report("k_3hard", e1_2d.E1Settings.from_constants({n: getattr(hard, n) for n in hard.ACCEPT}), exact, "out")
    assert "exact Top-3 SAE (trained) MSE 4.28 |" in line and "counterpart" not in line and "T->0" not in line


def test_e1_init_options():
    x = toy_e1(100, seed=0)
    centers = e1.kmeans_fit(x, 3, seed=0)["centers"]
    m = e1.init_sae(x, 10, 1, "kmeans", seed=1, centers=centers)
    np.testing.assert_allclose(m.W_enc[:3].detach().numpy(), centers)
    d = e1.init_sae(x, 10, 1, "data", seed=1)
    assert np.abs(d.W_enc.detach().numpy()[:, None] - x[None]).max(-1).min(1).max() < 0.6  # near data points
    r = e1.init_sae(x, 10, 1, "randn", seed=1, bias_scale=0.0, dec_scale=2.0)
    assert float(r.b_enc.detach().abs().max()) == 0.0 and float(r.W_dec.detach().std()) > 1.0
    with pytest.raises(ValueError):
        e1.init_sae(x, 10, 1, "kmeans", seed=1)
    with pytest.raises(ValueError):
        e1.init_sae(x, 10, 1, "zeros", seed=1)


def test_e1_modes_unit_norm_and_decoder_bias():
    x = toy_e1(100, seed=0)
    xt = torch.as_tensor(x)
    m = e1.init_sae(x, 12, 3, "data", seed=2)
    W, atoms = e1.effective(m, True)
    np.testing.assert_allclose(W.norm(dim=1).detach().numpy(), 1.0)
    np.testing.assert_allclose(atoms.norm(dim=1).detach().numpy(), 1.0)
    assert e1.effective(m, False)[0] is m.W_enc
    # topk mode is the SAE itself; softmax_topk codes sum to 1 on exactly K latents; softmax is dense
    exact = e1.exact_model(m, unit_norm=False)
    torch.testing.assert_close(e1.e1_forward(m, xt, "topk", 0.3, False)[0], exact(xt)[0])
    _, c = e1.e1_forward(m, xt, "softmax_topk", 0.3, True)
    assert torch.all((c > 0).sum(1) == 3) and torch.allclose(c.sum(1), torch.ones(100, dtype=c.dtype))
    _, c = e1.e1_forward(m, xt, "softmax", 0.3, True)
    assert torch.all((c > 0).sum(1) == 12)
    with pytest.raises(ValueError):
        e1.e1_forward(m, xt, "hard", 0.3, True)
    # the T -> 0 limit is the softmax at a tiny temperature
    hard = e1.hard_limit_recon(m, xt, True)
    torch.testing.assert_close(hard, e1.e1_forward(m, xt, "softmax", 1e-6, True)[0])
    # dec_bias=False keeps b_dec at 0; True trains it; the encoder is trained in exact topk mode
    for dec_bias in (False, True):
        mm = e1.init_sae(x, 12, 3, "data", seed=2)
        w0 = mm.W_enc.detach().clone()
        e1.train_e1(mm, x, "topk", 20, 1e-2, 0.3, unit_norm=False, dec_bias=dec_bias, snapshot_steps=(0, 20))
        assert (float(mm.b_dec.detach().abs().max()) > 0) == dec_bias
        assert not torch.equal(mm.W_enc.detach(), w0)


# --- figures -----------------------------------------------------------------------------------------

def test_fig7_section_agrees_with_power_labels(quick_runs):
    d, _ = quick_runs["fig_7_voronoi_3d_to_power_2d"]
    for stem in ("fig_7_section_check", "fig_7_variation_top_view"):
        js = json.loads((d / f"{stem}.json").read_text())
        assert js["grid_label_agreement"] == 1.0
        assert js["max_vertex_gap"] < 1e-9 and js["cells_present_mismatch"] == 0
    # independent: nearest lifted site in 3-D vs smallest power distance in 2-D, by brute force
    js = json.loads((d / "fig_7_section_check.json").read_text())
    sites, h, t0, C = np.array(js["sites"]), np.array(js["heights"]), js["t0"], js["C"]
    pts, _, _ = grid((-1.6, 1.6), (-1.6, 1.6), 150)
    lifted = np.c_[sites, h]
    near3 = np.linalg.norm(np.c_[pts, np.full(len(pts), t0)][:, None] - lifted[None], axis=-1).argmin(1)
    power2 = (np.linalg.norm(pts[:, None] - sites[None], axis=-1) ** 2 - (C - (h - t0) ** 2)).argmin(1)
    assert np.array_equal(near3, power2)
    np.testing.assert_allclose(js["weights"], C - (h - t0) ** 2)
    v = json.loads((d / "fig_7_variation_top_view.json").read_text())
    assert v["top1_equals_power_label_on_data"]
    np.testing.assert_allclose(v["A"] - (np.array(v["heights"]) - v["t0"]) ** 2, v["weights"], atol=1e-9)


def test_order2_cells_have_distinct_colour_ids(quick_runs):
    d, _ = quick_runs["fig_6_voronoi_to_power"]
    js = json.loads((d / "fig_6_voronoi_to_power.json").read_text())
    pairs = [tuple(p) for p in js["order2_pairs"]]
    assert len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    colors = np.round(np.array(js["order2_colors"]), 6)
    assert len({tuple(c) for c in colors}) == len(pairs)
    assert all(f > 0 for f in js["order2_raster_fractions"])
    # brute force: the set of unordered power-nearest pairs on a grid is exactly the listed pairs,
    # and the script's labelling maps pairs to ids one-to-one
    fig6 = load_script("fig_6_voronoi_to_power")
    sites, weights = np.array(js["sites"]), np.array(js["weights"])
    pts, _, _ = grid((-4, 4), (-4, 4), 80)
    d2 = np.linalg.norm(pts[:, None] - sites[None], axis=-1) ** 2 - weights
    brute = [tuple(sorted(r)) for r in np.argsort(d2, axis=1)[:, :2].tolist()]
    ids, uniq = fig6.order2_cells(pts, sites, weights)
    assert sorted(set(brute)) == [tuple(p) for p in uniq.tolist()]
    assert all(tuple(uniq[i]) == b for i, b in zip(ids, brute))
    # more than 20 cells still get distinct colours (the original folded ids modulo 20)
    assert len({tuple(c) for c in np.round(plotting.label_colors(60), 6)}) == 60


def _rendered_rgb(fig, ax, xy):
    """RGB (n, 3) in [0, 1] of the rendered figure at data points ``xy`` (n, 2)."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    disp = ax.transData.transform(xy)
    cols = np.clip(np.round(disp[:, 0]).astype(int), 0, buf.shape[1] - 1)
    rows = np.clip(np.round(buf.shape[0] - disp[:, 1]).astype(int), 0, buf.shape[0] - 1)
    return buf[rows, cols]


def _check_right_way_up(points, labels_grid, extent, point_labels, colors, alpha):
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    plotting.region_map(ax, labels_grid, extent, colors=colors, alpha=alpha)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    got = _rendered_rgb(fig, ax, points)
    plt.close(fig)
    want = alpha * colors[point_labels] + (1 - alpha) * 1.0  # blended over the white axes
    return np.abs(got - want).max(1)


def test_region_maps_are_the_right_way_up():
    # an E1 SAE partition: the colour under each data point is its own active set's colour
    x = toy_e1(100, seed=0)
    m = e1.init_sae(x, 20, 2, "data", seed=5)
    pts, shape, extent = grid((-2, 2), (-2, 2), 200)
    ids, sets = e1.partition(m.W_enc, m.b_enc, 2, np.vstack([pts, x]))
    lab, own = ids[:len(pts)].reshape(shape), ids[len(pts):]
    # skip points within two grid cells of a boundary, where a pixel may belong to the neighbour
    sites, weights = G.topk_sites_weights(m.W_enc, m.b_enc)
    own_sets = G.nearest_k(x, sites, weights, 2)
    shifts = [np.array([dx, dy]) * 0.04 for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    keep = np.all([(G.nearest_k(x + s, sites, weights, 2) == own_sets).all(1) for s in shifts], axis=0)
    assert keep.sum() > 50
    colors = plotting.label_colors(len(sets), seed=1)
    err = _check_right_way_up(x[keep], lab, extent, own[keep], colors, alpha=0.5)
    assert err.max() < 0.03, f"colour under a data point is not its own region's (max error {err.max():.3f})"
    # the same check must fail for a map drawn transposed (the original's rotation by 90 degrees)
    err_t = _check_right_way_up(x[keep], lab.T, extent, own[keep], colors, alpha=0.5)
    assert err_t.max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", E1_SCRIPTS)
def test_e1_default_settings_claims(tmp_path, name):
    """At the original settings: local PCA on the SAE's regions beats both the exact and the trained SAE,
    and the trained SAE beats k-means (the SAE sits between k-means and local PCA)."""
    numbers = load_script(name).main(["--out", str(tmp_path)])
    plt.close("all")
    mse = numbers["mse"]
    trained = mse["sae_topk"] if mse["sae_relaxed"] is None else mse["sae_relaxed"]
    assert mse["local_pca_on_sae_regions"] <= min(trained, mse["sae_topk"]) + 1e-12
    assert trained < mse["kmeans"]


def test_protocol_figures_have_no_overlapping_text(tmp_path):
    """The ablation bars and the base curves with a long label: no title or axis label runs into another (the check
    itself fails on a figure built to overlap)."""
    import warnings

    import matplotlib.pyplot as plt

    from common.experiments import experiment, figures
    from common.experiments.plotting import OverlapWarning, overlapping_text

    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    for ax in axes:
        ax.set_title("a long title that cannot fit in half of a four-inch figure")
    assert overlapping_text(fig)  # negative control
    plt.close(fig)
    rows, histories = [], {}
    for m in ("pam", "sgd", "sgd_tied"):
        for v in (0.01, 0.1):
            for rep in (0, 1):
                rows.append({"method": m, "ablation": "fraction", "value": v, "replicate": rep, "budget": 8,
                             "test_mse": 0.1 + v, "test_fvu": 0.5, "dead": 0.1})
                histories[experiment.RunSpec(m, "fraction", v, rep, 8).id] = [
                    {"epoch": e, "test_mse": 0.3 - 0.01 * e, "train_mse": 0.3, "epoch_time": 1.0} for e in range(5)]
            histories[experiment.RunSpec(m, "base", "-", 0, 8).id] = histories[experiment.RunSpec(m, "fraction", v, 0, 8).id]
    label = "MNIST topk, modern recipe, tuned, budget 8: a long label as the scripts make them"
    with warnings.catch_warnings():
        warnings.simplefilter("error", OverlapWarning)
        figures.ablation_figures(rows, histories, tmp_path, label)
        figures.base_curves(histories, tmp_path, label, budget=8)
    assert (tmp_path / "ablation_fraction.png").exists() and (tmp_path / "curves_base.png").exists()

def _script(name, *args, timeout=200):
    return subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, MPLBACKEND="Agg"))


@pytest.mark.parametrize("name, flag", [("exp_e1_between_kmeans_and_pca_k_1", "--LR=1e30"),
                                        ("fig_7_voronoi_3d_to_power_2d", "--VAR_LR=1e30")])
def test_diverged_training_is_refused_naming_the_setting(tmp_path, name, flag):
    res = _script(name, "--quick", flag, "--out", tmp_path / "out")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{flag.split('=')[0]}=1e+30: training diverged" in last and "smaller learning rate" in last
    assert not (tmp_path / "out").exists()          # nothing drawn, nothing left


def test_check_converged_rule():
    x = toy_e1(100, seed=0)
    var = float(((x - x.mean(0)) ** 2).mean())
    model = e1.init_sae(x, 4, 1, "randn", seed=0)
    e1.check_converged(model, x, 999 * var)
    with pytest.raises(e1.Diverged, match="reconstruction MSE"):
        e1.check_converged(model, x, 1001 * var)
    with pytest.raises(e1.Diverged, match="non-finite parameters: b_enc"):
        with torch.no_grad():
            model.b_enc[0] = float("nan")
        e1.check_converged(model, x, 0.1)


def test_fig6_weights_that_make_the_figure_degenerate_are_refused(tmp_path):
    res = _script("fig_6_voronoi_to_power", "--quick", "--WEIGHT_HIGH=1e300", "--out", tmp_path / "out", timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--WEIGHT_HIGH=1e+300: expected" in res.stderr and "100 view widths" in res.stderr
    assert not (tmp_path / "out").exists()


def test_degenerate_figure_refused_and_drawing_bounded_in_time(tmp_path):
    from matplotlib.patches import Circle
    fig, ax = plt.subplots()
    ax.add_patch(Circle((0, 0), 1e150, fill=False))
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    with pytest.raises(plotting.FigureError, match="big.png: the figure is degenerate \\(Circle of"):
        plotting.save(fig, tmp_path / "big.png")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    with pytest.raises(plotting.FigureError, match="slow.png: drawing took more than 0.001 s"):
        plotting.save(fig, tmp_path / "slow.png", seconds=0.001)
    assert list(tmp_path.iterdir()) == []           # no file, no temporary file
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert plotting.save(fig, tmp_path / "ok.png").stat().st_size > 1000
