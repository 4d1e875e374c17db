"""The SAE model: activations, tied/untied decoder, sparse decode, checkpoints, input checks."""
import pytest
import torch

from common.maths.sae import SAE, SPARSE_DECODE_MAX_DENSITY, activate, check_activation, topk_sparse


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


# --- the activation table ----------------------------------------------------------------------------------
def test_activation_table_says_what_each_activation_is():
    from common.maths.sae import (ACTIVATION_TABLE, ACTIVATIONS, PENALTIES, REGIONS, TOPK_ACTIVATIONS, Activation,
                                  activation_spec)
    assert ACTIVATIONS == ("topk", "topk_relu", "topk_abs", "relu", "jumprelu", "batchtopk")
    expect = {  # takes_k, sparse_k, penalty, regions, threshold, saelens, sparsify
        "topk": (True, True, "none", "order_k", None, None, None),
        "topk_relu": (True, True, "none", "order_k", None, "topk", "topk"),
        "topk_abs": (True, True, "none", "order_k_signed", None, "abstopk", None),
        "relu": (False, False, "l1", "patterns", None, "standard", "topk"),
        "jumprelu": (False, False, "l0", "shifted_patterns", "learned", "jumprelu", None),
        "batchtopk": (True, False, "none", "shifted_patterns", "running", "jumprelu", None)}
    for name, a in ACTIVATION_TABLE.items():
        assert isinstance(a, Activation) and a.name == name and activation_spec(name) is a
        assert (a.takes_k, a.sparse_k, a.penalty, a.regions, a.threshold, a.saelens, a.sparsify) == expect[name]
        assert a.penalty in PENALTIES and a.regions in REGIONS
        assert a.nearest_export in ACTIVATION_TABLE and (a.saelens and a.sparsify or a.inexact_note)
    assert TOPK_ACTIVATIONS == ("topk", "topk_relu", "topk_abs")
    with pytest.raises(ValueError, match="unknown activation 'gelu'; accepted: topk, .*batchtopk"):
        activation_spec("gelu")


@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("batchtopk", 3)])
def test_k_is_kept_only_by_activations_that_take_one(activation, k):
    assert SAE(4, 8, activation, 3).k == k and SAE(4, 8, activation, 3).config.k == k
    if k is not None:
        with pytest.raises(ValueError, match="needs an integer k"):
            SAE(4, 8, activation)


def test_jumprelu_forward_by_hand():
    a = torch.tensor([[0.5, -1.0, 0.2, 2.0], [0.05, 0.3, -0.1, 0.0]])
    theta = torch.tensor([0.4, 0.0, 0.3, 2.0])
    # kept where a > theta (strictly): 0.5 > 0.4; 0.3 > 0.0; everything else zero
    expect = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0]])
    assert torch.equal(activate(a, "jumprelu", threshold=theta), expect)
    model = SAE(2, 4, "jumprelu", seed=0)
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]))
        model.b_enc.copy_(torch.tensor([0.0, 0.0, -0.5, 0.0]))
        model.threshold.copy_(torch.tensor([0.4, 0.0, 0.3, 2.0]))
    x = torch.tensor([[0.5, 1.0], [1.0, -1.0]])
    # preacts: [0.5, 1.0, 1.0, 1.5] and [1.0, -1.0, -0.5, -3.0]
    codes = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(model.encode(x), codes)
    assert torch.equal(model(x).codes, codes) and torch.equal(model.forward_train(x, 0.05).codes, codes)
    torch.testing.assert_close(model(x).recon, codes @ model.W_dec + model.b_dec)


def test_batchtopk_forward_by_hand():
    a = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.1, 4.0, 1.0, -2.0], [0.2, 0.3, 1.5, 0.0]])
    model = SAE(4, 4, "batchtopk", 2, seed=0)
    # training, k = 2, 3 rows: the 6 largest ReLU values of the batch, 4, 3, 2, 1.5, 1, 0.5 (0.3, 0.2, 0.1 dropped)
    expect = torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.0, 4.0, 1.0, 0.0], [0.0, 0.0, 1.5, 0.0]])
    assert torch.equal(model.act.train_codes(a, 2), expect)
    # inference: a > theta, one theta for every latent
    assert torch.equal(activate(a, "batchtopk", 2, torch.tensor(0.25)),
                       torch.tensor([[3.0, 0.0, 0.5, 2.0], [0.0, 4.0, 1.0, 0.0], [0.0, 0.3, 1.5, 0.0]]))


def test_batchtopk_keeps_exactly_k_times_batch_nonzeros_in_training():
    g = torch.Generator().manual_seed(0)
    for n, d, k in ((1, 10, 3), (7, 20, 4), (128, 64, 5)):
        model = SAE(9, d, "batchtopk", k, seed=1, enc_init_scale=1.0)
        x = torch.randn(n, 9, generator=g) + 0.5
        assert (model.preacts(x) > 0).sum() >= k * n  # enough positive values to keep
        codes = model.forward_train(x).codes
        assert int((codes != 0).sum()) == k * n
        counts = (codes != 0).sum(1)
        if n == 128:
            assert counts.min() < k < counts.max()  # per row, not k each: chosen over the batch
        relu = model.preacts(x).clamp(min=0).detach()
        kept = relu[codes != 0]
        assert kept.min() >= relu[codes == 0].max()  # the largest values, whichever rows they are in


def test_batchtopk_running_threshold_by_hand():
    from common.maths.sae import BATCHTOPK_THRESHOLD_RATE as r
    model = SAE(3, 5, "batchtopk", 1, seed=2, enc_init_scale=1.0).double()
    g = torch.Generator().manual_seed(3)
    expect = 0.0
    assert float(model.threshold) == 0.0 and "threshold" in dict(model.named_buffers())
    for _ in range(3):
        x = torch.randn(4, 3, generator=g, dtype=torch.float64) + 1.0
        codes = model.forward_train(x).codes
        smallest = codes[codes > 0].min().item()
        expect = (1 - r) * expect + r * smallest
        assert float(model.threshold) == pytest.approx(expect, rel=1e-12)
    model(x)  # inference does not move it
    model.encode(x)
    assert float(model.threshold) == pytest.approx(expect, rel=1e-12)
    assert torch.equal(model.encode(x), model.preacts(x) * (model.preacts(x) > expect))


def _smoothed_jumprelu(a, theta, eps):
    """E over u ~ U(-eps/2, eps/2) of (a + u) H(a + u - theta), elementwise, in closed form: (1/eps) times the
    integral of (a + u) du from lo = clip(theta - a, -eps/2, eps/2) to eps/2."""
    hi = eps / 2
    lo = (theta - a).clamp(-hi, hi)
    return ((a * hi + hi ** 2 / 2) - (a * lo + lo ** 2 / 2)) / eps


def _smoothed_step(a, theta, eps):
    """E over u ~ U(-eps/2, eps/2) of H(a + u - theta) = clip((a - theta) / eps + 1/2, 0, 1)."""
    return ((a - theta) / eps + 0.5).clamp(0.0, 1.0)


def test_jumprelu_estimators_are_derivatives_of_the_smoothed_objective():
    """theta-gradients of sum g z and of the L0 term against central finite differences of the objective with every
    pre-activation smeared by the rectangle kernel (docs/DESIGN.md 3.10); the a-gradient by hand, H(a - theta) g."""
    from common.maths.sae import JumpReLU
    g = torch.Generator().manual_seed(4)
    eps, h = 0.3, 1e-6
    a = torch.rand(400, 3, generator=g, dtype=torch.float64) * 2 - 0.5
    theta = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    w = torch.randn(400, 3, generator=g, dtype=torch.float64)
    a_, t_ = a.clone().requires_grad_(), theta.clone().requires_grad_()
    (JumpReLU().train_codes(a_, threshold=t_, bandwidth=eps) * w).sum().backward()
    t0 = theta.clone().requires_grad_()
    l0 = JumpReLU().l0(a, t0, eps)
    l0.backward()
    assert l0.item() == pytest.approx(float((a > theta).double().sum(1).mean()))
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        fd = ((_smoothed_jumprelu(a, theta + e, eps) * w).sum() - (_smoothed_jumprelu(a, theta - e, eps) * w).sum()) / (2 * h)
        assert t_.grad[i].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)
        fd0 = (_smoothed_step(a, theta + e, eps).sum(1).mean() - _smoothed_step(a, theta - e, eps).sum(1).mean()) / (2 * h)
        assert t0.grad[i].item() == pytest.approx(fd0.item(), rel=1e-6, abs=1e-8)
        assert t0.grad[i].item() != 0 and t_.grad[i].item() != 0  # the band holds points: a real check
    assert torch.equal(a_.grad, (a > theta).double() * w)


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_thresholded_models_checkpoint_with_their_threshold(tmp_path, activation):
    model = SAE(6, 9, activation, 2, seed=4)
    with torch.no_grad():
        model.threshold.fill_(0.05) if activation == "batchtopk" else model.threshold.uniform_(0, 0.1)
    torch.save(model.checkpoint(), tmp_path / "m.pt")
    back = SAE.from_checkpoint(torch.load(tmp_path / "m.pt"))
    assert torch.equal(back.threshold, model.threshold)
    x = torch.randn(5, 6)
    assert torch.equal(model(x)[0], back(x)[0])
    assert any(p is model.threshold for p in model.encoder_parameters()) == (activation == "jumprelu")

def test_library_bad_input_is_an_error_naming_the_argument():
    """NaN rows have no active set; mismatched shapes, indices out of range, a zero batch size and a float32 input to
    a float64 model are ValueErrors naming the argument, never raw torch errors (or an answer)."""
    from common.maths.metrics import evaluate
    from common.maths.pam import DecoderStats, solve_decoder

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
