"""Activations larger than memory: a folder of shards read through memory maps (docs/DESIGN.md, section 9.1).

A folder of shards (``common/infra/shards.py``: 2-D ``*.npy`` / ``*.safetensors`` arrays, their rows
concatenated in name order, optionally listed with their rows and sha256 in ``index.json``) is read here.

:class:`Stream` is a view of such a folder: an ordered list of its rows (``index``; all rows in storage order
by default), optionally standardised on the fly with a per-feature ``mean`` and ``std``. Nothing is read
when a view is made (``stream[a:b]``, ``stream[idx]``, ``split.split_standardise``); rows are read by
``read``, ``take``, ``chunks`` and ``batches``, through memory maps that are opened for one read and closed
after it, so the pages of a shard never stay mapped in the process (they stay in the OS page cache, which
is not the process's memory). ``chunks`` and ``batches`` read the next buffer of ``buffer_rows`` rows in a
background thread while the current one is used: at most two buffers are held.

Orders (what ``train`` sees; docs/DESIGN.md 9.1):

- ``chunks(b)``, a pass for sums (evaluation, PAM's statistics, data sums), in batches of ``b``. A view that
  fits in the buffer (``n <= buffer_rows``): positions ``0..n-1`` in order, exactly the slices ``x[s:s + b]`` of
  the same rows in memory. A larger view: its rows in storage order (source rows ascending), read
  sequentially; every row once, so the sums are the in-memory ones up to the order of the additions.
- ``batches(b, gen)``, one epoch of mini-batches. With ``buffer_rows >= n`` the order is
  ``perm = torch.randperm(n, generator=gen)`` and batch ``j`` is ``perm[j b:(j + 1) b]``: exactly the
  in-memory order of ``common.maths.train``. Otherwise the view's positions are cut into ``W = ceil(n / R)``
  consecutive windows of ``R = buffer_rows`` positions (the last one shorter); ``torch.randperm(W, gen)`` orders
  the windows, and as each window is reached ``torch.randperm(len(window), gen)`` orders its positions; the
  epoch's order is the concatenation, cut into batches of ``b`` (a batch may span two windows). Every row is
  seen once per epoch. A view made by ``split.split_standardise`` is already in a random order, so every window
  is a random sample of the data set; the windows' membership is the same every epoch.

Several processes (``common/infra/distributed.py``): every rank reads the same windows and takes its rows
``r, r + w, ...`` of each global batch, as in memory.
"""
from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .data import DataError
from .outputs import file_sha256
from .shards import INDEX, Shard, check_index, shard_files

BUFFER_BYTES = 128 << 20  # default shuffle buffer: 128 MiB of rows (two held: the current and the next)
SCAN_BYTES = 32 << 20     # float64 rows per step of a pass over the data in storage order


class Stream:
    """Rows of a folder of shards, read through memory maps; see the module docstring.

    ``Stream.open(folder)`` checks every shard's header (2-D, real, non-empty, one width) and the folder's
    ``index.json`` when there is one. ``len(s)``, ``s.shape`` (n_samples, n_features), ``s.dtype`` (of the rows
    delivered: float64 when every shard is float64, else float32, unless ``open`` was given one), ``s.device``
    (where rows are delivered).
    """

    def __init__(self, shards, index=None, mean=None, std=None, buffer_rows=None, device="cpu", root=None,
                 dtype=None):
        self._shards = shards
        self.offsets = np.cumsum([0] + [s.rows for s in shards]).astype(np.int64)
        self.n_features = shards[0].width
        self.dtype = dtype or (torch.float64 if all(s.dtype == np.float64 for s in shards) else torch.float32)
        self.index = index  # np.int64 source rows, or None: every row in storage order
        self.mean, self.std = mean, std
        row_bytes = self.n_features * (8 if self.dtype == torch.float64 else 4)
        self.buffer_rows = int(buffer_rows) if buffer_rows else max(1, BUFFER_BYTES // row_bytes)
        self.device = torch.device(device)
        self.root = root if root is not None else {"checked": False}  # shared by every view of the folder

    # ----------------------------------------------------------------------------------------- making views
    @classmethod
    def open(cls, path, buffer_rows: int | None = None, verify: bool = True, dtype: torch.dtype | None = None) -> "Stream":
        """A view of every row of the folder ``path``, in storage order. ``verify``: check the shards'
        sha256 against ``index.json`` (one read of the files) when the folder has one. ``dtype``: deliver the
        rows as torch.float32 or torch.float64 (default: float64 when every shard is float64, else float32)."""
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: expected torch.float32, torch.float64 or None")
        path = Path(path)
        files = shard_files(path)
        if (path / INDEX).exists():  # the files the index lists, before any shard is read
            check_index(path, files)
        shards = [Shard(f) for f in files]
        for s in shards[1:]:
            if s.width != shards[0].width:
                raise DataError(f"{s.path}: {s.width} features, but {shards[0].path.name} has {shards[0].width}: "
                                "every shard of a folder must have the same width")
        if buffer_rows is not None and not (isinstance(buffer_rows, int) and buffer_rows >= 1):
            raise ValueError(f"buffer_rows={buffer_rows!r}: expected an int >= 1 (rows held at once)")
        stream = cls(shards, buffer_rows=buffer_rows, root={"checked": False, "path": str(path)}, dtype=dtype)
        if (path / INDEX).exists():
            check_index(path, files, shards, stream.shard_sha256 if verify else None)
        return stream

    def _view(self, index=None, mean=None, std=None, device=None, buffer_rows=None) -> "Stream":
        return Stream(self._shards, index, mean, std, buffer_rows or self.buffer_rows, device or self.device,
                      self.root, self.dtype)

    def shard_sha256(self) -> list[str]:
        """sha256 of every shard file, in order (one read of the folder, remembered by every view of it)."""
        if "sha256" not in self.root:
            self.root["sha256"] = [file_sha256(s.path) for s in self._shards]
        return self.root["sha256"]

    def digest(self) -> str:
        """sha256 naming the rows this view delivers: every shard's name, rows and sha256, the view's source rows,
        its standardisation and dtype (what a cache of results computed on the view depends on)."""
        h = hashlib.sha256()
        for shard, digest in zip(self._shards, self.shard_sha256()):
            h.update(f"{shard.path.name}:{shard.rows}:{digest}\n".encode())
        h.update(str(self.dtype).encode())
        h.update(self.source_rows().tobytes())
        for t in (self.mean, self.std):
            h.update(b"-" if t is None else t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def source_rows(self) -> np.ndarray:
        """The view's rows as indices into the folder's concatenated rows (int64)."""
        return np.arange(self.offsets[-1], dtype=np.int64) if self.index is None else self.index

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.n_features)

    def __getitem__(self, key) -> "Stream":
        """A view of some of this view's rows: a slice, or integer positions (tensor or array). Reads nothing."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if not isinstance(key, (slice, np.ndarray, list)):
            raise TypeError(f"a Stream is indexed by a slice or integer positions, got {type(key).__name__}; "
                            "read rows with read(), take(), chunks() or batches()")
        return self._view(self.source_rows()[key].astype(np.int64, copy=False), self.mean, self.std)

    def to(self, device) -> "Stream":
        """The same view, delivering its rows on ``device``."""
        return self._view(self.index, self.mean, self.std, device=device)

    def with_buffer(self, buffer_rows: int) -> "Stream":
        """The same view with another shuffle buffer (rows held at once)."""
        if not (isinstance(buffer_rows, int) and buffer_rows >= 1):
            raise ValueError(f"buffer_rows={buffer_rows!r}: expected an int >= 1")
        return self._view(self.index, self.mean, self.std, buffer_rows=buffer_rows)

    def standardised(self, mean: torch.Tensor, std: torch.Tensor) -> "Stream":
        """The same rows as ``(x - mean) / std`` per feature, computed in float64 as they are read and delivered
        in the view's dtype (the in-memory ``split_standardise``'s operations, so the same bits)."""
        return self._view(self.index, mean.to(torch.float64), std.to(torch.float64))

    # ------------------------------------------------------------------------------------------------ reads
    def _gather(self, src: np.ndarray) -> torch.Tensor:
        """Rows ``src`` of the folder (any order), standardised if the view is, on the view's device."""
        out = np.empty((len(src), self.n_features), dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        if len(src):
            order = np.argsort(src, kind="stable")
            ordered = src[order]
            which = np.searchsorted(self.offsets, ordered, side="right") - 1
            bounds = np.searchsorted(which, np.arange(len(self._shards) + 1))
            identity = bool((order == np.arange(len(src))).all())  # already sorted: read in place
            for s, shard in enumerate(self._shards):
                a, b = bounds[s], bounds[s + 1]
                if a < b:
                    if identity:
                        shard.rows_of(ordered[a:b] - self.offsets[s], out[a:b])
                    else:
                        part = np.empty((b - a, self.n_features), dtype=out.dtype)
                        shard.rows_of(ordered[a:b] - self.offsets[s], part)
                        out[order[a:b]] = part
                        del part
        if self.mean is not None:  # in float64, then the view's dtype: the in-memory (x - mean) / std, bit for bit
            if out.dtype == np.float64:
                np.subtract(out, self.mean.cpu().numpy(), out=out)
                np.divide(out, self.std.cpu().numpy(), out=out)
            else:
                wide = out.astype(np.float64)
                np.subtract(wide, self.mean.cpu().numpy(), out=wide)
                np.divide(wide, self.std.cpu().numpy(), out=wide)
                out = wide.astype(out.dtype)
                del wide
        return torch.from_numpy(out).to(self.device)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows at positions ``start .. stop - 1`` of the view, (stop - start, n_features)."""
        if self.index is None:
            return self._gather(np.arange(start, min(stop, len(self)), dtype=np.int64))
        return self._gather(self.index[start:stop])

    def take(self, positions) -> torch.Tensor:
        """Rows at ``positions`` of the view (in that order)."""
        if isinstance(positions, torch.Tensor):
            positions = positions.cpu().numpy()
        return self._gather(self.source_rows()[np.asarray(positions, dtype=np.int64)])

    def materialise(self) -> torch.Tensor:
        """Every row of the view in memory (for data that fit)."""
        return self.read(0, len(self))

    def _prefetched(self, sources):
        """``_gather`` of each source-row array of ``sources`` in turn, the next one read in a background thread
        while the current one is used (numpy's copies and arithmetic release the GIL): two buffers held."""
        sources = iter(sources)
        with ThreadPoolExecutor(max_workers=1) as pool:
            nxt = next(sources, None)
            pending = pool.submit(self._gather, nxt) if nxt is not None else None
            while pending is not None:
                buf = pending.result()
                nxt = next(sources, None)
                pending = pool.submit(self._gather, nxt) if nxt is not None else None
                yield buf
                del buf

    def chunks(self, batch_size: int):
        """A pass over the view's rows for sums, ``batch_size`` at a time (module docstring): the view's order when it
        fits in the buffer, else storage order. Read a buffer at a time (the largest multiple of batch_size within
        ``buffer_rows``, at least one batch), the next one in the background."""
        n = len(self)
        rows = self.source_rows() if n <= self.buffer_rows else np.sort(self.source_rows())
        step = max(batch_size, self.buffer_rows // batch_size * batch_size)
        for buf in self._prefetched(rows[a:a + step] for a in range(0, n, step)):
            for s in range(0, buf.shape[0], batch_size):
                yield buf[s:s + batch_size]

    def batches(self, batch_size: int, gen: torch.Generator, shard=lambda t: t):
        """One epoch of mini-batches (module docstring): yields (global batch size, this rank's rows), the
        rank's rows being ``shard(positions within the global batch)`` as in ``common.maths.train``.

        Each window is read in storage order (its source rows sorted, no reordering copy) and the next one in
        the background; ``rank`` maps a position of the window to its row of that buffer, so the batches hold
        exactly the rows of the documented order."""
        n, R = len(self), self.buffer_rows
        src = self.source_rows()
        visit = [0] if R >= n else torch.randperm(math.ceil(n / R), generator=gen).tolist()
        windows = [(w * R, min(n, (w + 1) * R)) for w in visit]
        ranks = []

        def sorted_rows(window):
            part = src[window[0]:window[1]]
            order = np.argsort(part, kind="stable")
            rank = np.empty(len(part), dtype=np.int64)
            rank[order] = np.arange(len(part))
            ranks.append(torch.from_numpy(rank).to(self.device))
            return part[order]

        carry = None  # rows of a global batch begun in the previous window (all ranks' rows)
        for (a, b), buf in zip(windows, self._prefetched(sorted_rows(w) for w in windows)):
            rank = ranks.pop(0)
            local = rank[torch.randperm(b - a, generator=gen).to(self.device)]  # drawn as the window is reached
            s = 0
            if carry is not None:
                s = min(batch_size - carry.shape[0], len(local))
                carry = torch.cat([carry, buf.index_select(0, local[:s])])
                if carry.shape[0] < batch_size:
                    continue
                mine = shard(torch.arange(batch_size, device=self.device))
                yield batch_size, carry.index_select(0, mine)
                carry = None
            while s < len(local):
                batch = local[s:s + batch_size]
                if len(batch) < batch_size:
                    carry = buf.index_select(0, batch)
                    break
                yield len(batch), buf.index_select(0, shard(batch))
                s += batch_size
            del buf
        if carry is not None:
            mine = shard(torch.arange(carry.shape[0], device=self.device))
            yield carry.shape[0], carry.index_select(0, mine)

    # --------------------------------------------------------------------------------------- whole passes
    def scan(self, batch_rows: int | None = None):
        """The view's source rows in storage order (sorted), ``batch_rows`` at a time (default ~32 MiB as float64), raw
        (not standardised) float64 numpy arrays: yields (source rows, x)."""
        rows = np.sort(self.source_rows())
        step = batch_rows or max(1, SCAN_BYTES // (8 * self.n_features))
        raw = self._view(self.index, device="cpu")
        for a in range(0, len(rows), step):
            src = rows[a:a + step]
            yield src, raw._gather(src).numpy().astype(np.float64, copy=False)

    def checked_scan(self):
        """``scan`` of the whole folder, each chunk checked finite first (DataError naming the shard, row and feature
        of the first NaN/Inf); the folder is marked checked once the pass completes."""
        for src, x in self._view(None, device="cpu").scan():
            bad = ~np.isfinite(x)
            if bad.any():
                r, c = (int(v) for v in np.argwhere(bad)[0])
                s = int(np.searchsorted(self.offsets, src[r], side="right") - 1)
                shard = self._shards[s]
                wide = (" (or values beyond the float32 range, |x| > 3.4e38, read as float32)"
                        if shard.dtype.itemsize > 4 and self.dtype == torch.float32 else "")
                raise DataError(f"{shard.path} holds NaN/Inf values{wide} (first at row "
                                f"{int(src[r] - self.offsets[s])}, feature {c})")
            yield src, x
        self.root["checked"] = True

    def check_finite(self) -> "Stream":
        """DataError naming the shard and row of the first NaN/Inf (one pass over the whole folder, done once)."""
        if not self.root.get("checked"):
            for _ in self.checked_scan():
                pass
        return self


def chunks(x, batch_size: int):
    """Consecutive batches of ``batch_size`` rows of a tensor (slices) or a Stream (read through its buffer)."""
    if isinstance(x, Stream):
        yield from x.chunks(batch_size)
        return
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]
