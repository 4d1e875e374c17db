"""A folder of shards: activations stored as many 2-D arrays, and its index (docs/DESIGN.md, section 9.1).

A **folder of shards** holds 2-D arrays (rows = samples, columns = features) as ``*.npy`` and/or
``*.safetensors`` files (one tensor each), read in name order; their rows, concatenated, are the data set.
An optional ``index.json`` (written by :class:`ShardWriter`, hence by the sharded extraction of
``common/infra/activations.py``) lists every shard with its rows and sha256: a folder that does not match it (a
shard missing, added, resized or changed) is refused with ``DataError`` naming the file (:func:`check_index`).

:class:`Shard` reads one file's layout from its header alone and copies given rows of it through memory maps of at
most ``SPAN_BYTES`` each, unmapped after the copy; ``common/infra/stream.py`` reads a folder through them.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from .data import DataError
from .outputs import file_sha256

SUFFIXES = (".npy", ".safetensors")
INDEX = "index.json"
INDEX_FORMAT = "splinterp-shards/1"
SPAN_BYTES = 64 << 20     # the most of a file mapped at once
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def shard_files(path) -> list[Path]:
    """The ``*.npy`` and ``*.safetensors`` files of a folder, in name order (a missing or empty folder:
    DataError naming it)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder of shards (expected a folder of *.npy / *.safetensors files)")
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path}: no *.npy or *.safetensors shards in this folder")
    return files


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Shard:
    """One shard's layout: rows, width, dtype, and how to map it (read from its header only)."""

    def __init__(self, path: Path):
        self.path = path
        self.stamp = _stamp(path)
        if path.suffix == ".npy":
            self._npy_header()
        else:
            self._safetensors_header()
        if len(self.shape) != 2 or self.shape[0] == 0 or self.shape[1] == 0 or self.dtype.kind not in "fiu":
            raise DataError(f"{path}: expected a non-empty 2-D array (n_samples, n_features) of real numbers, "
                            f"got shape {tuple(self.shape)} and dtype {self.dtype}")
        self.rows, self.width = int(self.shape[0]), int(self.shape[1])
        if self.offset is not None:  # the data the header describes must be in the file (nothing is mapped yet)
            need = self.offset + self.rows * self.width * self.dtype.itemsize
            if self.stamp[0] < need:
                raise DataError(f"{path}: truncated: {self.stamp[0]} bytes, but its header describes {self.rows} x "
                                f"{self.width} {self.dtype} ({need} bytes)")

    def _npy_header(self) -> None:
        """Shape, dtype, order and data offset from the .npy header alone (the file is neither loaded nor mapped)."""
        fmt = np.lib.format
        try:
            with open(self.path, "rb") as f:
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read(f)
                self.offset = f.tell()
        except Exception as err:  # noqa: BLE001 - numpy raises several types on a damaged header
            raise DataError(f"{self.path}: not a readable .npy file ({type(err).__name__}: {err})") from None
        self.shape, self.dtype, self.name = tuple(shape), np.dtype(dtype), None
        self.fortran = bool(fortran) and len(self.shape) == 2 and self.shape[0] > 1

    def _safetensors_header(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="np") as f:
                keys = list(f.keys())
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on damaged files
            raise DataError(f"{self.path}: not a readable .safetensors file ({type(err).__name__}: {err})") from None
        if len(keys) != 1:
            raise DataError(f"{self.path}: expected one tensor (n_samples, n_features), found {sorted(keys)}")
        self.name = keys[0]
        info = header[self.name]
        self.shape = tuple(info["shape"])
        self.fortran = False
        if info["dtype"] in _ST_DTYPES:
            self.dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            self.offset = 8 + size + info["data_offsets"][0]
        else:  # e.g. BF16, which numpy cannot map: read through safe_open, as float32
            self.dtype, self.offset = np.dtype(np.float32), None
            if info["dtype"] not in ("BF16",):
                raise DataError(f"{self.path}: dtype {info['dtype']}: expected a float tensor (F16, BF16, F32, F64)")

    def rows_of(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``_rows_of``; float64 values beyond float32's range become Inf quietly (the finite check names them)."""
        with np.errstate(over="ignore"):
            self._rows_of(rows, out)

    def _rows_of(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Write the rows ``rows`` (sorted, int64) of this shard into ``out`` (len(rows), width).

        Read through memory maps of at most ``SPAN_BYTES`` of the file each, unmapped after the copy, so the
        mapped pages never add more than that to the process's resident memory. A file whose size or modification
        time changed since it was opened is refused (DataError): rows must not change under a training run."""
        if _stamp(self.path) != self.stamp:
            raise DataError(f"{self.path} changed on disk since the folder was opened (size or modification time): "
                            "the rows under training must not change; open the folder again")
        if self.offset is None:  # safetensors without a numpy dtype: the covering slice through safe_open
            from safetensors import safe_open
            with safe_open(str(self.path), framework="pt") as f:
                block = f.get_slice(self.name)[int(rows[0]):int(rows[-1]) + 1].float().numpy()
            out[:] = block[rows - rows[0]]
            return
        if self.fortran:  # column-major .npy (rare): one map of the whole array
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape, order="F")
            out[:] = mm[rows]
            del mm
            return
        row_bytes = self.width * self.dtype.itemsize
        span = max(1, SPAN_BYTES // row_bytes)
        blocks = rows // span
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            first, last = int(rows[a]), int(rows[b - 1])
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + first * row_bytes,
                           shape=(last - first + 1, self.width))
            if last - first + 1 == b - a:
                out[a:b] = mm
            else:
                out[a:b] = mm[rows[a:b] - first]
            del mm  # unmapped now: its pages leave this process (they stay in the OS page cache)


def check_index(path: Path, files, shards=(), hashes=None) -> None:
    """The folder's shards against its index.json: the same files, then (``shards``: their headers) rows and width,
    then (``hashes``: a function giving the shards' sha256) sha256."""
    where = path / INDEX
    try:
        index = json.loads(where.read_text())
        listed = {e["name"]: e for e in index["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{where}: unreadable shard index ({type(err).__name__}: {err})") from None
    names = [f.name for f in files]
    if sorted(listed) != names:
        extra, missing = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
        raise DataError(f"{path}: the shards differ from {INDEX} (not listed: {extra}, missing: {missing}): "
                        "stale or incomplete folder")
    for f, s in zip(files, shards):
        entry = listed[f.name]
        if entry.get("rows") != s.rows or index.get("n_features") not in (None, s.width):
            raise DataError(f"{f}: {s.rows} x {s.width}, but {INDEX} records {entry.get('rows')} x "
                            f"{index.get('n_features')}: stale or corrupt shard")
    for f, digest in zip(files, hashes() if hashes else ()):
        if listed[f.name].get("sha256") not in (None, digest):
            raise DataError(f"{f}: sha256 differs from the one in {INDEX}: stale or corrupt shard")


class ShardWriter:
    """Write rows as ``.npy`` shards of ``shard_rows`` rows (``dtype``, float32 by default) into a folder as
    they come, then ``index.json`` (every shard's name, rows and sha256; the sha256 of all rows' bytes in
    order, ``activations_sha256``, equal to that of the same rows held as one tensor of that dtype; count,
    width, max |x|). At most ``shard_rows`` rows are held; ``close(extra)`` writes the index and returns it."""

    def __init__(self, folder, shard_rows: int = 65536, dtype: torch.dtype = torch.float32):
        if not (isinstance(shard_rows, int) and shard_rows >= 1):
            raise ValueError(f"shard_rows={shard_rows!r}: expected an int >= 1")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: expected torch.float32 or torch.float64")
        self.dtype = dtype
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.pending, self.n_pending = shard_rows, [], 0
        self.entries, self.hash, self.width, self.max_abs = [], hashlib.sha256(), None, 0.0

    def write(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if rows.ndim != 2 or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"rows must have shape (n, {self.width or 'n_features'}), got {tuple(rows.shape)}")
        self.width = rows.shape[1]
        while rows.shape[0]:
            take = min(self.shard_rows - self.n_pending, rows.shape[0])
            self.pending.append(rows[:take])
            self.n_pending += take
            rows = rows[take:]
            if self.n_pending == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self.n_pending:
            return
        block = torch.cat(self.pending).numpy()
        self.hash.update(block.tobytes())
        self.max_abs = max(self.max_abs, float(np.abs(block).max()))
        name = f"{len(self.entries):05d}.npy"
        np.save(self.folder / name, block, allow_pickle=False)
        self.entries.append({"name": name, "rows": int(block.shape[0]), "sha256": file_sha256(self.folder / name)})
        self.pending, self.n_pending = [], 0

    def close(self, extra: dict | None = None) -> dict:
        """Flush the last shard and write index.json (with ``extra`` keys). Returns the index."""
        self._flush()
        if not self.entries:
            raise DataError(f"{self.folder}: no rows were written")
        index = dict(extra or {}, format=INDEX_FORMAT, count=sum(e["rows"] for e in self.entries),
                     n_features=self.width, activations_sha256=self.hash.hexdigest(), max_abs=self.max_abs,
                     shards=self.entries)
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return index


def write_shards(X: torch.Tensor, folder, shard_rows: int = 65536, extra: dict | None = None) -> dict:
    """Write an in-memory (N, n_features) tensor as a folder of shards (float64 kept, anything else as
    float32). Returns the index."""
    writer = ShardWriter(folder, shard_rows, X.dtype if X.dtype == torch.float64 else torch.float32)
    for s in range(0, X.shape[0], shard_rows):
        writer.write(X[s:s + shard_rows])
    return writer.close(extra)
