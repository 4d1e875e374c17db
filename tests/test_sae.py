"""The SAE model: activations, tied/untied decoder, sparse decode, checkpoints, input checks."""
import pytest
import torch

from common.sae import SPARSE_DECODE_MAX_DENSITY, SAE, activate, check_activation, topk_sparse


def test_topk_variants_against_brute_force():
    torch.manual_seed(0)
    a = torch.randn(50, 12)
    k = 4
    for r in range(50):
        row = a[r]
        order = sorted(range(12), key=lambda i: -row[i].item())[:k]
        expect = torch.zeros(12)
        expect[order] = row[order]
        assert torch.equal(activate(a, "topk", k)[r], expect)
        assert torch.equal(activate(a, "topk_relu", k)[r], expect.clamp(min=0))
        order_abs = sorted(range(12), key=lambda i: -abs(row[i].item()))[:k]
        expect_abs = torch.zeros(12)
        expect_abs[order_abs] = row[order_abs]
        assert torch.equal(activate(a, "topk_abs", k)[r], expect_abs)
    assert torch.equal(activate(a, "relu"), a.clamp(min=0))


@pytest.mark.parametrize("activation", ["topk", "topk_relu", "topk_abs", "relu"])
@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_dense_formula(activation, tied):
    torch.manual_seed(1)
    model = SAE(7, 15, activation, k=None if activation == "relu" else 3, tied=tied, seed=2)
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    x = torch.randn(20, 7)
    recon, codes, preacts = model(x)
    assert torch.allclose(preacts, x @ model.W_enc.T + model.b_enc)
    W_dec = model.W_enc.T if tied else model.W_dec.T  # the paper's (n_features, n_latents) decoder (docs/DESIGN.md, section 1)
    assert torch.allclose(recon, codes @ W_dec.T + model.b_dec, atol=1e-6)
    assert torch.allclose(codes, activate(preacts, activation, model.k))


@pytest.mark.parametrize("activation", ["topk", "topk_relu", "topk_abs"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [2, 9])  # below and above the sparse-decode density (d = 20)
def test_forward_gradients_equal_the_dense_formulas(activation, tied, k):
    """Whichever decode forward() picks, the loss and every parameter's gradient are those of the dense
    formula recon = codes @ atoms + b_dec, computed independently in float64."""
    assert 2 <= SPARSE_DECODE_MAX_DENSITY * 20 < 9
    torch.manual_seed(3)
    model = SAE(6, 20, activation, k=k, tied=tied, seed=4)
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    x = torch.randn(30, 6)
    recon, codes, _ = model(x)
    loss = (recon - x).pow(2).mean() + 0.01 * codes.abs().sum(1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))

    ref = {name: p.detach().double().requires_grad_() for name, p in model.named_parameters()}
    a = x.double() @ ref["W_enc"].T + ref["b_enc"]
    mask = torch.zeros_like(a).scatter(1, topk_sparse(a.detach(), k, activation)[1], 1.0)
    z = a * mask if activation != "topk_relu" else (a * mask).clamp(min=0)
    atoms = ref["W_enc"] if tied else ref["W_dec"]
    loss_ref = (z @ atoms + ref["b_dec"] - x.double()).pow(2).mean() + 0.01 * z.abs().sum(1).mean()
    grads_ref = torch.autograd.grad(loss_ref, list(ref.values()))
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, grads_ref):
        assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("activation", ["topk", "topk_abs", "relu"])
@pytest.mark.parametrize("k", [2, 9])
def test_reconstruct_is_forwards_reconstruction_with_its_gradients(activation, k):
    """reconstruct() (training without L1) skips the dense codes but must give forward()'s recon and grads."""
    model = SAE(6, 20, activation, k=k, seed=5)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(6))
    assert model.decodes_sparse == (activation != "relu" and k == 2)

    def recon_and_grads(recon):
        return (recon.detach(), *torch.autograd.grad((recon - x).pow(2).mean(), list(model.parameters())))

    for a, b in zip(recon_and_grads(model(x)[0]), recon_and_grads(model.reconstruct(x))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_same_seed_shares_encoder_between_tied_and_untied():
    a, b = SAE(10, 8, "topk", 2, tied=False, seed=3), SAE(10, 8, "topk", 2, tied=True, seed=3)
    assert torch.equal(a.W_enc, b.W_enc)
    assert b.W_dec is None and "W_dec" in dict(a.named_parameters())
    assert abs(a.W_enc.std().item() - 0.1) < 0.03 and abs(a.W_dec.std().item() - 0.01) < 0.003


def test_checkpoint_round_trip_keeps_decoder(tmp_path):
    model = SAE(6, 9, "topk", 2, seed=4)
    with torch.no_grad():
        model.W_dec.normal_()
        model.b_dec.normal_()
    path = tmp_path / "m.pt"
    torch.save(model.checkpoint(), path)
    back = SAE.from_checkpoint(torch.load(path))
    assert "W_dec" in back.state_dict()
    x = torch.randn(5, 6)
    assert torch.equal(model(x)[0], back(x)[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="topk", k=9), "1 <= k <= n_latents"),
    (dict(activation="topk", k=0), "1 <= k <= n_latents"),
    (dict(activation="topk", k=None), "integer k"),
    (dict(activation="gelu", k=2), "unknown activation 'gelu'"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAE(4, 8, **kwargs)


def test_encode_sparse_rejects_relu():
    with pytest.raises(ValueError, match="TopK"):
        SAE(3, 4, "relu").encode_sparse(torch.randn(2, 3))


def test_topk_sparse_values_match_dense():
    a = torch.randn(30, 10)
    vals, idx = topk_sparse(a, 3, "topk_abs")
    assert torch.equal(torch.zeros(30, 10).scatter(-1, idx, vals), activate(a, "topk_abs", 3))
    check_activation("relu", None, 5)


def test_library_bad_input_is_an_error_naming_the_argument():
    """NaN rows have no active set; mismatched shapes, indices out of range, a zero batch size and a float32 input to
    a float64 model are ValueErrors naming the argument, never raw torch errors (or an answer)."""
    from common.metrics import evaluate
    from common.pam import DecoderStats, solve_decoder

    model = SAE(6, 10, "topk", 3, seed=0)
    x = torch.randn(5, 6)
    x[2, 4] = float("nan")
    with pytest.raises(ValueError, match="x holds NaN/Inf in 1 rows \\(first: row 2\\): no active set"):
        model.encode_sparse(x)
    with pytest.raises(ValueError, match="x has dtype torch.float32, the model's parameters torch.float64"):
        SAE(6, 10, "topk", 3, seed=0).double().encode_sparse(torch.randn(4, 6))
    with pytest.raises(ValueError, match="batch_size must be an int with 1 <= batch_size, got 0"):
        evaluate(model, torch.randn(8, 6), batch_size=0)
    stats = DecoderStats.empty(6, 10)
    good = torch.randn(4, 6)
    vals, idx = torch.rand(4, 3), torch.randint(0, 10, (4, 3))
    for call, match in (
            (lambda: stats.add_dense(good, torch.randn(4, 9)), "codes must have shape \\(4, 10\\)"),
            (lambda: stats.add_dense(torch.randn(4, 5), torch.randn(4, 10)), "x must have shape \\(b, 6\\)"),
            (lambda: stats.add_dense(good, torch.randn(3, 10)), "codes must have shape \\(4, ...\\)"),
            (lambda: stats.add_sparse(good, vals, idx[:, :2]), "idx must be an integer tensor of the shape of vals"),
            (lambda: stats.add_sparse(good, vals, idx + 10), "idx must hold latent indices in 0..9"),
            (lambda: stats.add_sparse(good, vals, idx.float()), "idx must be an integer tensor")):
        with pytest.raises(ValueError, match=match):
            call()
    assert stats.n == 0                      # nothing was added by a refused batch
    data = torch.randn(200, 6)
    with torch.no_grad():
        stats.add_sparse(data, *model.encode_sparse(data)[:2])
    with pytest.raises(ValueError, match="atoms_prev must have shape \\(n_latents, n_features\\) = \\(10, 6\\)"):
        solve_decoder(stats, torch.zeros(6, 10), torch.zeros(6))
    with pytest.raises(ValueError, match="b_prev must have shape \\(n_features,\\) = \\(6,\\)"):
        solve_decoder(stats, torch.zeros(10, 6), torch.zeros(10))
    solve_decoder(stats, torch.zeros(10, 6), torch.zeros(6), alpha=1e-3)
