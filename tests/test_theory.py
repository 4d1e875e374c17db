"""common/maths/theory.py: every theory check holds on small instances, every check can fail (a negative control
injects a defect through the same code path the report uses), and each claim has its own generator."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import check_grad

from common.infra.outputs import derive_seed
from common.maths import geometry as G
from common.maths import theory as T

POINTS = 200


# --- every statement holds ------------------------------------------------------------------------

@pytest.mark.parametrize("cid", list(T.THEORY))
def test_check_holds_on_small_instances(cid):
    check = T.THEORY[cid]
    r = T.run_claim(cid, seed=1, instances=len(check.shapes), points=POINTS)
    assert r["total"] >= POINTS * len(check.shapes) or cid.startswith("T7")
    assert r["agree"] == r["total"] and r["verdict"] == "holds", r


def test_registry_order_and_fields():
    assert list(T.THEORY) == ["T1-piecewise-affine", "T1b-relu-piecewise-affine", "T2-topk-power-diagram",
                              "T2b-k-subset-form", "T2c-topk-abs", "T3-relu-power-diagram", "T4-kmeans-top1",
                              "T4b-kmeans-autoencoder", "T6-lifting", "T7-kflats-optimal"]
    assert not any(cid.startswith("T5") for cid in T.THEORY)  # Eckart-Young on the SAE's regions: an identity
    for check in T.THEORY.values():
        assert check.statement and "docs/DESIGN.md" in check.source and check.shapes
        assert all(isinstance(s, dict) for s in check.shapes)


# --- negative controls: each check flags a defect on a clear fraction of its comparisons ------------

def dense_jacobian(model, mask):
    """W_dec W_enc (every latent) instead of the active rows."""
    return T.affine_jacobian(model, torch.ones_like(mask))


def topk_weights_plus_b(W, b):
    return W, (W * W).sum(1) + b  # ||w||^2 + b instead of + 2 b


def topk_weights_perturbed(W, b):
    sites, weights = G.topk_sites_weights(W, b)
    return sites, weights + 0.5 * (-1.0) ** np.arange(len(weights))  # a non-constant perturbation


def ksubset_plus_b(W, b, k):
    subsets, sites, _ = G.ksubset_sites_weights(W, b, k)
    return subsets, sites, (sites * sites).sum(1) + b[subsets].sum(1)


def topk_abs_plus_b(W, b):
    sq = (W * W).sum(1)
    return np.vstack([W, -W]), np.concatenate([sq + b, sq - b])


def relu_plus_b(W, b, patterns):
    sites = patterns @ W
    return sites, (sites * sites).sum(1) + patterns @ b


def perturbed_flat(x, labels, rank):
    means, comps = T.local_pca_flats(x, labels, rank)
    return means + 0.1, [c + 0.1 for c in comps]


def smallest_directions(x, labels, rank):
    """The region means with the rank LEAST principal directions (the wrong end of the spectrum)."""
    fit = G.local_pca(x, labels, x.shape[1])
    return fit["means"], [c[c.shape[0] - rank:] if rank else c[:0] for c in fit["components"]]


def random_relabelling(x, n_flats, rank, n_iter, init_labels):
    """Not an optimiser: fresh random labels at every iteration, flats refitted (its error goes up and down)."""
    labels = np.random.default_rng(n_iter).integers(0, n_flats, len(x))
    return {**G.local_pca(x, labels, rank, n_labels=n_flats), "labels": labels}


CONTROLS = [  # (claim, defect, least fraction of comparisons that must disagree)
    ("T1-piecewise-affine", dict(jacobian_fn=dense_jacobian), 0.9),
    ("T1b-relu-piecewise-affine", dict(jacobian_fn=dense_jacobian), 0.5),
    ("T2-topk-power-diagram", dict(sites_weights=topk_weights_plus_b), 0.1),
    ("T2-topk-power-diagram", dict(sites_weights=topk_weights_perturbed), 0.05),
    ("T2b-k-subset-form", dict(sites_weights=ksubset_plus_b), 0.1),
    ("T2c-topk-abs", dict(sites_weights=topk_abs_plus_b), 0.1),
    ("T3-relu-power-diagram", dict(sites_weights=relu_plus_b), 0.1),
    ("T4-kmeans-top1", dict(bias_fn=lambda c: -(c * c).sum(1)), 0.1),  # -||c||^2 instead of -||c||^2 / 2
    ("T4-kmeans-top1", dict(bias_fn=lambda c: np.zeros(len(c))), 0.05),
    ("T4b-kmeans-autoencoder", dict(bias_fn=lambda c: -(c * c).sum(1)), 0.05),
    ("T4b-kmeans-autoencoder", dict(code_fn=lambda vals: vals), 0.9),  # the value code: affine, not constant
    ("T6-lifting", dict(weights_fn=lambda h, t0, C: C + (h - t0) ** 2), 0.05),
    ("T6-lifting", dict(heights_fn=lambda w, t0: (t0 + (w.max() - w), w.max())), 0.02),  # no sqrt: half the comparisons
    ("T7-kflats-optimal", dict(flat_fn=perturbed_flat), 0.1),
    ("T7-kflats-optimal", dict(flat_fn=smallest_directions), 0.1),
    ("T7-kflats-optimal", dict(kflats_fn=random_relabelling), 0.005),  # ~ half of the 6 monotonicity steps
]


@pytest.mark.parametrize("cid,defect,least", CONTROLS, ids=[f"{c}-{next(iter(d))}-{i}" for i, (c, d, _)
                                                            in enumerate(CONTROLS)])
def test_negative_control_fails(cid, defect, least):
    instances = len(T.THEORY[cid].shapes)
    r = T.run_claim(cid, seed=2, instances=instances, points=POINTS, **defect)
    assert r["verdict"] == "does not hold", r
    assert (r["total"] - r["agree"]) / r["total"] >= least, r


def test_every_claim_has_a_negative_control():
    assert {c for c, _, _ in CONTROLS} == set(T.THEORY)


def test_kflats_control_fails_the_monotonicity_on_every_instance():
    rng = np.random.default_rng(3)
    for shape in T.THEORY["T7-kflats-optimal"].shapes:
        agree, total = T.check_kflats(rng, POINTS, kflats_fn=random_relabelling, **shape)
        assert agree < total


# --- generators -------------------------------------------------------------------------------------

def _recording(registry, log):
    """The registry with each check wrapped to log (claim id, generator state on entry)."""
    def wrap(cid, fn):
        def spy(rng, n_points, **kw):
            log.append((cid, repr(rng.bit_generator.state)))
            return fn(rng, n_points, **kw)
        return spy
    return {cid: replace(c, fn=wrap(cid, c.fn)) for cid, c in registry.items()}


def _draws(registry, ids=None):
    log = []
    rows = T.run_theory(7, 2, 60, ids=ids, registry=_recording(registry, log))
    return {r["id"]: (r["seed"], r["agree"], r["total"]) for r in rows}, log


def test_each_claim_has_its_own_generator():
    seeds = {cid: derive_seed(7, cid) for cid in T.THEORY}
    assert len(set(seeds.values())) == len(seeds)
    rows, log = _draws(T.THEORY)
    assert {cid: s for cid, (s, _, _) in rows.items()} == seeds
    first_states = {}
    for cid, state in log:
        first_states.setdefault(cid, state)
    assert len(set(first_states.values())) == len(T.THEORY)


def test_adding_or_removing_a_claim_changes_no_other_claim():
    full_rows, full_log = _draws(T.THEORY)
    subset = ["T7-kflats-optimal", "T2-topk-power-diagram"]
    sub_rows, sub_log = _draws(T.THEORY, ids=subset)
    assert [r for r in sub_rows] == subset
    for cid in subset:
        assert sub_rows[cid] == full_rows[cid]
        assert [s for c, s in sub_log if c == cid] == [s for c, s in full_log if c == cid]

    def greedy(rng, n_points):  # a new claim that draws a lot from its generator
        rng.normal(size=10_000)
        return int(rng.integers(0, n_points)), n_points

    extra = {"T0-extra": T.TheoryCheck("extra", "test", greedy, (dict(),)), **T.THEORY}
    sup_rows, sup_log = _draws(extra)
    for cid in T.THEORY:
        assert sup_rows[cid] == full_rows[cid]
        assert [s for c, s in sup_log if c == cid] == [s for c, s in full_log if c == cid]


def test_run_theory_rows_and_errors():
    rows = T.run_theory(0, 1, 20, ids=["T4-kmeans-top1", "T6-lifting"])
    assert [r["id"] for r in rows] == ["T4-kmeans-top1", "T6-lifting"]
    for r in rows:
        assert set(r) == {"id", "statement", "source", "shapes", "seed", "instances", "points", "agree",
                          "total", "verdict", "seconds"}
        assert r["instances"] == 1 and r["points"] == 20 and r["verdict"] == "holds"
    assert T.run_theory(0, 1, 20, ids=["T6-lifting"])[0]["agree"] == rows[1]["agree"]
    with pytest.raises(ValueError, match="unknown theory claim"):
        T.run_theory(0, 1, 20, ids=["T5-local-pca-bound"])
    with pytest.raises(ValueError, match="instances"):
        T.run_claim("T6-lifting", 0, 0, 20)


# --- pieces the checks rely on -----------------------------------------------------------------------

def test_random_sae_is_centred_so_the_checks_use_encoder_bias():
    model = T.random_sae(np.random.default_rng(0), 3, 5, "topk", 2)
    assert not torch.allclose(model.encoder_bias, model.b_enc)
    W, b = T.encoder_affine(model)
    x = torch.randn(10, 3, dtype=torch.float64)
    np.testing.assert_allclose(model.preacts(x).numpy(), x.numpy() @ W.T + b, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_flat_objective_gradient_and_value(rank):
    rng = np.random.default_rng(rank)
    pts = rng.normal(size=(40, 4))
    p = rng.normal(size=4 + 4 * rank)
    f = lambda q: T._flat_objective(q, pts, rank)[0]  # noqa: E731
    g = lambda q: T._flat_objective(q, pts, rank)[1]  # noqa: E731
    assert check_grad(f, g, p) < 1e-4 * (1 + np.abs(g(p)).max())
    assert np.isclose(f(p), T.flat_error(pts, p[:4], p[4:].reshape(4, rank).T))
