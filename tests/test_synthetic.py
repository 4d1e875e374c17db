"""The synthetic ground truth (common/infra/synthetic.py) and the recovery metrics (common/maths/metrics.py), against hand
computations and the laws they are drawn from."""
import math

import numpy as np
import pytest
import torch

from common.infra.synthetic import SyntheticConfig, dictionary, firing_probabilities, generate
from common.maths.metrics import RECOVERY_THRESHOLD, atom_cosines, recovery


def test_firing_probabilities_follow_the_zipf_law_by_hand():
    # c (1 + 1/2 + 1/3) = 1.1 -> c = 0.6
    assert np.allclose(firing_probabilities(3, 1.1, 1.0), [0.6, 0.3, 0.2], atol=1e-12)
    # clipped at 1: p_1 = 1, c (1/2 + 1/3) = 1.5 -> c = 1.8
    assert np.allclose(firing_probabilities(3, 2.5, 1.0), [1.0, 0.9, 0.6], atol=1e-12)
    # exponent 0: every feature equally often; exponent 2: p_i / p_j = (j / i)^2
    assert np.allclose(firing_probabilities(8, 2.0, 0.0), 0.25)
    p = firing_probabilities(50, 4.0, 2.0)
    assert math.isclose(p.sum(), 4.0, rel_tol=1e-9) and np.allclose(p[9] / p[19], 4.0)
    assert np.array_equal(firing_probabilities(4, 4.0, 1.0), np.ones(4))


@pytest.mark.parametrize("group_size, correlation", [(1, 0.0), (5, 0.7)])
def test_firing_frequencies_match_their_probabilities_within_sampling_error(group_size, correlation):
    cfg = SyntheticConfig(8, 40, mean_active=6.0, zipf_exponent=1.2, group_size=group_size, correlation=correlation)
    n = 20_000
    d = generate(cfg, n, seed=3)
    p = d.firing_prob
    assert np.allclose(p, firing_probabilities(40, 6.0, 1.2))
    freq = (d.codes > 0).double().mean(0).numpy()
    sure = p == 1.0  # the most frequent features' c (i + 1)^-s exceeds 1 here: they fire in every sample
    assert 1 <= sure.sum() < 40 and (freq[sure] == 1.0).all()
    z = (freq[~sure] - p[~sure]) / np.sqrt(p[~sure] * (1 - p[~sure]) / n)
    assert np.abs(z).max() < 4.5, np.abs(z).max()  # < 40 binomial counts: P(any |z| > 4.5) < 3e-4
    assert abs(float((d.codes > 0).sum(1).double().mean()) - 6.0) < 0.1  # the expected number active per sample


def test_atoms_are_unit_norm_random_on_the_sphere_and_the_draw_is_deterministic():
    cfg = SyntheticConfig(16, 64, mean_active=4.0)
    a, b, c = generate(cfg, 300, 11), generate(cfg, 300, 11), generate(cfg, 300, 12)
    assert a.x.shape == (300, 16) and a.codes.shape == (300, 64) and a.dictionary.shape == (64, 16)
    assert a.x.dtype == a.codes.dtype == a.dictionary.dtype == torch.float32
    assert torch.allclose(a.dictionary.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes) and torch.equal(a.dictionary, b.dictionary)
    assert not torch.equal(a.dictionary, c.dictionary) and not torch.equal(a.codes, c.codes)
    # the dictionary depends only on (n_true, n_features, seed); no preferred direction (mean ~ 0 over many atoms)
    assert np.allclose(dictionary(64, 16, 11), a.dictionary.double().numpy(), atol=1e-7)
    big = dictionary(4000, 3, 0)
    assert np.abs(big.mean(0)).max() < 0.05 and np.allclose(big.T @ big / 4000, np.eye(3) / 3, atol=0.03)
    assert (a.codes >= 0).all()


def test_noise_level_and_clean_data():
    clean = generate(SyntheticConfig(12, 30, mean_active=3.0), 5000, 5)
    assert torch.allclose(clean.x, clean.codes @ clean.dictionary, atol=1e-5)
    noisy = generate(SyntheticConfig(12, 30, mean_active=3.0, noise_std=0.2), 5000, 5)
    # the noise has its own stream: codes and atoms unchanged, the residual is N(0, 0.2^2) per entry
    assert torch.equal(noisy.codes, clean.codes) and torch.equal(noisy.dictionary, clean.dictionary)
    resid = (noisy.x.double() - noisy.codes.double() @ noisy.dictionary.double()).numpy()
    assert abs(resid.std() - 0.2) < 0.2 * 0.02 and abs(resid.mean()) < 0.005  # 60000 entries: sd error ~0.3%


def test_magnitudes_are_heavy_tailed_with_the_stated_scale():
    n = 40_000
    exp = generate(SyntheticConfig(4, 10, mean_active=5.0, zipf_exponent=0.0), n, 1).codes
    vals = exp[exp > 0].double().numpy()
    assert abs(vals.mean() - 1.0) < 0.02 and abs(np.median(vals) - math.log(2)) < 0.02  # Exp(1)
    logn = generate(SyntheticConfig(4, 10, mean_active=5.0, zipf_exponent=0.0, magnitude="lognormal",
                                    lognormal_sigma=0.5), n, 1).codes
    logs = np.log(logn[logn > 0].double().numpy())
    assert abs(logs.mean()) < 0.01 and abs(logs.std() - 0.5) < 0.01


def _indicator_correlations(cfg, n=20_000):
    fires = (generate(cfg, n, 7).codes > 0).double().numpy()
    r = np.corrcoef(fires.T)
    same = np.zeros_like(r, dtype=bool)
    for g in range(0, cfg.n_true, cfg.group_size):
        same[g:g + cfg.group_size, g:g + cfg.group_size] = True
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    return r[same].mean(), r[other].mean()


def test_correlated_features_co_fire_with_the_sign_of_the_correlation():
    base = dict(n_features=6, n_true=24, mean_active=8.0, zipf_exponent=0.0, group_size=4)  # p = 1/3 each
    within, across = _indicator_correlations(SyntheticConfig(**base, correlation=0.6))
    assert within > 0.2 and abs(across) < 0.01
    within, across = _indicator_correlations(SyntheticConfig(**base, correlation=-0.3))
    assert within < -0.1 and abs(across) < 0.01
    within, across = _indicator_correlations(SyntheticConfig(**base, correlation=0.0))
    assert abs(within) < 0.02 and abs(across) < 0.01


@pytest.mark.parametrize("kw, match", [
    (dict(n_features=0), "n_features must be an integer >= 1"),
    (dict(n_true=2.5), "n_true must be an integer >= 1"),
    (dict(mean_active=0.0), r"mean_active must be a number in \(0, n_true = 20\]"),
    (dict(mean_active=21), r"mean_active must be a number in \(0, n_true = 20\]"),
    (dict(zipf_exponent=-1), "zipf_exponent must be a finite number >= 0"),
    (dict(magnitude="uniform"), "magnitude must be one of exponential, lognormal"),
    (dict(lognormal_sigma=0.0), "lognormal_sigma must be a finite number > 0"),
    (dict(group_size=21), r"group_size must be an integer in \[1, n_true = 20\]"),
    (dict(correlation=0.5), "correlation 0.5 needs group_size >= 2"),
    (dict(group_size=5, correlation=-0.25), r"correlation must be in \(-0.25, 1\) for group_size 5"),
    (dict(group_size=5, correlation=1.0), r"correlation must be in \(-0.25, 1\)"),
    (dict(noise_std=float("nan")), "noise_std must be a finite number >= 0"),
])
def test_bad_settings_are_refused_by_name(kw, match):
    args = dict(n_features=5, n_true=20) | kw
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**args)


def test_bad_sample_counts_and_seeds_are_refused():
    cfg = SyntheticConfig(3, 4, mean_active=1.0)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        generate(cfg, 0, 1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        generate(cfg, 5, -1)
    with pytest.raises(ValueError, match="config must be a SyntheticConfig"):
        generate({"n_features": 3}, 5, 1)


# --- recovery metrics ------------------------------------------------------------------------------------------
def test_recovery_by_hand():
    true = np.array([[1.0, 0.0], [0.0, 1.0]])
    c30 = math.cos(math.pi / 6)
    learned = np.array([[c30, 0.5], [-2.0, 0.0], [0.0, 0.0]])  # 30 degrees off atom 0; atom 0 negated, scaled; zero
    c = atom_cosines(learned, true)
    assert np.allclose(c, [[c30, 0.5], [1.0, 0.0], [0.0, 0.0]])
    r = recovery(learned, true)
    assert math.isclose(r["mmcs_true_to_learned"], (1.0 + 0.5) / 2)
    assert math.isclose(r["mmcs_learned_to_true"], (c30 + 1.0 + 0.0) / 3)
    assert r["recovered_fraction"] == 0.5  # atom 0 (cosine 1); atom 1's best is 0.5 < 0.9
    assert RECOVERY_THRESHOLD == 0.9
    assert recovery(learned, true, threshold=0.5)["recovered_fraction"] == 1.0  # the threshold itself counts


def test_permuted_rescaled_sign_flipped_copies_recover_everything_and_orthogonal_atoms_nothing():
    rng = np.random.default_rng(0)
    true = dictionary(20, 8, 4)
    copy = true[rng.permutation(20)] * rng.choice([-1.0, 1.0], 20)[:, None] * rng.uniform(0.1, 10, 20)[:, None]
    r = recovery(torch.tensor(copy, dtype=torch.float32), true)
    assert all(math.isclose(v, 1.0, abs_tol=1e-6) for v in r.values()), r
    # more learned atoms than true ones: the extras lower only the learned -> true direction
    extra = np.vstack([copy, rng.standard_normal((1, 8))])
    r = recovery(extra, true)
    assert r["recovered_fraction"] == 1.0 and math.isclose(r["mmcs_true_to_learned"], 1.0, abs_tol=1e-9)
    assert r["mmcs_learned_to_true"] < 1.0
    # true atoms in the first 3 coordinates, learned atoms in the other 3: orthogonal, nothing recovered
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    r = recovery(rng.standard_normal((5, 3)) @ q[:, 3:].T, rng.standard_normal((4, 3)) @ q[:, :3].T)
    assert all(abs(v) < 1e-12 for v in r.values()), r


def test_recovery_refuses_bad_input():
    with pytest.raises(ValueError, match=r"true must have shape \(n_true, 3\) \(n_features = 3 as in learned\)"):
        recovery(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="need at least one atom on each side"):
        recovery(np.zeros((0, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="learned holds 1 NaN"):
        recovery(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
        recovery(np.ones((1, 2)), np.ones((1, 2)), threshold=1.5)
