"""The field's TopK recipe (common.experiments.recipe): each element against an independent computation."""
from dataclasses import fields

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from common.experiments import recipe
from common.maths.pam import collect_stats, decoder_objective, solve_decoder
from common.maths.sae import SAE
from common.maths.steps import _aux_loss, lr_factor
from common.maths.train import NonFiniteError, TrainConfig, train


def toy(n=600, n_features=10, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, n_features, generator=g)
    x = torch.randn(n, 6, generator=g).clamp(min=0) @ basis + offset + 0.05 * torch.randn(n, n_features, generator=g)
    return x[: n * 5 // 6], x[n * 5 // 6:]


def test_paper_recipe_is_todays_default_everywhere():
    s = recipe.recipe_settings("paper", 256, paper_lr=3e-3)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert s.pop("init") == "paper" == SAE(4, 8, "topk", 2).config.init
    assert s.pop("lr") == 3e-3
    assert all(defaults[k] == v for k, v in s.items()), s
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe.recipe_settings("nodern", 256, paper_lr=3e-3)


def test_library_lr_is_sparsifys_scale():
    assert recipe.library_lr(2 ** 14) == pytest.approx(2e-4)
    assert recipe.library_lr(256) == pytest.approx(1.6e-3)
    assert recipe.recipe_settings("modern", 256, paper_lr=3e-3)["lr"] == pytest.approx(1.6e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_transpose_unit_init(tied):
    model = SAE(12, 20, "topk", 3, tied=tied, init="transpose_unit", seed=4)
    assert torch.allclose(model.atoms.norm(dim=1), torch.ones(20), atol=1e-6)
    assert torch.equal(model.W_enc, model.atoms)
    assert not torch.equal(model.W_enc, SAE(12, 20, "topk", 3, init="transpose_unit", seed=5).W_enc)
    with pytest.raises(ValueError, match="unknown init"):
        SAE(12, 20, "topk", 3, init="kaiming")


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g) ** 3  # skewed: median and mean differ
    m = recipe.geometric_median(x).numpy()
    xs = x.double().numpy()
    ref = scipy.optimize.minimize(lambda p: np.linalg.norm(xs - p, axis=1).sum(), xs.mean(0), method="Nelder-Mead",
                                  options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000)).x
    assert np.abs(m - ref).max() < 1e-4
    assert np.abs(m - xs.mean(0)).max() > 1e-2
    assert torch.equal(recipe.centre_of(x, "mean"), x.double().mean(0))


def test_centre_is_subtracted_before_encoding_and_survives_a_checkpoint():
    model = SAE(6, 9, "topk", 2, seed=0).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64)
    model.set_centre(c)
    expect = (x - c) @ model.W_enc.T + model.b_enc
    assert torch.allclose(model.preacts(x), expect, atol=1e-12)
    assert torch.allclose(x @ model.W_enc.T + model.encoder_bias, expect, atol=1e-12)  # what geometry uses
    back = SAE.from_checkpoint(model.float().checkpoint())
    assert torch.equal(back.centre, c.float()) and torch.equal(back(x.float()).recon, model(x.float()).recon)
    with pytest.raises(ValueError, match=r"centre must have shape \(6,\)"):
        model.set_centre(torch.zeros(5))


def test_b_dec_init_and_centring_set_from_the_training_data():
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, seed=1)
    train(model, xtr, xte, TrainConfig(method="pam", epochs=0, b_dec_init="mean", centre_input=True), progress=False)
    assert torch.allclose(model.b_dec, xtr.mean(0)) and torch.allclose(model.centre, xtr.mean(0))
    with pytest.raises(ValueError, match="centre_input needs a centre"):
        TrainConfig(centre_input=True)


def test_unit_norm_gradient_projection_and_renormalisation():
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, init="transpose_unit", seed=1)
    hist = train(model, xtr, xte, TrainConfig(method="sgd", epochs=3, batch_size=32, lr=1e-2, unit_norm_atoms=True),
                 progress=False)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)
    assert hist[-1]["test_mse"] < 0.5 * hist[0]["test_mse"]
    # the projection leaves each atom's gradient orthogonal to the atom
    from common.maths.steps import _project_atom_gradient
    model.zero_grad()
    F.mse_loss(model(xtr[:50]).recon, xtr[:50]).backward()
    raw = model.W_dec.grad.clone()
    _project_atom_gradient(model.W_dec)
    atoms = model.W_dec.detach()
    assert (model.W_dec.grad * atoms).sum(1).abs().max() < 1e-6 < (raw * atoms).sum(1).abs().max()
    assert torch.allclose(model.W_dec.grad, raw - (raw * atoms).sum(1, keepdim=True) * atoms, atol=1e-7)


def test_aux_loss_value_and_gradient_reach_only_dead_latents():
    torch.manual_seed(0)
    model = SAE(8, 12, "topk", 2, seed=3).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    out = model.forward_topk(x)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 5, 9]] = True
    cfg = TrainConfig(aux_k=3, aux_coef=0.5)
    loss = _aux_loss(model, x, out, dead, cfg)
    # independent: dense masked top-3 of the pre-activations among dead latents, decoded without b_dec
    a = out.preacts.detach()
    masked = torch.where(dead, a, torch.full_like(a, -1e30))
    keep = masked.topk(3, dim=1).indices
    z = torch.zeros_like(a).scatter(1, keep, a.gather(1, keep).clamp(min=0))
    e = (x - out.recon).detach()
    expect = 0.5 * (3 / 3) * ((z @ model.W_dec.detach() - e) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-12)
    model.zero_grad()
    loss.backward()
    live = ~dead
    assert model.W_enc.grad[live].abs().max() == 0 and model.W_enc.grad[dead].abs().max() > 0
    assert _aux_loss(model, x, out, torch.zeros(12, dtype=torch.bool), cfg) is None
    # fewer dead latents than aux_k: scaled by #dead / aux_k (sparsify)
    small = _aux_loss(model, x, out, dead, TrainConfig(aux_k=8, aux_coef=0.5))
    assert float(small.detach()) > 0


def test_auxk_raises_a_dead_latents_preactivation_towards_the_residual_it_can_explain():
    # latent 3 never wins the top 1, its atom e_0 explains the residual's first coordinate (which the live
    # latents leave unexplained), and its pre-activation is small and positive: AuxK must raise it
    model = SAE(4, 4, "topk", 1, seed=0).double()
    with torch.no_grad():
        model.W_enc.zero_(), model.b_enc.zero_(), model.W_dec.zero_(), model.b_dec.zero_()
        for i in range(3):
            model.W_enc[i, i + 1] = model.W_dec[i, i + 1] = 1.0
        model.W_enc[3, 0] = 0.1
        model.W_dec[3, 0] = 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 4, generator=g, dtype=torch.float64) + torch.tensor([1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    dead = torch.tensor([False, False, False, True])
    opt = torch.optim.SGD(model.encoder_parameters(), lr=0.1)
    before = model.preacts(x)[:, 3].detach().clone()
    for _ in range(5):
        out = model.forward_topk(x)
        assert not (out.idx == 3).any()
        opt.zero_grad()
        _aux_loss(model, x, out, dead, TrainConfig(aux_k=1, aux_coef=1.0)).backward()
        opt.step()
    after = model.preacts(x)[:, 3].detach()
    assert (after > before).all()
    assert model.W_enc.grad[:3].abs().max() == 0


def test_keep_unfired_atoms_is_an_exact_minimiser():
    torch.manual_seed(0)
    n, nf, d = 300, 7, 12
    x = torch.randn(n, nf, dtype=torch.float64)
    model = SAE(nf, d, "topk", 3, seed=2).double()
    with torch.no_grad():
        model.b_enc[[0, 5]] = -1e3  # latents 0 and 5 never fire
    stats = collect_stats(model, x)
    assert not stats.fired[0] and not stats.fired[5] and stats.fired.sum() == d - 2
    D0, b0 = model.W_dec.detach().clone(), model.b_dec.detach().clone()
    D, b, _ = solve_decoder(stats, D0, b0, keep_unfired=True)
    Dz, bz, _ = solve_decoder(stats, D0, b0)
    assert torch.equal(D[[0, 5]], D0[[0, 5]]) and Dz[[0, 5]].abs().max() < 1e-12
    fired = stats.fired
    assert torch.allclose(D[fired], Dz[fired], atol=1e-12) and torch.allclose(b, bz, atol=1e-12)
    # independent: least squares on the fired latents only, with a constant column for b_dec
    z = model.encode(x).detach()[:, fired]
    sol = np.linalg.lstsq(np.c_[z.numpy(), np.ones(n)], x.numpy(), rcond=None)[0]
    assert np.abs(D[fired].numpy() - sol[:-1]).max() < 1e-6 and np.abs(b.numpy() - sol[-1]).max() < 1e-6
    obj = decoder_objective(stats, D, b, D0, b0)
    assert obj == pytest.approx(decoder_objective(stats, Dz, bz, D0, b0), rel=1e-9)
    # alpha > 0: the minimiser of a free atom is unique (mu/(alpha+mu) D0) and is kept as solved
    Da, _, _ = solve_decoder(stats, D0, b0, alpha=1e-3, mu=1e-3, keep_unfired=True)
    assert torch.allclose(Da[[0, 5]], 0.5 * D0[[0, 5]], atol=1e-12)


def test_pam_with_the_modern_recipe_keeps_atoms_of_latents_that_never_fire():
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, init="transpose_unit", seed=1)
    with torch.no_grad():
        model.b_enc[3] = -1e4
    start = model.W_dec[3].detach().clone()
    cfg = TrainConfig(method="pam", epochs=2, batch_size=32, lr=1e-3, keep_dead_atoms=True, b_dec_init="mean",
                      centre_input=True)
    train(model, xtr, xte, cfg, progress=False)
    assert torch.equal(model.W_dec[3].detach(), start)


def test_warmup_decay_schedule():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, seed=1)
    hist = train(model, xtr, xte, TrainConfig(method="sgd", epochs=4, batch_size=32, lr=1e-2,
                                              lr_schedule="warmup_decay", warmup_steps=5), progress=False)
    assert hist[-1]["test_mse"] < 0.5 * hist[0]["test_mse"]


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_divergence_fails_loudly_naming_run_method_and_epoch(method):
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, seed=1)
    with pytest.raises(NonFiniteError, match=rf"myrun \({method}\), epoch 1"):
        train(model, xtr * 1e30, xte, TrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2), progress=False,
              desc="myrun")
