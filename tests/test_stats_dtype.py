"""PAM's statistics in float32 with compensated accumulation (``stats_dtype="float32"``): accurate enough?

The criterion, fixed before any number was measured (docs/DESIGN.md, section 3.3):

1. every statistic (sum z, sum x, G = sum z z^T, P = sum z x^T, sum ||x||^2) within 1e-6 relative (Frobenius
   norm) of the float64 accumulation: about 8 float32 ulps (2^-23 = 1.2e-7). Each batch's float32 products
   carry a relative error of a few ulps; the compensated sum over batches adds next to nothing, so the bound
   does not grow with the number of batches;
2. plain float32 accumulation (the same per-batch products, added without compensation) measurably worse:
   its error in G and P at least 3 times the compensated one (its rounding grows with the number of batches);
3. the decoder solved from the float32 statistics is as good as the float64 one: its objective, evaluated on
   the float64 statistics, exceeds the float64 solve's minimum by at most 1e-6 relative (far below anything
   the experiments resolve: seeds differ by ~1e-2, methods are compared at ~1e-3);
4. what training records from the float32 statistics (the objective after the solve, hence the training
   MSE of that epoch) within 1e-5 relative of the same decoder's objective on the float64 statistics.

Measured on an SAE-shaped problem: 100,000 samples with a mean offset, 128 features, 512 latents whose encoder
is the data's ground-truth dictionary, solve batch 1024 (98 batches), no ridge (the tiny ridge only: the
least-conditioned solve); TopK with k = 16 takes the sparse path, ReLU the dense one (about 6 s each on 2 quiet
cores; ``.venv/bin/python -m pytest -s tests/test_stats_dtype.py -k accurate`` prints the errors).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.maths import pam
from common.maths.pam import STATS_DTYPES, collect_stats, decoder_objective, solve_decoder
from common.maths.sae import SAE
from common.maths.train import TrainConfig, train

SUMS = ("sum_z", "sum_x", "zz_upper", "zx")


def sae_problem(activation, n_samples=100_000, n_features=128, n_latents=512, k=16, seed=0):
    """Data = sparse non-negative mixtures of unit atoms + noise + an offset; an SAE whose encoder is those atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_latents, n_features, generator=g), dim=1)
    active = torch.rand(n_samples, n_latents, generator=g) < 16 / n_latents
    sources = active * torch.empty(n_samples, n_latents).exponential_(generator=g)
    offset = 0.5 * torch.randn(n_features, generator=g)
    x = sources @ atoms + 0.1 * torch.randn(n_samples, n_features, generator=g) + offset
    model = SAE(n_features, n_latents, activation, k=None if activation == "relu" else k, seed=seed)
    with torch.no_grad():
        model.W_enc.copy_(atoms + 0.05 * torch.randn(n_latents, n_features, generator=g))
        model.b_enc.fill_(-0.3)
    return model, x


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_float32_compensated_statistics_are_accurate_enough(activation, monkeypatch):
    model, x = sae_problem(activation)
    ref = collect_stats(model, x)
    comp = collect_stats(model, x, dtype="float32")
    with monkeypatch.context() as m:  # the same float32 products, added without compensation
        m.setattr(pam, "_two_sum_", lambda total, comp_, term: total.add_(term))
        plain = collect_stats(model, x, dtype="float32")
    assert (comp.n, comp.nnz) == (ref.n, ref.nnz) and torch.equal(comp.fired, ref.fired)
    err = {name: rel(getattr(comp, name), getattr(ref, name)) for name in SUMS}
    err["sum_xx"] = abs(comp.sum_xx - ref.sum_xx) / ref.sum_xx
    err_plain = {name: rel(getattr(plain, name), getattr(ref, name)) for name in SUMS}

    D0, b0 = model.W_dec.detach(), model.b_dec.detach()
    D64, b64, _ = solve_decoder(ref, D0, b0)
    D32, b32, _ = solve_decoder(comp, D0, b0)
    best = decoder_objective(ref, D64, b64, D0, b0)
    excess = (decoder_objective(ref, D32, b32, D0, b0) - best) / best
    recorded = abs(decoder_objective(comp, D32, b32, D0, b0) / decoder_objective(ref, D32, b32, D0, b0) - 1)
    print(f"\n{activation} ({'sparse' if model.is_topk else 'dense'} path): compensated "
          + ", ".join(f"{k} {v:.2e}" for k, v in err.items()) + "; plain float32 "
          + ", ".join(f"{k} {v:.2e}" for k, v in err_plain.items())
          + f"; decoder rel. diff {rel(D32, D64):.2e}, objective excess {excess:.2e}, recorded objective {recorded:.2e}"
          + f" (objective {best:.4g}, data MSE scale {ref.sum_xx / (ref.n * ref.n_features):.4g})")
    assert max(err.values()) <= 1e-6, err                                                     # criterion 1
    for name in ("zz_upper", "zx"):                                                            # criterion 2
        assert err_plain[name] >= 3 * err[name], (name, err_plain[name], err[name])
    assert excess <= 1e-6                                                                      # criterion 3
    assert recorded <= 1e-5                                                                    # criterion 4


def test_two_sum_keeps_what_plain_float32_addition_loses():
    total, comp = torch.ones(3), torch.zeros(3)
    plain = torch.ones(3)
    for _ in range(10_000):
        pam._two_sum_(total, comp, torch.full((3,), 1e-4))
        plain += 1e-4
    exact = 1 + 10_000 * float(torch.tensor(1e-4))  # the float32 terms, summed exactly
    assert torch.allclose(total.double() + comp.double(), torch.full((3,), exact, dtype=torch.float64), atol=1e-8)
    assert abs(float(plain[0]) - exact) > 1e-5


@pytest.mark.parametrize("activation,n_latents", [("topk", 200), ("topk", 20), ("relu", 30)])
def test_float32_statistics_sum_across_parts_like_float64(activation, n_latents):
    """Several processes add the float64 conversions of each rank's statistics (common/infra/distributed.py): the
    parts' sum is as close to the whole's float64 statistics as one float32 pass is."""
    torch.manual_seed(3)
    x = torch.randn(2000, 12) * 2 + 1
    model = SAE(12, n_latents, activation, k=None if activation == "relu" else 4, seed=4)
    ref = collect_stats(model, x, batch_size=128)
    parts = [collect_stats(model, x[r::2], batch_size=128, dtype="float32") for r in range(2)]
    assert parts[0].zz_upper.dtype == torch.float64
    assert sum(p.n for p in parts) == ref.n and sum(p.nnz for p in parts) == ref.nnz
    for name in SUMS:
        assert rel(sum(getattr(p, name) for p in parts), getattr(ref, name)) < 1e-6, name
    assert torch.equal(parts[0].fired | parts[1].fired, ref.fired)


def test_stats_dtype_is_validated():
    assert TrainConfig(stats_dtype="float32").stats_dtype == "float32"
    with pytest.raises(ValueError, match=r"stats_dtype must be one of \('float64', 'float32'\), got 'float16'"):
        TrainConfig(stats_dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        collect_stats(SAE(3, 4, "relu"), torch.zeros(2, 3), dtype="bfloat16")
    assert STATS_DTYPES[0] == "float64"  # the default, bit-identical to before the option


def test_pam_trains_alike_with_float32_statistics():
    """train() with stats_dtype="float32": the same epochs as float64 up to the statistics' rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 6, generator=g).clamp(min=0) @ torch.randn(6, 10, generator=g) + 1.0
    hist = {}
    for dtype in STATS_DTYPES:
        model = SAE(10, 24, "topk", k=3, seed=1)
        cfg = TrainConfig(method="pam", epochs=3, batch_size=64, lr=3e-3, solve_batch=128, stats_dtype=dtype)
        hist[dtype] = train(model, x[:1000], x[1000:], cfg, seed=2, progress=False)
    for a, b in zip(hist["float64"][1:], hist["float32"][1:]):
        for key in ("objective_after_solve", "train_mse", "test_mse"):
            assert abs(a[key] - b[key]) <= 1e-5 * a[key], (key, a[key], b[key])
    assert hist["float32"][-1]["test_mse"] < 0.5 * hist["float32"][0]["test_mse"]


@pytest.mark.parametrize("script", ["exp_e2_MNIST_SGD_PAM_ablations.py", "exp_e3_LLM_SGD_PAM_ablations.py"])
def test_scripts_accept_float32_statistics_only_by_name(script, tmp_path):
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, script, "--STATS_DTYPE=float16", "--out", str(tmp_path / "out")], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--STATS_DTYPE=float16: expected one of float64, float32" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("activation,n_latents", [("topk", 400), ("relu", 100)])
def test_float32_statistics_on_cuda_match_float64_on_the_cpu(activation, n_latents):
    torch.manual_seed(5)
    x = torch.randn(5000, 24) * 2 + 1
    model = SAE(24, n_latents, activation, k=None if activation == "relu" else 8, seed=6)
    ref = collect_stats(model, x)
    on_gpu = collect_stats(model.to("cuda"), x.to("cuda"), dtype="float32")
    assert on_gpu.zx.device.type == "cuda" and on_gpu.zx.dtype == torch.float64
    for name in SUMS:
        assert rel(getattr(on_gpu, name).cpu(), getattr(ref, name)) < 1e-6, name
    assert on_gpu.nnz == ref.nnz and torch.equal(on_gpu.fired.cpu(), ref.fired)
