"""E1 in 8-D (exp_e1_between_kmeans_and_pca_8d.py, common/experiments/e1_8d.py): the data, the exact Top-K SAE's
training and decoder solve, each case's numbers against independent computations, the summary rule, and the negative
controls (an SAE worse than k-means must make the claim fail; the lower bound must stay above 1e-6)."""
import copy
import importlib.util
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

from common.experiments import e1, e1_8d  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "exp_e1_between_kmeans_and_pca_8d"


def load_script():
    spec = importlib.util.spec_from_file_location(f"_script_{SCRIPT}_{os.urandom(4).hex()}", ROOT / f"{SCRIPT}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("e1_8d")
    return d, load_script().main(["--quick", "--out", str(d)])


@pytest.fixture(scope="module")
def trained():
    """Small mixtures and an exact Top-K SAE trained on each: {k: (x, model, training)}."""
    out = {}
    for k in (1, 2, 3):
        x, _ = e1_8d.gaussian_mixture(300, 8, 4, 3.0, 0.6, seed=k)
        model, training = e1_8d.train_exact_topk(x, 8, k, 150, 1e-2, seed=k)
        out[k] = (x, model, training)
    return out


def test_gaussian_mixture_has_the_stated_spectrum():
    x, labels = e1_8d.gaussian_mixture(40_000, 8, 1, 0.0, 0.6, seed=3)
    assert x.shape == (40_000, 8) and set(labels.tolist()) == {0}
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]   # independent: the sample covariance's spectrum
    np.testing.assert_allclose(eig, 0.6 ** (2 * np.arange(8)), rtol=0.05)
    x2, l2 = e1_8d.gaussian_mixture(500, 8, 4, 3.0, 0.6, seed=0)
    again = e1_8d.gaussian_mixture(500, 8, 4, 3.0, 0.6, seed=0)
    assert np.array_equal(x2, again[0]) and np.array_equal(l2, again[1]) and set(l2.tolist()) == {0, 1, 2, 3}
    assert not np.array_equal(x2, e1_8d.gaussian_mixture(500, 8, 4, 3.0, 0.6, seed=1)[0])
    with pytest.raises(ValueError, match="decay must lie in"):
        e1_8d.gaussian_mixture(100, 8, 4, 3.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="n_components"):
        e1_8d.gaussian_mixture(3, 8, 4, 3.0, 0.5, seed=0)


def test_decoder_solve_is_least_squares_for_the_codes(trained):
    for k, (x, model, training) in trained.items():
        with torch.no_grad():
            z = model.encode(torch.as_tensor(x)).numpy()
        live = np.abs(z).sum(0) > 0
        a = np.c_[z[:, live], np.ones(len(x))]
        sol = np.linalg.lstsq(a, x, rcond=None)[0]   # independent: numpy's least squares on [codes, 1]
        # least squares up to the solve's tiny ridge (docs/DESIGN.md, section 3.5): with codes of condition number
        # ~1e3 it shrinks the weakest direction by ~1%, which moves the MSE by ~1e-8 relative
        with torch.no_grad():
            recon = model.reconstruct(torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(recon, a @ sol, atol=1e-3)
        best = np.mean((a @ sol - x) ** 2)
        assert best * (1 - 1e-12) <= training["mse"] <= best * (1 + 1e-6)
        assert training["mse"] <= training["mse_adam"] + 1e-12


def test_between_case_against_independent_computations(trained):
    for k, (x, model, _) in trained.items():
        case = e1_8d.between_case(x, model, seed=7)
        W, b = model.W_enc.detach().numpy(), model.b_enc.detach().numpy()
        top = np.sort(np.argsort(-(x @ W.T + b), axis=1)[:, :k], axis=1)   # brute-force Top-K sets
        sets = {tuple(r) for r in top.tolist()}
        assert case["n_sae_regions"] == len(sets) == case["n_kmeans_clusters"]
        km = KMeans(len(sets), init="k-means++", n_init=10, random_state=7).fit(x)
        assert np.isclose(case["kmeans"], km.inertia_ / x.size, rtol=1e-9)
        err = 0.0                                                           # rank-k flats by SVD per cluster
        for c in np.unique(km.labels_):
            xc = x[km.labels_ == c] - x[km.labels_ == c].mean(0)
            err += (np.linalg.svd(xc, compute_uv=False)[k:] ** 2).sum()
        assert np.isclose(case["kmeans_local_pca"], err / x.size, rtol=1e-9)
        recon = np.zeros_like(x) + model.b_dec.detach().numpy()
        pre = x @ W.T + b
        for j, s in enumerate(top):
            recon[j] += pre[j, s] @ model.W_dec.detach().numpy()[s]
        assert np.isclose(case["sae_topk"], np.mean((x - recon) ** 2), rtol=1e-9)
        assert case["topk_sets_equal_power_cells"] and case["lower_above_floor"]
        assert case["local_pca_on_sae_regions"] <= case["sae_topk"] + 1e-12   # docs/DESIGN.md, section 2, item 5
        want = "holds" if case["kmeans_local_pca"] <= case["sae_topk"] <= case["kmeans"] else "does not hold"
        assert case["verdict"] == want
    x, model, _ = trained[1]
    with pytest.raises(ValueError, match="below the data dimension"):
        e1_8d.between_case(x[:, :1], e1.init_sae(x[:, :1], 4, 1, "data", seed=0), seed=0)


def test_an_sae_worse_than_kmeans_fails_the_claim(trained):
    """Negative controls: the trained SAEs with their atoms scrambled (each latent decodes with another latent's
    atom), and with random atoms, reconstruct worse than k-means: every case and the combined verdict fail."""
    cases = []
    for k, (x, model, _) in trained.items():
        for how in ("scrambled", "random"):
            bad = copy.deepcopy(model)
            with torch.no_grad():
                if how == "scrambled":
                    bad.W_dec.copy_(bad.W_dec.roll(1, dims=0))
                else:
                    bad.W_dec.copy_(torch.randn(bad.W_dec.shape, generator=torch.Generator().manual_seed(k),
                                                dtype=torch.float64))
            case = e1_8d.between_case(x, bad, seed=0)
            assert case["sae_topk"] > case["kmeans"] and case["verdict"] == "does not hold", (k, how, case)
            cases.append({**case, "data_seed": k})
    good = [{**e1_8d.between_case(x, m, seed=0), "data_seed": k} for k, (x, m, _) in trained.items()]
    assert e1_8d.between_8d_summary({"cases": good + cases[:1]})[0] == "does not hold"
    assert e1_8d.between_8d_summary({"cases": cases})[0] == "does not hold"


def test_summary_rule():
    def case(lower, value, upper, k=1, verdict="holds"):
        return {"k": k, "data_seed": 0, "kmeans": upper, "sae_topk": value, "kmeans_local_pca": lower,
                "n_sae_regions": 4, "n_kmeans_clusters": 4, "verdict": verdict}
    verdict, numbers = e1_8d.between_8d_summary({"cases": [case(0.01, 0.1, 0.2), case(0.02, 0.05, 0.1, k=2)]})
    assert verdict == "holds" and numbers["per_k"] == {"1": "holds", "2": "holds"} and numbers["held"] == "2/2"
    # a stored verdict is not trusted: each case is judged again
    verdict, numbers = e1_8d.between_8d_summary({"cases": [case(0.01, 0.3, 0.2, verdict="holds"), case(0.01, 0.1, 0.2)]})
    assert verdict == "does not hold" and numbers["per_k"] == {"1": "does not hold"}
    assert e1_8d.between_8d_summary({"cases": [case(0.01, 0.005, 0.2)]})[0] == "does not hold"   # below the lower
    # a lower bound at the floor cannot be undercut: inconclusive, never holds
    assert e1_8d.between_8d_summary({"cases": [case(1e-7, 0.1, 0.2), case(0.01, 0.1, 0.2)]})[0] == "inconclusive"
    assert e1_8d.between_8d_summary({"cases": [case(1e-7, 0.3, 0.2)]})[0] == "does not hold"
    with pytest.raises(ValueError, match="non-empty list 'cases'"):
        e1_8d.between_8d_summary({"mse": {}})
    with pytest.raises(ValueError, match=r"case 0 lacks \['kmeans_local_pca'\]"):
        e1_8d.between_8d_summary({"cases": [{k: v for k, v in case(0.01, 0.1, 0.2).items() if k != "kmeans_local_pca"}]})
    with pytest.raises(ValueError, match="finite"):
        e1_8d.between_8d_summary({"cases": [case(0.01, float("nan"), 0.2)]})


def test_quick_run(quick):
    d, result = quick
    on_disk = json.loads((d / "between_8d.json").read_text())
    assert (d / "between_8d.png").stat().st_size > 10_000
    cases = on_disk["cases"]
    assert [(c["k"], c["data_seed"]) for c in cases] == [(k, s) for k in (1, 2, 3) for s in (0, 1)]
    # the lower bound is a real one in every case (the 2-D scripts' is 0 at K >= 2)
    assert all(c["kmeans_local_pca"] > 1e-6 and c["lower_above_floor"] for c in cases)
    assert all(c["topk_sets_equal_power_cells"] and c["n_kmeans_clusters"] == c["n_sae_regions"] for c in cases)
    assert all(c["local_pca_on_sae_regions"] <= c["sae_topk"] + 1e-12 for c in cases)
    verdict, numbers = e1_8d.between_8d_summary(on_disk)
    assert on_disk["summary"] == {"verdict": verdict, **numbers} and result["summary"]["verdict"] == verdict
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quick"] is True


def test_script_refuses_a_k_at_the_data_dimension(tmp_path):
    from common.infra.outputs import ConfigError
    with pytest.raises(ConfigError, match="--KS=.*below --DIM"):
        load_script().main(["--quick", "--out", str(tmp_path), "--KS=1,8"])
