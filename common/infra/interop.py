"""Save and load our SAE in the formats of SAELens 6.x and EleutherAI sparsify 1.3, and load any of three formats.

Every format is a folder holding a ``cfg.json`` and a safetensors file; nothing is pickled, and the peer
packages are never imported here (they stay optional: tests/test_interop.py opens our exports with their own
loaders when they are installed).

    save_safetensors(model, folder) / load_safetensors(folder)   ours:     cfg.json + sae.safetensors (sae_files.py)
    save_saelens(model, folder)     / load_saelens(folder)       SAELens:  cfg.json + sae_weights.safetensors
    save_sparsify(model, folder)    / load_sparsify(folder)      sparsify: cfg.json + sae.safetensors
    detect_format(folder) (sae_files.py), load_any(folder)       which of the three a folder holds; load it

Ours (``common/infra/sae_files.py``): ``cfg.json`` and ``sae.safetensors``, the same parameters bit for bit on load.
The peer exports also write ``splinterp.json`` (our config, which activation was exported, whether exactly) and
``splinterp.safetensors`` (our b_enc and centre); both libraries ignore extra files. They restore what the peer
file cannot say (the centre and b_enc as they were, tied, the init fields), so that ours -> peer -> ours gives
the same parameters bit for bit; they are used only while the peer file's encoder bias is still exactly what
we wrote, and are never needed to load.

The maps (one sample, docs/DESIGN.md section 1; D = the atoms, rows; c = centre, 0 when not centred):

    ours      a = W_enc (x - c) + b_enc              z = rho(a)    xhat = D^T z + b_dec
    library   a = W' (x - s b') + b_enc'             z = rho'(a)   xhat = D'^T z + b'      (s = 1 if the
              library subtracts its decoder bias b' before encoding: sparsify always, SAELens when
              apply_b_dec_to_input, else s = 0)

Decoding must agree for every code, so D' = D and b' = b_dec; the encoders then agree when
W' = W_enc and b_enc' = b_enc + W_enc (s b_dec - c). That is exact algebra: the library's pre-activations are
ours (computed in float64, rounded once to the parameters' dtype), so with the same activation the codes and
the reconstruction are ours up to float rounding (a TopK selection can only differ on a near-tie).

Conventions, ours -> SAELens 6.54 (read by ``sae_lens.SAE.load_from_disk``):

| ours | SAELens file |
|---|---|
| weights | ``sae_weights.safetensors``; cfg ``dtype`` = the parameters' dtype |
| ``W_enc`` (n_latents, n_features) | ``W_enc`` (d_in, d_sae) = our W_enc transposed |
| ``b_enc`` | ``b_enc`` = b_enc (c == b_dec) or b_enc - W_enc c (= ``SAE.encoder_bias``) |
| fixed ``centre`` c | ``apply_b_dec_to_input`` true when c == b_dec, else false (c is folded into b_enc) |
| atoms (``W_dec`` rows; ``W_enc`` rows if tied) | ``W_dec`` (d_sae, d_in), same rows (a copy when tied) |
| ``b_dec`` | ``b_dec`` |
| ``topk_relu`` / ``topk_abs`` / ``relu`` | architecture ``topk`` / ``abstopk`` / ``standard``: exact |
| ``jumprelu`` | architecture ``jumprelu``, tensor ``threshold`` (d_sae,) = our threshold (>= 0): exact |
| ``batchtopk`` (at inference) | ``jumprelu``, its one threshold per latent: exact (SAELens saves BatchTopK so) |
| ``topk`` (signed) | refused (``allow_inexact``: written as ``topk``, i.e. ReLU'd) |
| atom norms as trained | ``rescale_acts_by_decoder_norm: false``; ``normalize_activations: none`` |

Conventions, ours -> sparsify 1.3.3 (read by ``sparsify.SparseCoder.load_from_disk``):

| ours | sparsify file |
|---|---|
| weights | ``sae.safetensors``; the tensors' dtype |
| ``W_enc`` (n_latents, n_features) | ``encoder.weight`` (num_latents, d_in), the same matrix |
| ``b_enc`` and fixed ``centre`` c | ``encoder.bias`` = b_enc + W_enc (b_dec - c) (sparsify always subtracts b_dec) |
| atoms (``W_dec`` rows; ``W_enc`` rows if tied) | ``W_dec`` (num_latents, d_in), same rows (a copy when tied) |
| ``b_dec`` | ``b_dec`` |
| ``topk_relu`` | ``activation: topk``, our k (ReLU, then top k): exact |
| ``relu`` | ``activation: topk`` with k = num_latents: exact |
| ``topk``, ``topk_abs`` | refused (``allow_inexact``: written as ``topk_relu``) |
| ``jumprelu``, ``batchtopk`` | refused (``allow_inexact``: written as ``relu``, the threshold dropped) |
| atom norms as trained | written as they are; ``normalize_decoder`` = whether they already have norm 1 |

Loading back: the centre and b_enc come from ``splinterp.safetensors`` when it is there and still matches; else
SAELens ``apply_b_dec_to_input`` true and sparsify give centre = b_dec (a fixed copy), SAELens false no centre.

Why the activations map as they do. SAELens's TopK keeps the k largest pre-activations and then applies ReLU:
our ``topk_relu``, operation for operation. sparsify applies ReLU first and then keeps the k largest: when at
least k pre-activations are positive both keep the same k values; when fewer are, both keep every positive one
and fill up with zeros, so the codes (as dense vectors) and the reconstruction are the same. ReLU then top-k over
all latents is plain ReLU, which is how ``relu`` goes to sparsify (its decode then touches every latent).
Our signed ``topk`` keeps negative selected values, which both libraries zero; sparsify also has no
magnitude TopK. Those exports raise ValueError, or, with ``allow_inexact=True``, write the nearest library model
(``topk_relu``'s) with a warning: the library's reconstruction then differs wherever a selected value is
negative (``topk``) or the selection differs (``topk_abs`` to sparsify).

Decoder norms. SAELens's ``rescale_acts_by_decoder_norm`` ranks a_i ||D_i|| and divides the codes by ||D_i||
again when decoding: with atoms of unequal norm that changes the TopK selection, so the export writes ``false``
and keeps the atoms as trained (codes identical to ours). A SAELens file with ``true`` is loaded exactly by
folding the norms in (W_enc_i, b_enc_i times ||D_i||, D_i divided by it: what ``fold_W_dec_norm`` does); an atom
of norm 0 gives NaN in SAELens, here a zero atom. sparsify renormalises atoms only while training
(``normalize_decoder``), never when loading, so its export keeps them too.

Loading a peer folder gives an SAE whose reconstructions are the library's (and so the original's, for an exact
export): activation from the architecture (``topk`` -> ``topk_relu``, ``abstopk`` -> ``topk_abs``, ``standard`` ->
``relu``, ``jumprelu`` -> ``jumprelu`` with threshold max(threshold, 0), SAELens's map, or ``batchtopk`` when
``splinterp.json`` says so and the thresholds are all equal; sparsify ``topk`` -> ``topk_relu``; k equal to the
number of latents -> ``relu``, unless ``splinterp.json`` says the model was ``topk_relu``); untied, unless ``splinterp.json`` says tied and W_dec equals
W_enc exactly. Without our sidecar files (a folder the library wrote, or one whose encoder bias was changed
since), the input shift comes back as the library has it: centre = b_dec, or none with the centre folded into
b_enc; the same map with other parameters. Refused on load (ValueError): other SAELens architectures (gated,
...), ``normalize_activations`` other than ``none``, a fine-tuning scaling factor other than 1,
sparsify ``groupmax``, transcoders, skip connections, files without a decoder.

Float rounding. The library's pre-activations equal ours to rounding (the folded bias, its own matmul), so a
TopK selection can differ where the k-th and (k+1)-th pre-activations are nearly tied; that sample's
reconstruction then differs by about the difference of two atoms. Measured with a random centred model at the
LLM sizes (640 features, 4096 latents, k 320, float32, 2,000 samples): SAELens 1 sample, sparsify 0; without a
centre 0 and 0; elsewhere the largest difference was 3e-5 on values up to 15. Save a float64 model to make
this rarer. sparsify's ``forward`` runs under bfloat16 autocast on CUDA devices that support it: compare its
``encode`` / ``decode`` there, or disable autocast.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..maths.sae import ACTIVATION_TABLE, ACTIVATIONS, SAE, activation_spec
from .sae_files import (CFG_FILE, FORMAT_NAME, FORMAT_VERSION, SAELENS_WEIGHTS, SIDECAR_FILE, SIDECAR_TENSORS,
                        SPARSIFY_WEIGHTS, cfg_dtype, cfg_int, detect_format, dtype_name, effective_centre, expect_keys,
                        expect_shape, is_centred, load_safetensors, load_tensors, read_json, write_folder, wrong_format)

# Written as metadata.sae_lens_version: SAELens reads files without one as pre-6.0 configs and converts them.
SAELENS_FORMAT_VERSION = "6.54.12"
# Our activations each format reproduces exactly (the activation table's export names, common/maths/sae.py).
EXACT_ACTIVATIONS = {"safetensors": ACTIVATIONS,
                     "saelens": tuple(n for n, a in ACTIVATION_TABLE.items() if a.saelens),
                     "sparsify": tuple(n for n, a in ACTIVATION_TABLE.items() if a.sparsify)}
# a SAELens architecture loads as the first of our activations that exports to it (jumprelu, not batchtopk:
# a batchtopk model comes back as such only when splinterp.json says so and its thresholds are all equal)
_SAELENS_ACTIVATION = {}
for _name, _act in ACTIVATION_TABLE.items():
    if _act.saelens:
        _SAELENS_ACTIVATION.setdefault(_act.saelens, _name)
_SAELENS_TOPK = ("topk", "abstopk")  # the SAELens architectures with k and rescale_acts_by_decoder_norm
_INIT_FIELDS = ("enc_init_scale", "dec_init_scale", "init")


# --- helpers ------------------------------------------------------------------------------------------
def _shifted_bias(w_enc: torch.Tensor, b_enc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """b_enc + W_enc v, computed in float64 and rounded once to b_enc's dtype (b_enc itself when v == 0)."""
    if not v.any():
        return b_enc.detach().clone()
    return (b_enc.detach().double() + w_enc.detach().double() @ v.detach().double()).to(b_enc.dtype)


def _saelens_encoder_bias(w_enc, b_enc, centre, centred: bool, b_dec):
    """(apply_b_dec_to_input, SAELens b_enc) for our (W_enc, b_enc, centre): the library's own convention when
    the centre is b_dec, else no input shift and b_enc' = b_enc - W_enc c (= SAE.encoder_bias)."""
    if centred and torch.equal(centre, b_dec):
        return True, b_enc.detach().clone()
    return False, _shifted_bias(w_enc, b_enc, -centre)


def _sparsify_encoder_bias(w_enc, b_enc, centre, b_dec):
    """sparsify's encoder.bias: b_enc + W_enc (b_dec - c), since sparsify always subtracts b_dec first."""
    return _shifted_bias(w_enc, b_enc, b_dec - centre)


def _check_export(model: SAE, fmt: str, allow_inexact: bool) -> str:
    """The activation the library will run; ValueError (or a warning) when it is not exactly ours."""
    if not isinstance(model, SAE):
        raise TypeError(f"expected a common.maths.sae.SAE, got {type(model).__name__}")
    if model.activation in EXACT_ACTIVATIONS[fmt]:
        return model.activation
    lib = {"saelens": "SAELens", "sparsify": "sparsify"}[fmt]
    nearest = model.act.nearest_export
    msg = (f"activation {model.activation!r} cannot be exported exactly to {lib}: it {model.act.inexact_note}. "
           f"Exact exports: {', '.join(EXACT_ACTIVATIONS[fmt])}.")
    if not allow_inexact:
        raise ValueError(msg + f" Pass allow_inexact=True to write the library's nearest model ({nearest!r}) anyway.")
    warnings.warn(msg + f" Writing it as {nearest!r} (allow_inexact=True): the library's reconstructions will differ "
                  "from this model's wherever that matters.", UserWarning, stacklevel=4)
    return nearest


def _sidecar(model: SAE, fmt: str, exported_as: str) -> dict:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "exported_to": fmt,
            "source_config": asdict(model.config), "source_centred": is_centred(model),
            "exported_activation": exported_as, "exact": exported_as == model.activation,
            "note": "written by common.infra.interop (SplInterp); the library ignores this file"}


def _save_peer(model: SAE, folder, fmt: str, allow_inexact: bool, layout, weights_name: str) -> Path:
    """A peer export: ``layout(model, activation, centre)`` gives the library's cfg.json and tensors for the
    activation it will run (``_check_export``); our sidecar files go beside them (module docstring)."""
    activation = _check_export(model, fmt, allow_inexact)
    centre = effective_centre(model)
    cfg, tensors = layout(model, activation, centre)
    return write_folder(folder, cfg, tensors, weights_name, _sidecar(model, fmt, activation),
                  {"b_enc": model.b_enc, "centre": centre})


def _read_sidecar(folder: Path, n_features: int, n_latents: int) -> dict | None:
    path = folder / SIDECAR_FILE
    if not path.is_file():
        return None
    side = read_json(path)
    src = side.get("source_config") or {}
    if side.get("format") != FORMAT_NAME or src.get("n_features") != n_features or src.get("n_latents") != n_latents:
        return None  # not ours, or for another model: ignore it
    if side.get("exact") is False:
        warnings.warn(f"{folder} was exported inexactly (activation {src.get('activation')!r} written as "
                      f"{side.get('exported_activation')!r}): loading the library's model, not the original",
                      UserWarning, stacklevel=3)
    return side


def _restore(folder: Path, side: dict | None, expected_b_enc, lib_bias) -> tuple | None:
    """Our original (b_enc, centre) from ``splinterp.safetensors``, if they give the file's encoder bias bit for
    bit through ``lib_bias(b_enc, centre, centred)`` (so the file was not changed since our export); else None
    and the library's own parameters are used (the same map, folded)."""
    path = folder / SIDECAR_TENSORS
    if side is None or not path.is_file():
        return None
    t = load_tensors(path)
    if set(t) != {"b_enc", "centre"} or t["b_enc"].shape != expected_b_enc.shape:
        return None
    b_enc, centre = t["b_enc"].to(expected_b_enc.dtype), t["centre"].to(expected_b_enc.dtype)
    written = lib_bias(b_enc, centre, bool(side.get("source_centred")))
    if written is None or not torch.equal(written, expected_b_enc):
        return None
    return b_enc, centre


def _build(*, activation: str, k, w_enc, b_enc, w_dec, b_dec, centre=None, threshold=None, side: dict | None = None,
           dtype: torch.dtype) -> SAE:
    """An SAE with these parameters (W_enc, W_dec (n_latents, n_features); ``threshold`` (n_latents,) for a
    thresholded activation); tied when ``side`` says the original was tied and W_dec equals W_enc exactly."""
    n_latents, n_features = w_enc.shape
    src = (side or {}).get("source_config", {})
    if activation == "topk_relu" and k == n_latents and src.get("activation") != "topk_relu":
        activation = "relu"  # top-k of all latents then ReLU is ReLU
    source = ACTIVATION_TABLE.get(src.get("activation"))
    if (threshold is not None and source is not None and source.threshold == "running"
            and source.saelens == activation_spec(activation).saelens and torch.all(threshold == threshold[0])):
        # a batchtopk model at inference is a jumprelu one with one threshold for every latent
        activation, k, threshold = source.name, src.get("k"), threshold[0]
    tied = bool(src.get("tied")) and torch.equal(w_enc, w_dec)
    init = {f: src[f] for f in _INIT_FIELDS if f in src}
    model = SAE(n_features, n_latents, activation, k, tied=tied, **init).to(dtype)
    state = {"W_enc": w_enc, "b_enc": b_enc, "b_dec": b_dec,
             "centre": centre if centre is not None else torch.zeros(n_features, dtype=dtype)}
    if not tied:
        state["W_dec"] = w_dec
    if threshold is not None:
        state["threshold"] = threshold
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()})
    model.set_centre(model.centre.clone())
    return model


def load_any(folder) -> SAE:
    """Load whichever of the three formats ``folder`` holds."""
    return {"safetensors": load_safetensors, "saelens": load_saelens,
            "sparsify": load_sparsify}[detect_format(folder)](folder)


# --- SAELens ------------------------------------------------------------------------------------------
def save_saelens(model: SAE, folder, *, allow_inexact: bool = False) -> Path:
    """A folder ``sae_lens.SAE.load_from_disk`` opens (SAELens 6.x): architecture ``topk`` (our topk_relu),
    ``abstopk`` (topk_abs), ``standard`` (relu) or ``jumprelu`` (jumprelu, and batchtopk at inference), with the
    centre folded in (module docstring). Signed ``topk`` raises ValueError unless ``allow_inexact``."""
    return _save_peer(model, folder, "saelens", allow_inexact, _saelens_file, SAELENS_WEIGHTS)


def _saelens_file(model: SAE, activation: str, centre: torch.Tensor) -> tuple[dict, dict]:
    """SAELens's cfg.json and tensors for ``model`` run as ``activation``."""
    apply_b_dec, b_enc = _saelens_encoder_bias(model.W_enc, model.b_enc, centre, is_centred(model), model.b_dec)
    act = activation_spec(activation)
    arch = act.saelens
    cfg = {"d_in": model.n_features, "d_sae": model.n_latents, "dtype": dtype_name(model.W_enc.dtype),
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION}}
    if arch in _SAELENS_TOPK:
        cfg.update(k=model.k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = arch
    tensors = {"W_enc": model.W_enc.T, "b_enc": b_enc, "W_dec": model.atoms, "b_dec": model.b_dec}
    if act.threshold:
        if (model.threshold < 0).any():
            raise ValueError(f"a {activation} threshold below 0 has no SAELens equivalent (SAELens applies "
                             "ReLU before its threshold; training keeps thresholds >= 0)")
        tensors["threshold"] = model.threshold.expand(model.n_latents)  # batchtopk: its one threshold, per latent
    return cfg, tensors


def load_saelens(folder) -> SAE:
    """An SAE computing what SAELens computes for the folder (architectures standard, topk, abstopk, jumprelu)."""
    folder = Path(folder)
    wrong_format(folder, "saelens")
    cfg = read_json(folder / CFG_FILE)
    arch = cfg.get("architecture")
    k = cfg.get("k", 100)  # TopKSAEConfig's default
    if arch is None:  # a pre-6.0 config, as SAELens's handle_pre_6_0_config reads it
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        kwargs = cfg.get("activation_fn_kwargs") or {}
        arch = "topk" if fn == "topk" and kwargs.get("k") is not None else "standard" if fn == "relu" else fn
        k = kwargs.get("k", k)
    if arch not in _SAELENS_ACTIVATION:
        raise ValueError(f"{folder}: SAELens architecture {arch!r} has no equivalent here; accepted: "
                         f"{', '.join(_SAELENS_ACTIVATION)}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(f"{folder}: normalize_activations={norm!r} rescales the input at run time; only 'none' "
                         "loads exactly (fold the normalisation into the weights in SAELens first)")
    d_in, d_sae, dtype = cfg_int(cfg, "d_in", folder), cfg_int(cfg, "d_sae", folder), cfg_dtype(cfg.get("dtype", "float32"))
    if arch in _SAELENS_TOPK:  # the TopK architectures read k; standard and jumprelu have none
        k = cfg_int({"k": k}, "k", folder, high=d_sae)
    path = folder / SAELENS_WEIGHTS
    tensors = {name: t.to(dtype) for name, t in load_tensors(path).items()}  # SAELens casts to cfg dtype too
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            if not torch.all(tensors[name] == 1):
                raise ValueError(f"{folder}: a fine-tuning scaling factor other than 1 is not supported")
            del tensors[name]
    thresholded = arch == "jumprelu"
    expect_keys(tensors, {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if thresholded else set()), path)
    for name, shape in (("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("W_dec", (d_sae, d_in)), ("b_dec", (d_in,)),
                        ("threshold", (d_sae,))):
        if name in tensors:
            expect_shape(tensors[name], shape, name, path)
    # SAELens's JumpReLU: relu(a) * (a > threshold), the same map as ours with the threshold max(threshold, 0)
    threshold = tensors["threshold"].clamp(min=0) if thresholded else None
    w_enc, b_enc, w_dec, b_dec = tensors["W_enc"].T.contiguous(), tensors["b_enc"], tensors["W_dec"], tensors["b_dec"]
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    centre = b_dec.clone() if apply_b_dec else None
    side = _read_sidecar(folder, d_in, d_sae)
    rescale = arch in _SAELENS_TOPK and cfg.get("rescale_acts_by_decoder_norm", False)

    def exported_bias(b, c, centred):  # what save_saelens writes for (b_enc, centre) = (b, c)
        apply, bias = _saelens_encoder_bias(w_enc, b, c, centred, b_dec)
        return bias if apply == apply_b_dec else None

    original = None if rescale else _restore(folder, side, b_enc, exported_bias)
    if original is not None:
        b_enc, centre = original
    if rescale:
        # SAELens ranks a_i ||D_i|| and decodes (z_i / ||D_i||) D_i: fold the norms in (fold_W_dec_norm)
        s = w_dec.double().norm(dim=1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        w_enc = (w_enc.double() * s[:, None]).to(dtype)
        b_enc = (b_enc.double() * s).to(dtype)
        w_dec = torch.where((s > 0)[:, None], w_dec.double() / safe[:, None], 0.0).to(dtype)
    return _build(activation=_SAELENS_ACTIVATION[arch], k=int(k) if arch in _SAELENS_TOPK else None, w_enc=w_enc,
                  b_enc=b_enc, w_dec=w_dec, b_dec=b_dec, centre=centre, threshold=threshold, side=side, dtype=dtype)


# --- sparsify -----------------------------------------------------------------------------------------
def save_sparsify(model: SAE, folder, *, allow_inexact: bool = False) -> Path:
    """A folder ``sparsify.SparseCoder.load_from_disk`` opens (sparsify 1.3): activation ``topk`` with our k
    (topk_relu) or with k = n_latents (relu); encoder bias shifted so that sparsify's subtraction of b_dec
    gives our pre-activations. ``topk`` and ``topk_abs`` raise ValueError unless ``allow_inexact``."""
    return _save_peer(model, folder, "sparsify", allow_inexact, _sparsify_file, SPARSIFY_WEIGHTS)


def _sparsify_file(model: SAE, activation: str, centre: torch.Tensor) -> tuple[dict, dict]:
    """sparsify's cfg.json and tensors for ``model`` run as ``activation``."""
    k = model.k if activation_spec(activation).takes_k else model.n_latents  # relu: ReLU then top-(all)
    b_enc = _sparsify_encoder_bias(model.W_enc, model.b_enc, centre, model.b_dec)
    norms = model.atoms.detach().double().norm(dim=1)
    unit = bool(torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-5))
    expansion = model.n_latents // model.n_features if model.n_latents % model.n_features == 0 else 32
    cfg = {"activation": "topk", "expansion_factor": expansion,  # ignored: num_latents > 0
           "normalize_decoder": unit, "num_latents": model.n_latents, "k": k, "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": model.n_features}
    return cfg, {"encoder.weight": model.W_enc, "encoder.bias": b_enc, "W_dec": model.atoms, "b_dec": model.b_dec}


def load_sparsify(folder) -> SAE:
    """An SAE computing what sparsify computes for the folder (a TopK sparse autoencoder)."""
    folder = Path(folder)
    wrong_format(folder, "sparsify")
    cfg = read_json(folder / CFG_FILE)
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder}: sparsify activation {cfg.get('activation')!r} has no equivalent here; "
                         "only 'topk' loads")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag, False):
            raise ValueError(f"{folder}: {flag}=true is not a sparse autoencoder of our form")
    d_in = cfg_int(cfg, "d_in", folder)
    n_latents = cfg_int(cfg, "num_latents", folder, default=0, low=0) or d_in * cfg_int(cfg, "expansion_factor",
                                                                                         folder, default=32)
    k = cfg_int(cfg, "k", folder, default=32, high=n_latents)
    if not 1 <= k <= n_latents:
        raise ValueError(f"{folder}: k={k} outside 1..num_latents={n_latents}")
    path = folder / SPARSIFY_WEIGHTS
    tensors = load_tensors(path)
    expect_keys(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, path,
                 " (a file saved without its decoder cannot be loaded)" if "W_dec" not in tensors else "")
    for name, shape in (("encoder.weight", (n_latents, d_in)), ("encoder.bias", (n_latents,)),
                        ("W_dec", (n_latents, d_in)), ("b_dec", (d_in,))):
        expect_shape(tensors[name], shape, name, path)
    # sparsify builds the model in the dtype of the file's first tensor and copies every tensor into it
    dtype = tensors[sorted(tensors)[0]].dtype
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    w_enc, b_enc, b_dec = tensors["encoder.weight"], tensors["encoder.bias"], tensors["b_dec"]
    centre = b_dec.clone()
    side = _read_sidecar(folder, d_in, n_latents)
    original = _restore(folder, side, b_enc, lambda b, c, centred: _sparsify_encoder_bias(w_enc, b, c, b_dec))
    if original is not None:
        b_enc, centre = original
    return _build(activation="topk_relu", k=k, w_enc=w_enc, b_enc=b_enc, w_dec=tensors["W_dec"], b_dec=b_dec,
                  centre=centre, side=side, dtype=dtype)
