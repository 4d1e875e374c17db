"""common.infra.interop: our safetensors format, SAELens 6.x and sparsify 1.3 exports and loads.

Fast tests (main .venv, no peer package): round trips give the original's reconstructions; the written files
have the peers' names, shapes and cfg keys; a plain re-implementation of each library's forward pass (written
from its source, below) on the written files gives our reconstructions; refused activations raise.
Slow tests (`.venv-peers/bin/python -m pytest -q -m slow tests/test_interop.py`): the libraries' own loaders
and forward passes, both ways.
"""
import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.infra.interop import EXACT_ACTIVATIONS, load_any, load_saelens, load_sparsify, save_saelens, save_sparsify
from common.infra.sae_files import detect_format, load_safetensors, save_safetensors
from common.maths.sae import SAE

N_FEATURES, N_LATENTS, K = 12, 20, 5
SAVE = {"safetensors": save_safetensors, "saelens": save_saelens, "sparsify": save_sparsify}
LOAD = {"safetensors": load_safetensors, "saelens": load_saelens, "sparsify": load_sparsify}


def make_model(activation="topk_relu", tied=False, centred=False, dtype=torch.float32, seed=0):
    """Every parameter random and non-zero; b_enc negative enough that some samples have fewer than K
    positive pre-activations (where sparsify's ReLU-then-top-k differs in form from our top-k-then-ReLU); a
    threshold (jumprelu: per latent, batchtopk: one) in (0, 1), where it zeroes some positive pre-activations."""
    g = torch.Generator().manual_seed(seed)
    model = SAE(N_FEATURES, N_LATENTS, activation, None if activation == "relu" else K, tied=tied, seed=seed)
    with torch.no_grad():
        if model.threshold is not None:
            model.threshold.copy_(torch.rand(model.threshold.shape, generator=g))
        model.W_enc.copy_(0.5 * torch.randn(N_LATENTS, N_FEATURES, generator=g))
        model.b_enc.copy_(torch.randn(N_LATENTS, generator=g) - 1.5)
        if not tied:
            model.W_dec.copy_(torch.randn(N_LATENTS, N_FEATURES, generator=g) * torch.rand(N_LATENTS, 1, generator=g))
        model.b_dec.copy_(torch.randn(N_FEATURES, generator=g))
    if centred:
        model.set_centre(torch.randn(N_FEATURES, generator=g) + 0.5)
    return model.to(dtype)


def data(n=200, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(n, N_FEATURES, generator=g) + 0.3).to(dtype)


def close(a, b, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- the libraries' forward passes, re-implemented from their source (sae-lens 6.54, sparsify 1.3.3) ----------
def saelens_reference(folder, x):
    """sae_lens TopKSAE / AbsTopKSAE / StandardSAE / JumpReLUSAE: encode (process_sae_in, W_enc, b_enc, optional norm
    rescaling, activation) then decode (optional norm rescaling, W_dec, b_dec)."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    t = load_file(str(Path(folder) / "sae_weights.safetensors"))
    w_enc, b_enc, w_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    hidden = (x - b_dec * cfg["apply_b_dec_to_input"]) @ w_enc + b_enc
    rescale = cfg["architecture"] in ("topk", "abstopk") and cfg["rescale_acts_by_decoder_norm"]
    if rescale:
        hidden = hidden * w_dec.norm(dim=-1)
    if cfg["architecture"] == "standard":
        acts = F.relu(hidden)
    elif cfg["architecture"] == "jumprelu":  # JumpReLUSAE.encode: ReLU, then zero what is <= threshold
        acts = F.relu(hidden) * (hidden > t["threshold"])
    elif cfg["architecture"] == "topk":
        vals, idx = hidden.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(hidden).scatter(-1, idx, vals.relu())
    else:  # abstopk
        idx = hidden.abs().topk(cfg["k"], dim=-1, sorted=False).indices
        acts = torch.zeros_like(hidden).scatter(-1, idx, hidden.gather(-1, idx))
    if rescale:
        acts = acts * (1 / w_dec.norm(dim=-1))
    return acts @ w_dec + b_dec, acts


def sparsify_reference(folder, x):
    """sparsify SparseCoder: x - b_dec, fused_encoder (ReLU of the affine map, then top k), decode + b_dec."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    t = load_file(str(Path(folder) / "sae.safetensors"))
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    return acts @ t["W_dec"] + t["b_dec"], acts


REFERENCE = {"saelens": saelens_reference, "sparsify": sparsify_reference}


# --- round trips ---------------------------------------------------------------------------------------
CASES = [(fmt, act, centred, tied) for fmt in SAVE for act in EXACT_ACTIVATIONS[fmt]
         for centred in (False, True) for tied in (False, True)]


@pytest.mark.parametrize("fmt,activation,centred,tied", CASES)
def test_round_trip_gives_the_same_reconstructions(tmp_path, fmt, activation, centred, tied):
    model, x = make_model(activation, tied, centred), data()
    SAVE[fmt](model, tmp_path / "sae")
    assert detect_format(tmp_path / "sae") == fmt
    back = LOAD[fmt](tmp_path / "sae")
    assert isinstance(back, SAE) and back.W_enc.dtype == torch.float32
    close(back.reconstruct(x), model.reconstruct(x))
    close(back.encode(x), model.encode(x))
    assert back.tied == tied  # peers: restored from splinterp.json (W_dec equals W_enc exactly)
    assert back.activation == activation and back.k == model.k
    # the same model, bit for bit (peers: the centre and b_enc come back from splinterp.safetensors)
    assert back.config == model.config
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[name]) for name, v in model.state_dict().items())
    assert torch.equal(back(x).recon, model(x).recon)
    if fmt != "safetensors":  # the library's own computation on the written files gives our reconstructions
        recon, acts = REFERENCE[fmt](tmp_path / "sae", x)
        close(recon, model.reconstruct(x))
        close(acts, model.encode(x))


def test_topk_relu_cases_cover_fewer_than_k_positive_preacts():
    """The sparsify equivalence (ReLU then top-k vs top-k then ReLU) is tested where it is not trivial."""
    model, x = make_model("topk_relu"), data()
    n_pos = (model.preacts(x) > 0).sum(1)
    assert (n_pos < K).any() and (n_pos >= K).any()


@pytest.mark.parametrize("fmt", list(SAVE))
def test_float64_round_trip_is_tight_and_keeps_dtype(tmp_path, fmt):
    model, x = make_model("topk_relu", centred=True, dtype=torch.float64), data(dtype=torch.float64)
    SAVE[fmt](model, tmp_path / "sae")
    back = LOAD[fmt](tmp_path / "sae")
    assert back.W_enc.dtype == torch.float64
    close(back.reconstruct(x), model.reconstruct(x), torch.float64)


@pytest.mark.parametrize("activation", ["topk_relu", "relu"])
def test_peer_export_without_sidecar_loads_the_folded_model(tmp_path, activation):
    """Without splinterp.*: untied, the centre folded (SAELens) or equal to b_dec (sparsify); same map."""
    model, x = make_model(activation, tied=True, centred=True), data()
    for fmt in ("saelens", "sparsify"):
        folder = SAVE[fmt](model, tmp_path / fmt)
        (folder / "splinterp.json").unlink()
        (folder / "splinterp.safetensors").unlink()
        back = LOAD[fmt](folder)
        assert not back.tied and back.activation == activation
        if fmt == "saelens":
            assert not back.centre.any()
            close(back.b_enc, model.encoder_bias)
        else:
            assert torch.equal(back.centre, model.b_dec.detach())
        close(back.reconstruct(x), model.reconstruct(x))


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_peer_file_changed_after_export_loads_the_file_not_the_sidecar(tmp_path, fmt):
    model, x = make_model("topk_relu", centred=True), data()
    folder = SAVE[fmt](model, tmp_path / fmt)
    weights = folder / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")
    t = load_file(str(weights))
    bias = "b_enc" if fmt == "saelens" else "encoder.bias"
    t[bias] = t[bias] + 0.3  # e.g. fine-tuned in the library since
    save_file(t, str(weights))
    back = LOAD[fmt](folder)
    close(back.reconstruct(x), REFERENCE[fmt](folder, x)[0])
    assert not torch.allclose(back.reconstruct(x), model.reconstruct(x), atol=1e-3)


def test_centre_equal_to_b_dec_uses_saelens_own_convention_bit_for_bit(tmp_path):
    model = make_model("topk_relu")
    model.set_centre(model.b_dec.detach().clone())
    save_saelens(model, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert cfg["apply_b_dec_to_input"] is True and torch.equal(t["b_enc"], model.b_enc.detach())
    back = load_saelens(tmp_path / "s")
    assert torch.equal(back.centre, model.centre) and torch.equal(back.b_enc, model.b_enc)
    # sparsify -> ours -> sparsify: the library's b_dec convention, so b_enc is unchanged bit for bit
    save_sparsify(back, tmp_path / "p")
    assert torch.equal(load_file(str(tmp_path / "p" / "sae.safetensors"))["encoder.bias"], model.b_enc.detach())


# --- the written files: names, shapes, dtypes, cfg keys ----------------------------------------------------
def test_saelens_files_have_saelens_names_shapes_and_cfg(tmp_path):
    for activation, arch in (("topk_relu", "topk"), ("topk_abs", "abstopk"), ("relu", "standard")):
        folder = save_saelens(make_model(activation, centred=True), tmp_path / activation)
        assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "splinterp.json",
                                                      "splinterp.safetensors"}
        t = load_file(str(folder / "sae_weights.safetensors"))
        assert {k: tuple(v.shape) for k, v in t.items()} == {
            "W_enc": (N_FEATURES, N_LATENTS), "b_enc": (N_LATENTS,), "W_dec": (N_LATENTS, N_FEATURES),
            "b_dec": (N_FEATURES,)}
        assert all(v.dtype == torch.float32 for v in t.values())
        cfg = json.loads((folder / "cfg.json").read_text())
        keys = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "metadata", "architecture"}
        if arch != "standard":
            keys |= {"k", "rescale_acts_by_decoder_norm"}
            assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
        assert set(cfg) == keys and cfg["architecture"] == arch
        assert cfg["d_in"] == N_FEATURES and cfg["d_sae"] == N_LATENTS and cfg["dtype"] == "float32"
        assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"].startswith("6.")


def test_sparsify_files_have_sparsify_names_shapes_and_cfg(tmp_path):
    model = make_model("relu", centred=True)
    folder = save_sparsify(model, tmp_path / "s")
    t = load_file(str(folder / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "encoder.weight": (N_LATENTS, N_FEATURES), "encoder.bias": (N_LATENTS,),
        "W_dec": (N_LATENTS, N_FEATURES), "b_dec": (N_FEATURES,)}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert set(cfg) == {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                        "skip_connection", "transcode", "d_in"}
    assert cfg["activation"] == "topk" and cfg["k"] == N_LATENTS  # relu = ReLU then top-(all)
    assert cfg["normalize_decoder"] is False  # atoms are not unit-norm: written as they are
    unit = make_model("topk_relu")
    with torch.no_grad():
        unit.W_dec /= unit.W_dec.norm(dim=1, keepdim=True)
    cfg = json.loads((save_sparsify(unit, tmp_path / "u") / "cfg.json").read_text())
    assert cfg["normalize_decoder"] is True and cfg["k"] == K


def test_our_format_files(tmp_path):
    model = make_model("topk_abs", tied=True, centred=True)
    folder = save_safetensors(model, tmp_path / "o")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["centred"] is True and cfg["tied"] is True and cfg["activation"] == "topk_abs"
    assert set(load_file(str(folder / "sae.safetensors"))) == {"W_enc", "b_enc", "b_dec", "centre"}
    assert not (folder / "splinterp.json").exists()


# --- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,activation", [("saelens", "topk"), ("sparsify", "topk"), ("sparsify", "topk_abs")])
def test_inexact_activations_are_refused(tmp_path, fmt, activation):
    with pytest.raises(ValueError, match=f"activation '{activation}' cannot be exported exactly"):
        SAVE[fmt](make_model(activation), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_allow_inexact_warns_and_writes_the_topk_relu_model(tmp_path, fmt):
    model, x = make_model("topk"), data()
    with pytest.warns(UserWarning, match="allow_inexact=True"):
        SAVE[fmt](model, tmp_path / "x", allow_inexact=True)
    relu_twin = make_model("topk_relu")  # same parameters, the library's activation
    recon, _ = REFERENCE[fmt](tmp_path / "x", x)
    close(recon, relu_twin.reconstruct(x))
    assert not torch.allclose(recon, model.reconstruct(x), atol=1e-3)  # and it is not the original
    with pytest.warns(UserWarning, match="exported inexactly"):
        back = LOAD[fmt](tmp_path / "x")
    assert back.activation == "topk_relu"
    close(back.reconstruct(x), relu_twin.reconstruct(x))


# --- thresholded activations: jumprelu, batchtopk ----------------------------------------------------------
def test_thresholded_activations_export_to_saelens_jumprelu(tmp_path):
    """jumprelu and batchtopk (at inference) are SAELens's JumpReLU: cfg without k, a per-latent threshold tensor
    (batchtopk: its one threshold repeated); back as batchtopk only while splinterp.json says so."""
    x = data()
    for activation in ("jumprelu", "batchtopk"):
        model = make_model(activation, centred=True)
        folder = save_saelens(model, tmp_path / activation)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu" and "k" not in cfg and "rescale_acts_by_decoder_norm" not in cfg
        t = load_file(str(folder / "sae_weights.safetensors"))
        assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} and t["threshold"].shape == (N_LATENTS,)
        assert torch.equal(t["threshold"], model.threshold.detach().expand(N_LATENTS))
        assert ((model.preacts(x) > 0) & (model.encode(x) == 0)).any()  # the threshold zeroes positive values
        (folder / "splinterp.json").unlink()
        (folder / "splinterp.safetensors").unlink()
        bare = load_saelens(folder)
        assert bare.activation == "jumprelu" and bare.k is None
        close(bare.reconstruct(x), model.reconstruct(x))
        close(saelens_reference(folder, x)[0], model.reconstruct(x))


def test_saelens_jumprelu_file_with_negative_thresholds_loads_as_saelens_computes(tmp_path):
    model = make_model("jumprelu")
    folder = save_saelens(model, tmp_path / "s")
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["threshold"] = t["threshold"] - 0.5  # some below 0: SAELens's relu(a) H(a - theta) is then relu(a) there
    assert (t["threshold"] < 0).any()
    save_file(t, str(folder / "sae_weights.safetensors"))
    x = data()
    back = load_saelens(folder)
    assert (back.threshold >= 0).all()
    close(back.reconstruct(x), saelens_reference(folder, x)[0])
    with torch.no_grad():
        model.threshold.sub_(1.0)
    with pytest.raises(ValueError, match="threshold below 0 has no SAELens equivalent"):
        save_saelens(model, tmp_path / "neg")


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_thresholded_activations_to_sparsify_are_refused_or_written_as_relu(tmp_path, activation):
    model, x = make_model(activation), data()
    with pytest.raises(ValueError, match=f"activation '{activation}' cannot be exported exactly to sparsify: it .*"
                                         "no thresholded activation"):
        save_sparsify(model, tmp_path / "x")
    with pytest.warns(UserWarning, match="Writing it as 'relu'"):
        save_sparsify(model, tmp_path / "y", allow_inexact=True)
    relu_twin = SAE(N_FEATURES, N_LATENTS, "relu")  # the same parameters, no threshold
    relu_twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "threshold"})
    close(sparsify_reference(tmp_path / "y", x)[0], relu_twin.reconstruct(x))


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm'"),
    (dict(architecture="gated"), "architecture 'gated' has no equivalent"),
])
def test_saelens_files_we_cannot_load_exactly_are_refused(tmp_path, changes, match):
    folder = save_saelens(make_model(), tmp_path / "s")
    _edit_cfg(folder, **changes)
    with pytest.raises(ValueError, match=match):
        load_saelens(folder)


@pytest.mark.parametrize("changes,match", [
    (dict(activation="groupmax"), "activation 'groupmax'"),
    (dict(transcode=True), "transcode=true"),
    (dict(skip_connection=True), "skip_connection=true"),
])
def test_sparsify_files_we_cannot_load_exactly_are_refused(tmp_path, changes, match):
    folder = save_sparsify(make_model(), tmp_path / "s")
    _edit_cfg(folder, **changes)
    with pytest.raises(ValueError, match=match):
        load_sparsify(folder)


def test_extra_tensors_and_wrong_loader_are_refused(tmp_path):
    folder = save_saelens(make_model(), tmp_path / "s")
    t = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**t, "threshold": torch.zeros(N_LATENTS)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="unexpected \\['threshold'\\]"):
        load_saelens(folder)
    ours = save_safetensors(make_model(), tmp_path / "o")
    with pytest.raises(ValueError, match="holds a 'safetensors' export.*load_safetensors"):
        load_sparsify(ours)
    with pytest.raises(ValueError, match="holds a 'sparsify' export.*load_sparsify"):
        load_safetensors(save_sparsify(make_model(), tmp_path / "p"))
    with pytest.raises(ValueError, match="no cfg.json"):
        detect_format(tmp_path)


def test_load_any_and_a_stale_file_of_another_format(tmp_path):
    model, x = make_model("relu", centred=True), data()
    folder = tmp_path / "sae"
    save_saelens(model, folder)
    save_safetensors(model, folder)  # same folder: cfg.json decides, the stale sae_weights.safetensors does not
    assert detect_format(folder) == "safetensors"
    assert not (folder / "splinterp.json").exists() and not (folder / "splinterp.safetensors").exists()
    assert torch.equal(load_any(folder).reconstruct(x), model.reconstruct(x))


# --- files written the way the libraries write them (not by us) ----------------------------------------------
def test_saelens_native_file_with_decoder_norm_rescaling(tmp_path):
    """A TopK SAE trained by SAELens with rescale_acts_by_decoder_norm and b_dec subtracted from the input."""
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "native"
    folder.mkdir()
    save_file({"W_enc": torch.randn(N_FEATURES, N_LATENTS, generator=g), "b_enc": torch.randn(N_LATENTS, generator=g),
               "W_dec": torch.randn(N_LATENTS, N_FEATURES, generator=g) * 3 * torch.rand(N_LATENTS, 1, generator=g),
               "b_dec": torch.randn(N_FEATURES, generator=g)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": N_FEATURES, "d_sae": N_LATENTS, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "metadata": {"sae_lens_version": "6.54.12"},
        "k": K, "rescale_acts_by_decoder_norm": True, "architecture": "topk"}))
    x = data()
    model = load_saelens(folder)
    assert model.activation == "topk_relu" and not model.tied
    close(model.reconstruct(x), saelens_reference(folder, x)[0])
    # and back out: our export (no rescaling) gives the same reconstructions in SAELens's forward
    save_saelens(model, tmp_path / "again")
    close(saelens_reference(tmp_path / "again", x)[0], saelens_reference(folder, x)[0])


def test_sparsify_native_file(tmp_path):
    g = torch.Generator().manual_seed(4)
    folder = tmp_path / "native"
    folder.mkdir()
    w = torch.randn(N_LATENTS, N_FEATURES, generator=g)
    save_file({"encoder.weight": w, "encoder.bias": torch.randn(N_LATENTS, generator=g) - 1,
               "W_dec": w / w.norm(dim=1, keepdim=True), "b_dec": torch.randn(N_FEATURES, generator=g)},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N_LATENTS, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": N_FEATURES}))
    x = data()
    model = load_sparsify(folder)
    assert model.activation == "topk_relu" and model.k == K
    close(model.reconstruct(x), sparsify_reference(folder, x)[0])


# --- module hygiene --------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["interop.py", "sae_files.py"])
def test_interop_imports_no_peer_package_and_never_unpickles(module):
    src = (Path(__file__).resolve().parent.parent / "common" / "infra" / module).read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." if node.level else node.module.split(".")[0])
    assert mods <= {"__future__", "dataclasses", "json", "warnings", "pathlib", "torch", "safetensors", "."}, mods
    assert "torch.load(" not in src


# --- slow: the libraries' own loaders and forward passes (.venv-peers) -----------------------------------------
def _peer(name):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return __import__(name)
    except ImportError as e:
        pytest.skip(f"{name} cannot be imported ({e}): the peer packages live in .venv-peers (`make peers`); run "
                    "HF_HUB_OFFLINE=1 .venv-peers/bin/python -m pytest -q -m slow tests/test_interop.py")


PEER_CASES = [(act, centred, tied) for act in ("topk_relu", "topk_abs", "relu")
              for centred in (False, True) for tied in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("activation,centred,tied", PEER_CASES)
def test_saelens_own_loader_reproduces_our_model(tmp_path, activation, centred, tied):
    sae_lens = _peer("sae_lens")
    model, x = make_model(activation, tied, centred), data()
    save_saelens(model, tmp_path / "sae")
    lens = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    expected = {"topk_relu": "TopKSAE", "topk_abs": "AbsTopKSAE", "relu": "StandardSAE"}[activation]
    assert type(lens).__name__ == expected
    with torch.no_grad():
        close(lens(x), model.reconstruct(x))
        close(lens.encode(x), model.encode(x))


@pytest.mark.slow
@pytest.mark.parametrize("activation,centred,tied", [(a, c, t) for a in ("jumprelu", "batchtopk")
                                                     for c in (False, True) for t in (False, True)])
def test_saelens_own_loader_reproduces_our_thresholded_models(tmp_path, activation, centred, tied):
    """SAELens's JumpReLUSAE (what it also saves its BatchTopK as) from our export: our codes and reconstructions."""
    sae_lens = _peer("sae_lens")
    model, x = make_model(activation, tied, centred), data()
    save_saelens(model, tmp_path / "sae")
    lens = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(lens).__name__ == "JumpReLUSAE"
    with torch.no_grad():
        close(lens(x), model.reconstruct(x))
        close(lens.encode(x), model.encode(x))
        assert ((model.preacts(x) > 0) & (lens.encode(x) == 0)).any()  # the thresholds are doing something


@pytest.mark.slow
def test_saelens_jumprelu_and_batchtopk_models_load_here(tmp_path):
    """A JumpReLU SAE built and saved by SAELens, and a BatchTopK training SAE saved for inference (as JumpReLU,
    its running threshold per latent), load with SAELens's reconstructions."""
    sae_lens = _peer("sae_lens")
    g = torch.Generator().manual_seed(7)
    x = data()
    lens = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=N_FEATURES, d_sae=N_LATENTS, apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        lens.threshold.copy_(torch.rand(N_LATENTS, generator=g))
    lens.save_model(tmp_path / "jump")
    model = load_saelens(tmp_path / "jump")
    assert model.activation == "jumprelu"
    with torch.no_grad():
        close(model.reconstruct(x), lens(x))
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    train_sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=N_FEATURES, d_sae=N_LATENTS, k=K,
                                                                rescale_acts_by_decoder_norm=False))
    with torch.no_grad():
        for p in train_sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        train_sae.topk_threshold.fill_(0.4)
    train_sae.save_inference_model(tmp_path / "batch")
    inference = sae_lens.SAE.load_from_disk(tmp_path / "batch")
    model = load_saelens(tmp_path / "batch")
    assert type(inference).__name__ == "JumpReLUSAE" and model.activation == "jumprelu"
    with torch.no_grad():
        close(model.reconstruct(x), inference(x))


@pytest.mark.slow
@pytest.mark.parametrize("activation,centred,tied", [c for c in PEER_CASES if c[0] != "topk_abs"])
def test_sparsify_own_loader_reproduces_our_model(tmp_path, activation, centred, tied):
    sparsify = _peer("sparsify")
    model, x = make_model(activation, tied, centred), data()
    save_sparsify(model, tmp_path / "sae")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        close(coder(x).sae_out, model.reconstruct(x))
        enc = coder.encode(x)
        codes = torch.zeros(len(x), N_LATENTS).scatter(-1, enc.top_indices, enc.top_acts)
        close(codes, model.encode(x))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "abstopk", "standard"])
def test_saelens_saved_model_loads_here(tmp_path, arch):
    """A model built and saved by SAELens itself (decoder-norm rescaling on, b_dec subtracted) loads exactly."""
    sae_lens = _peer("sae_lens")
    cls, cfg_cls = {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig),
                    "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig)}[arch]
    extra = {} if arch == "standard" else {"k": K, "rescale_acts_by_decoder_norm": True}
    lens = cls(cfg_cls(d_in=N_FEATURES, d_sae=N_LATENTS, apply_b_dec_to_input=True, **extra))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        lens.W_dec.mul_(2 * torch.rand(N_LATENTS, 1, generator=g))
    lens.save_model(tmp_path / "lens")
    model, x = load_saelens(tmp_path / "lens"), data()
    with torch.no_grad():
        close(model.reconstruct(x), lens(x))


@pytest.mark.slow
def test_sparsify_saved_model_loads_here(tmp_path):
    sparsify = _peer("sparsify")
    torch.manual_seed(6)
    coder = sparsify.SparseCoder(N_FEATURES, sparsify.SparseCoderConfig(num_latents=N_LATENTS, k=K))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(-1.0, 1.0)
    coder.save_to_disk(tmp_path / "coder")
    model, x = load_sparsify(tmp_path / "coder"), data()
    with torch.no_grad():
        close(model.reconstruct(x), coder(x).sae_out)


def _without_cfg_key(folder, key):
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg[key]
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _poison(folder, weights, name, value):
    t = load_file(str(folder / weights))
    t[name] = t[name].clone()
    t[name].view(-1)[0] = value
    save_file(t, str(folder / weights))


BAD_FOLDERS = [   # (format, how the folder is damaged, the message (regex))
    ("saelens", lambda f: _edit_cfg(f, k=2.7), "has k=2.7; expected an integer 1..20"),
    ("sparsify", lambda f: _edit_cfg(f, k=2.5), "has k=2.5; expected an integer 1..20"),
    ("safetensors", lambda f: _edit_cfg(f, k=2.5), "has k=2.5; expected an integer 1..20"),
    ("saelens", lambda f: _edit_cfg(f, k=99), "has k=99; expected an integer 1..20"),
    ("sparsify", lambda f: _edit_cfg(f, d_in="12"), "has d_in='12'; expected an integer"),
    ("saelens", lambda f: _without_cfg_key(f, "d_in"), "has no 'd_in'"),
    ("sparsify", lambda f: _without_cfg_key(f, "d_in"), "match none of ours"),
    ("saelens", lambda f: (f / "cfg.json").write_text("{not json"), "cfg.json: not valid JSON"),
    ("saelens", lambda f: _poison(f, "sae_weights.safetensors", "W_dec", float("nan")), "'W_dec' holds 1 NaN/Inf"),
    ("sparsify", lambda f: _poison(f, "sae.safetensors", "encoder.bias", float("inf")), "'encoder.bias' holds 1"),
    ("safetensors", lambda f: _poison(f, "sae.safetensors", "b_dec", float("nan")), "'b_dec' holds 1 NaN/Inf"),
    ("saelens", lambda f: (f / "sae_weights.safetensors").write_bytes(
        (f / "sae_weights.safetensors").read_bytes()[:-30]), "not a readable safetensors file"),
    ("sparsify", lambda f: _edit_cfg(f, d_in=13), "encoder.weight has shape \\(20, 12\\), expected \\(20, 13\\)"),
    ("saelens", lambda f: _edit_cfg(f, d_sae=21), "W_enc has shape \\(12, 20\\), expected \\(12, 21\\)"),
]


@pytest.mark.parametrize("fmt, damage, match", BAD_FOLDERS, ids=[f"{f}-{m[:20]}" for f, _, m in BAD_FOLDERS])
def test_damaged_folders_are_refused_naming_the_folder(tmp_path, fmt, damage, match):
    """k an integer, every weight finite, shapes matching cfg.json, the cfg readable: otherwise a ValueError (or
    FileNotFoundError) whose message names the folder, never a library error or a silent k = int(2.7)."""
    folder = SAVE[fmt](make_model(), tmp_path / "sae")
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        LOAD[fmt](folder)
    assert str(folder) in str(err.value)
