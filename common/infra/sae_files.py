"""Our SAE file format, and the folder plumbing every format of ``common/infra/interop.py`` shares.

Every format is a folder holding a ``cfg.json`` and a safetensors file; nothing is pickled.

    save_safetensors(model, folder) / load_safetensors(folder)   ours:     cfg.json + sae.safetensors
    detect_format(folder)                                        'safetensors' (ours), 'saelens' or 'sparsify'

Ours: ``cfg.json`` is ``SAE.config`` (its fields) plus ``centred`` (whether the model subtracts its centre), ``dtype`` and
``format``/``format_version``; ``sae.safetensors`` holds the ``state_dict`` under our parameter names
(``W_enc``, ``b_enc``, ``W_dec`` unless tied, ``b_dec``, ``centre``). A load gives back the same parameters,
bit for bit. The peer exports (``common/infra/interop.py``) also write ``splinterp.json`` (our config, which activation was exported,
whether exactly) and ``splinterp.safetensors`` (our b_enc and centre); both libraries ignore extra files.
They restore what the peer file cannot say (the centre and b_enc as they were, tied, the init fields), so
that ours -> peer -> ours gives the same parameters bit for bit; they are used only while the peer file's
encoder bias is still exactly what we wrote, and are never needed to load.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..maths.sae import SAE, SAEConfig

CFG_FILE = "cfg.json"
OURS_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SIDECAR_FILE = "splinterp.json"
SIDECAR_TENSORS = "splinterp.safetensors"
FORMAT_NAME, FORMAT_VERSION = "splinterp-sae", 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# --- helpers ------------------------------------------------------------------------------------------
def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with storage of its own (safetensors refuses shared or strided tensors)."""
    return t.detach().to("cpu").contiguous().clone()


def is_centred(model: SAE) -> bool:
    return model.centred


def effective_centre(model: SAE) -> torch.Tensor:
    """The centre the model subtracts (zeros when it is not centred)."""
    return model.centre if is_centred(model) else torch.zeros_like(model.centre)


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot export parameters of dtype {dtype}; accepted: {', '.join(_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def cfg_dtype(name) -> torch.dtype:
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in cfg.json; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def write_folder(folder, cfg: dict, tensors: dict, weights_name: str, sidecar: dict | None = None,
           sidecar_tensors: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: _cpu(v) for k, v in tensors.items()}, str(folder / weights_name))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    for name in (SIDECAR_FILE, SIDECAR_TENSORS):  # stale ones from an earlier export to this folder
        if (folder / name).exists():
            (folder / name).unlink()
    if sidecar is not None:
        (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    if sidecar_tensors is not None:
        save_file({k: _cpu(v) for k, v in sidecar_tensors.items()}, str(folder / SIDECAR_TENSORS))
    return folder


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path) as f:
            out = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return out


_REQUIRED = object()


def cfg_int(cfg: dict, key: str, folder: Path, default=_REQUIRED, low: int = 1, high: int | None = None) -> int:
    """cfg[key] as an integer in [low, high]: ValueError naming the folder and the key when it is missing (without
    a default), not an integer (2.5, "3", true) or out of range."""
    if key not in cfg or cfg[key] is None:
        if default is _REQUIRED:
            raise ValueError(f"{folder}: {CFG_FILE} has no {key!r} (an integer), which this format requires")
        return default
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{folder}: {CFG_FILE} has {key}={cfg[key]!r}; expected an integer {bound}")
    return v


def load_tensors(path: Path) -> dict:
    """The tensors of a safetensors file, every one finite: ValueError naming the file when it is unreadable
    (truncated, not safetensors) or a tensor holds NaN/Inf."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values")
    return tensors


def expect_keys(tensors: dict, expected: set, path: Path, hint: str = "") -> None:
    got = set(tensors)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(f"{path}: unexpected tensors (missing {missing}, unexpected {extra}){hint}")


def expect_shape(t: torch.Tensor, shape: tuple, name: str, path: Path) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}")


def wrong_format(folder: Path, wanted: str) -> None:
    fmt = detect_format(folder)
    if fmt != wanted:
        raise ValueError(f"{folder} holds a {fmt!r} export, not {wanted!r}: use load_{fmt}() or load_any()")


# --- format detection ---------------------------------------------------------------------------------
def detect_format(folder) -> str:
    """'safetensors' (ours), 'saelens' or 'sparsify': which format ``folder`` holds; ValueError if none."""
    folder = Path(folder)
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: no {CFG_FILE}, not an SAE folder of any known format")
    cfg = read_json(cfg_path)  # decided by cfg.json, so a stale weights file of another format does not mislead
    if cfg.get("format") == FORMAT_NAME and (folder / OURS_WEIGHTS).is_file():
        return "safetensors"
    if "d_sae" in cfg and (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if "d_in" in cfg and (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    raise ValueError(f"{folder}: {CFG_FILE} and its weights match none of ours, SAELens's "
                     f"({SAELENS_WEIGHTS}) or sparsify's ({SPARSIFY_WEIGHTS} with d_in in {CFG_FILE})")


# --- ours ---------------------------------------------------------------------------------------------
def save_safetensors(model: SAE, folder) -> Path:
    """Our format: ``cfg.json`` (``SAE.config``, ``centred``, ``dtype``, format tag) and ``sae.safetensors``
    (the state_dict under our names; the centre is written as the model uses it: zeros when not centred)."""
    if not isinstance(model, SAE):
        raise TypeError(f"expected a common.maths.sae.SAE, got {type(model).__name__}")
    state = {name: t for name, t in model.state_dict().items()}
    state["centre"] = effective_centre(model)
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(model.config),
           "centred": is_centred(model), "dtype": dtype_name(model.W_enc.dtype)}
    return write_folder(folder, cfg, state, OURS_WEIGHTS)


def load_safetensors(folder) -> SAE:
    """The SAE ``save_safetensors`` wrote: same config, same parameters bit for bit, on the CPU."""
    folder = Path(folder)
    wrong_format(folder, "safetensors")
    cfg = read_json(folder / CFG_FILE)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: format_version {cfg.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    config = {f.name: cfg[f.name] for f in fields(SAEConfig) if f.name in cfg}
    for key in ("n_features", "n_latents"):
        config[key] = cfg_int(cfg, key, folder)
    if config.get("k") is not None:
        config["k"] = cfg_int(cfg, "k", folder, high=config["n_latents"])
    dtype = cfg_dtype(cfg.get("dtype", "float32"))
    try:
        model = SAE(**config).to(dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder}: {CFG_FILE} describes no valid SAE ({err})") from None
    path = folder / OURS_WEIGHTS
    tensors = load_tensors(path)
    expect_keys(tensors, set(model.state_dict()), path)
    for name, t in model.state_dict().items():
        expect_shape(tensors[name], tuple(t.shape), name, path)
    model.load_state_dict(tensors)
    model.set_centre(model.centre.clone())
    if is_centred(model) != bool(cfg.get("centred", is_centred(model))):
        raise ValueError(f"{folder}: cfg.json says centred={cfg.get('centred')} but the centre tensor disagrees")
    return model
