"""Metrics: sample-weighted over the whole set, independent of the batch size."""
import numpy as np
import pytest
import torch

from common.maths.metrics import data_sums, evaluate, fvu, mse
from common.maths.sae import SAE


def test_evaluate_matches_direct_formulas_for_any_batch_size():
    torch.manual_seed(0)
    x = torch.randn(333, 8) * 3 + 2
    for activation in ("topk", "relu"):
        model = SAE(8, 12, activation, k=None if activation == "relu" else 3, seed=1)
        with torch.no_grad():
            model.b_enc.fill_(-0.05)
            recon, codes, _ = model(x)
        xn, rn, cn = x.double().numpy(), recon.double().numpy(), codes.numpy()
        ref = {
            "mse": ((xn - rn) ** 2).mean(),
            "fvu": ((xn - rn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum(),
            "l0": (cn != 0).sum(1).mean(),
            "dead": 1 - (cn != 0).any(0).mean(),
        }
        for bs in (1000, 100, 7):  # uneven last batch: means stay sample-weighted
            got = evaluate(model, x, batch_size=bs)
            cached = evaluate(model, x, batch_size=bs, sums_of_x=data_sums(x, 50))  # model-free sums once
            for key, val in ref.items():
                assert abs(cached[key] - val) < 1e-6 * max(1, abs(val)), (activation, bs, key)
                assert abs(got[key] - val) < 1e-6 * max(1, abs(val)), (activation, bs, key)  # float32 residuals
        assert abs(mse(x, recon) - ref["mse"]) < 1e-9 and abs(fvu(x, recon) - ref["fvu"]) < 1e-9


def test_dead_latents_counted():
    model = SAE(4, 6, "relu", seed=2)
    with torch.no_grad():
        model.b_enc[:3] = -1e6  # latents 0-2 can never fire
    assert evaluate(model, torch.randn(100, 4))["dead"] >= 0.5
    assert np.isclose(evaluate(SAE(4, 6, "topk", 6), torch.randn(10, 4))["l0"], 6)


def test_mse_and_fvu_reject_mismatched_shapes_and_non_finite_values():
    x = torch.randn(10, 4)
    for bad in (torch.zeros(1, 4), torch.zeros(4), torch.zeros(4, 10), torch.zeros(10, 4, 1)):  # all broadcast
        for f in (mse, fvu):
            with pytest.raises(ValueError, match=r"recon must have shape \(10, 4\) \(the shape of x\), got"):
                f(x, bad)
    with pytest.raises(ValueError, match=r"x must have shape \(n_samples, n_features\), got \(10,\)"):
        mse(torch.zeros(10), torch.zeros(10))
    nan = x.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"recon holds 1 NaN/Inf value\(s\) \(first at index \(3, 1\)\)"):
        mse(x, nan)
    with pytest.raises(ValueError, match="x holds 1 NaN/Inf"):
        fvu(nan, x)
    with pytest.raises(ValueError, match="zero variance"):
        fvu(torch.ones(5, 2), torch.zeros(5, 2))
    assert mse(x, x) == 0.0 and fvu(x, x) == 0.0 and np.isclose(fvu(x, x.mean(0).expand_as(x)), 1.0)


def test_summarise_names_the_empty_set():
    from common.maths.metrics import EvalSums, summarise

    with pytest.raises(ValueError, match=r"empty evaluation set \(n_samples=0\)"):
        summarise(EvalSums.empty(3, 5))
