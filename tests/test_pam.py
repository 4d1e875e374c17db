"""The exact decoder solve (docs/DESIGN.md, section 3.4) against independent computations."""
import numpy as np
import pytest
import torch

from common.maths import pam
from common.maths.pam import DecoderStats, collect_stats, decoder_objective, solve_decoder, sse_from_stats
from common.maths.sae import SAE


def random_topk_codes(n_samples, n_latents, k, seed):
    g = torch.Generator().manual_seed(seed)
    vals, idx = torch.randn(n_samples, n_latents, generator=g).topk(k, dim=-1)
    return vals, idx, torch.zeros(n_samples, n_latents).scatter(-1, idx, vals)


def lstsq_decoder(x, z, atoms_prev, b_prev, alpha, beta, mu, nu):
    """Generic least squares on the stacked system (numpy), coefficients scaled by N*n as documented."""
    x, z = x.double().numpy(), z.double().numpy()
    n_samples, n_features = x.shape
    d = z.shape[1]
    s = n_samples * n_features
    eye = np.eye(d + 1)
    rows = [np.c_[z, np.ones(n_samples)]]
    rhs = [x]
    for coef, sel, target in ((alpha, slice(0, d), 0.0), (beta, slice(d, d + 1), 0.0),
                              (mu, slice(0, d), atoms_prev.double().numpy()),
                              (nu, slice(d, d + 1), b_prev.double().numpy()[None])):
        if coef:
            rows.append(np.sqrt(s * coef) * eye[sel])
            rhs.append(np.sqrt(s * coef) * (target if np.ndim(target) else np.zeros((eye[sel].shape[0], n_features))))
    sol = np.linalg.lstsq(np.vstack(rows), np.vstack(rhs), rcond=None)[0]
    return sol[:d], sol[d]


@pytest.mark.parametrize("coefs", [dict(alpha=1e-2, beta=2e-2, mu=3e-2, nu=4e-2), dict(alpha=0, beta=0, mu=0, nu=0),
                                   dict(alpha=0, beta=0, mu=5e-3, nu=0), dict(alpha=0, beta=1e-2, mu=0, nu=0)])
def test_solve_matches_generic_least_squares(coefs):
    torch.manual_seed(0)
    n_samples, n_features, d, k = 400, 9, 16, 4
    x = torch.randn(n_samples, n_features) * 2 + 1
    vals, idx, z = random_topk_codes(n_samples, d, k, seed=1)
    stats = DecoderStats.empty(n_features, d)
    stats.add_dense(x, z)
    D0, b0 = torch.randn(d, n_features), torch.randn(n_features)
    D, b, info = solve_decoder(stats, D0, b0, **coefs)
    D_ref, b_ref = lstsq_decoder(x, z, D0, b0, **coefs)
    tol = 1e-6 if coefs["alpha"] + coefs["mu"] == 0 else 1e-9  # the tiny ridge perturbs the unregularised case
    assert np.abs(D.numpy() - D_ref).max() < tol
    assert np.abs(b.numpy() - b_ref).max() < tol
    assert (info["ridge"] > 0) == (coefs["alpha"] + coefs["mu"] == 0)


def test_solve_is_a_stationary_point_and_never_increases_objective():
    torch.manual_seed(2)
    n_samples, n_features, d, k = 300, 6, 10, 3
    x = torch.randn(n_samples, n_features)
    _, _, z = random_topk_codes(n_samples, d, k, seed=3)
    stats = DecoderStats.empty(n_features, d)
    stats.add_dense(x, z)
    coefs = dict(alpha=1e-3, beta=1e-3, mu=1e-2, nu=1e-2)
    D0, b0 = torch.randn(d, n_features, dtype=torch.float64), torch.randn(n_features, dtype=torch.float64)
    D, b, _ = solve_decoder(stats, D0, b0, **coefs)
    # gradient of the objective at the solution is zero (autograd on a direct pass, independent of the stats)
    Dv, bv = D.clone().requires_grad_(), b.clone().requires_grad_()
    obj = ((x.double() - z.double() @ Dv - bv) ** 2).mean() + coefs["alpha"] * Dv.pow(2).sum() \
        + coefs["beta"] * bv.pow(2).sum() + coefs["mu"] * (Dv - D0).pow(2).sum() + coefs["nu"] * (bv - b0).pow(2).sum()
    obj.backward()
    assert Dv.grad.abs().max() < 1e-10 and bv.grad.abs().max() < 1e-10
    before = decoder_objective(stats, D0, b0, D0, b0, **coefs)
    after = decoder_objective(stats, D, b, D0, b0, **coefs)
    assert after <= before
    assert abs(after - obj.item()) < 1e-10
    for _ in range(20):  # no perturbation does better
        Dp, bp = D + 1e-3 * torch.randn_like(D), b + 1e-3 * torch.randn_like(b)
        assert decoder_objective(stats, Dp, bp, D0, b0, **coefs) >= after


@pytest.mark.parametrize("pair_chunk", [1024, 7])  # batches of 64 in one piece, and in uneven chunks
def test_sparse_statistics_equal_dense_and_streaming_equals_one_batch(pair_chunk, monkeypatch):
    monkeypatch.setattr(pam, "PAIR_CHUNK", pair_chunk)
    n_samples, n_features, d, k = 500, 11, 40, 5
    x = torch.randn(n_samples, n_features)
    vals, idx, z = random_topk_codes(n_samples, d, k, seed=4)
    dense = DecoderStats.empty(n_features, d)
    dense.add_dense(x, z)
    sparse = DecoderStats.empty(n_features, d)
    for s in range(0, n_samples, 64):
        sparse.add_sparse(x[s:s + 64], vals[s:s + 64], idx[s:s + 64])
    for name in ("sum_z", "sum_x", "zz_upper", "zx"):
        assert torch.allclose(getattr(dense, name), getattr(sparse, name), atol=1e-10), name
    G = z.double().T @ z.double()
    assert torch.allclose(sparse.gram(), G, atol=1e-10)
    assert torch.allclose(sparse.zx, z.double().T @ x.double(), atol=1e-10)
    m = torch.randn(d, 3, dtype=torch.float64)
    assert torch.allclose(sparse.gram_times(m), G @ m, atol=1e-10)
    assert dense.n == sparse.n == n_samples
    assert abs(dense.sum_xx - sparse.sum_xx) < 1e-8 and dense.nnz == sparse.nnz
    assert torch.equal(dense.fired, sparse.fired)
    # statistics are float64 and their size does not depend on n_samples
    assert dense.zz_upper.dtype == torch.float64 and dense.zz_upper.shape == (d, d) and dense.zx.shape == (d, n_features)


@pytest.mark.parametrize("d", [40, 130, 301, 700])  # 1, 2, 4 (uneven) and 8 blocks
def test_blocked_upper_gram_equals_the_full_product(d):
    z = torch.randn(90, d, dtype=torch.float64)
    z[z.abs() < 0.5] = 0.0
    stats = DecoderStats.empty(3, d)
    stats.add_dense(torch.randn(90, 3), z)
    stats.add_dense(torch.randn(90, 3), z)  # accumulates
    full = 2 * z.T @ z
    assert torch.allclose(stats.zz_upper, torch.triu(full), atol=1e-10)
    assert torch.allclose(stats.gram(), full, atol=1e-10)


@pytest.mark.parametrize("activation,n_latents", [("topk", 20), ("topk", 200), ("topk_abs", 20), ("topk_abs", 200),
                                                  ("relu", 20)])
def test_post_solve_mse_from_statistics_equals_direct_pass(activation, n_latents):
    """k / n_latents = 0.2 takes the dense path of collect_stats, 0.02 the sparse one."""
    torch.manual_seed(5)
    x = torch.randn(700, 12)
    model = SAE(12, n_latents, activation, k=None if activation == "relu" else 4, seed=6)
    stats = collect_stats(model, x, batch_size=128)
    D, b, _ = solve_decoder(stats, model.W_dec, model.b_dec, alpha=1e-4, mu=1e-3)
    with torch.no_grad():
        model.W_dec.copy_(D.float())
        model.b_dec.copy_(b.float())
        recon = model(x)[0].double()
    direct = float((x.double() - recon).pow(2).sum())
    assert abs(sse_from_stats(stats, D, b) - direct) / direct < 1e-5
    assert abs(sse_from_stats(stats, D, b, stats.gram()) - sse_from_stats(stats, D, b)) < 1e-9 * direct


@pytest.mark.parametrize("coefs", [dict(), dict(alpha=1e-3, beta=1e-2, mu=1e-3, nu=1e-2)])
def test_gram_atoms_from_the_normal_equations_equal_the_product(coefs):
    torch.manual_seed(8)
    x = torch.randn(400, 9)
    model = SAE(9, 30, "topk", k=6, seed=9)
    stats = collect_stats(model, x, batch_size=64)
    D, b, info = solve_decoder(stats, model.W_dec, model.b_dec, **coefs)
    G = stats.gram()
    assert torch.allclose(info["gram_atoms"], G @ D, rtol=1e-9, atol=1e-9 * float(G.abs().max()))
    exact = sse_from_stats(stats, D, b, G)
    assert abs(sse_from_stats(stats, D, b, gram_atoms=info["gram_atoms"]) - exact) < 1e-9 * exact
    # handing over a materialised G (overwritten for A) gives the same solve
    D2, b2, _ = solve_decoder(stats, model.W_dec, model.b_dec, gram=stats.gram(), **coefs)
    assert torch.equal(D, D2) and torch.equal(b, b2)


def test_minibatch_statistics_rescale():
    x = torch.randn(50, 3)
    _, _, z = random_topk_codes(50, 6, 2, seed=7)
    s = DecoderStats.empty(3, 6)
    s.add_dense(x, z)
    t = s.scaled(4.0)
    assert t.n == 200 and torch.allclose(t.gram(), 4 * s.gram()) and torch.allclose(t.zx, 4 * s.zx)


def test_solve_rejects_bad_input():
    s = DecoderStats.empty(3, 4)
    with pytest.raises(ValueError, match="empty"):
        solve_decoder(s, torch.zeros(4, 3), torch.zeros(3))
    s.add_dense(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        solve_decoder(s, torch.zeros(4, 3), torch.zeros(3), alpha=-1.0)


LARGE_SOLVE = """
import torch
from common.maths.pam import DecoderStats, solve_decoder
torch.set_num_threads(2)
d, n, m = 16384, 4, 48  # rank-m Gram matrix; mu > 0 makes A positive definite
g = torch.Generator().manual_seed(0)
Z = torch.randn(m, d, generator=g, dtype=torch.float64).abs()
X = torch.randn(m, n, generator=g, dtype=torch.float64)
stats = DecoderStats(float(m), Z.sum(0), X.sum(0), torch.triu(Z.T @ Z), Z.T @ X, float(X.pow(2).sum()), float(m * d),
                     torch.ones(d, dtype=torch.bool))
D0, b0 = torch.randn(d, n, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
D, b, info = solve_decoder(stats, D0, b0, mu=1e-3)
# the normal equations of the joint minimiser (docs/DESIGN.md 3.4) without forming A: A D = R
N, s = float(m), m * n * 1e-3
zbar, xbar = stats.sum_z / N, stats.sum_x / N
AD = stats.gram_times(D) - N * torch.outer(zbar, zbar @ D) + s * D
R = stats.zx - torch.outer(zbar, N * xbar) + s * D0
print("residual", float((AD - R).norm() / R.norm()))
"""


@pytest.mark.slow
def test_solve_at_sixteen_thousand_latents_with_two_threads(tmp_path):
    """n_latents 16384, 2 threads: the size at which scipy's OpenBLAS Cholesky segfaulted here (the process died);
    run in a subprocess so that a crash fails this test. ~1 minute, ~6 GiB."""
    import subprocess
    import sys
    from pathlib import Path

    res = subprocess.run([sys.executable, "-c", LARGE_SOLVE], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, f"exit status {res.returncode}: {res.stderr[-2000:]}"
    residual = float(res.stdout.split("residual")[1])
    assert residual < 1e-10, res.stdout
