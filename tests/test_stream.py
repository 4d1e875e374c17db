"""common/infra/stream.py: a folder of shards streamed through memory maps gives what the same rows give in memory
(split, standardisation, batches, PAM statistics, training), and bad folders are refused before training."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.infra import activations as A
from common.infra import shards as SH
from common.infra import split
from common.infra import stream as S
from common.infra.data import DataError
from common.infra.outputs import file_sha256
from common.maths.pam import collect_stats
from common.maths.sae import SAE
from common.maths.train import TrainConfig, train


def data(n=403, n_features=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_features, generator=g, dtype=torch.float64) * 3 + 0.1
    x = torch.randn(n, n_features, generator=g, dtype=torch.float64) * scale + torch.randn(n_features, generator=g,
                                                                                          dtype=torch.float64)
    return x.to(dtype)


def mixed_folder(tmp_path, X, name="shards"):
    """X as four shards of uneven sizes: .npy (one column-major) and .safetensors (one key), in name order."""
    folder = tmp_path / name
    folder.mkdir()
    cuts = [0, 50, 177, 300, X.shape[0]]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if i % 2:
            save_file({"acts": X[a:b].contiguous()}, str(folder / f"{i:02d}.safetensors"))
        else:
            np.save(folder / f"{i:02d}.npy", np.asfortranarray(X[a:b].numpy()) if i == 2 else X[a:b].numpy())
    return folder


def same_history(h1, h2):
    for a, b in zip(h1, h2, strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("_time")} == \
               {k: v for k, v in b.items() if not k.endswith("_time")}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_streamed_split_and_standardisation_equal_the_in_memory_ones(tmp_path, dtype, tol):
    X = data(dtype=dtype)
    stream = S.Stream.open(mixed_folder(tmp_path, X), buffer_rows=64)
    assert stream.shape == (403, 12) and stream.dtype == dtype
    assert torch.equal(stream.materialise(), X)
    got = split.split_standardise(stream, 0.1, seed=7)
    want = split.split_standardise(X, 0.1, seed=7)
    assert len(got[0]) == 363 and len(got[1]) == 40
    for g, w in zip((got[0].materialise(), got[1].materialise(), got[2], got[3]), want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.allclose(g, w, rtol=0, atol=tol * max(1.0, float(w.abs().max())))
    # the same views again (a split reads nothing but the statistics)
    assert torch.equal(split.split_standardise(stream, 0.1, seed=7)[0].materialise(), got[0].materialise())


def test_other_dtypes_are_read_as_float32(tmp_path):
    X = data(n=60, dtype=torch.float32)
    folder = tmp_path / "shards"
    folder.mkdir()
    save_file({"x": X[:25].bfloat16()}, str(folder / "a.safetensors"))  # no numpy dtype: read by safe_open
    np.save(folder / "b.npy", X[25:].numpy().astype(np.float16))
    stream = S.Stream.open(folder, buffer_rows=8)
    want = torch.cat([X[:25].bfloat16().float(), X[25:].half().float()])
    assert stream.dtype == torch.float32 and torch.equal(stream.materialise(), want)
    assert torch.equal(stream.take([59, 3, 30, 3]), want[[59, 3, 30, 3]])


def test_chunks_are_the_in_memory_slices_or_storage_order(tmp_path):
    """A view that fits in the buffer: exactly the in-memory slices; a larger one: its rows in storage order."""
    X = data(dtype=torch.float32)
    positions = torch.arange(402, -1, -3)  # 135 rows, in reverse storage order
    folder = mixed_folder(tmp_path, X)
    for buffer_rows, want in ((135, X[positions]), (100, X[positions.sort().values]), (7, X[positions.sort().values])):
        got = list(S.Stream.open(folder, buffer_rows=buffer_rows)[positions].chunks(32))
        assert [len(c) for c in got] == [len(c) for c in want.split(32)], buffer_rows
        assert torch.equal(torch.cat(got), want), buffer_rows


@pytest.mark.parametrize("buffer_rows", [1000, 90, 64, 7])
def test_batch_order_is_the_documented_one(tmp_path, buffer_rows):
    X = data(n=403, dtype=torch.float32)
    stream = S.Stream.open(mixed_folder(tmp_path, X), buffer_rows=buffer_rows)
    B = 32
    got = list(stream.batches(B, torch.Generator().manual_seed(5)))
    # the definition (common/infra/stream.py): covering buffer -> randperm(n); else windows of R rows in the order
    # randperm(W), each window's rows in the order randperm(len(window)), drawn as the window is reached
    g, n, R = torch.Generator().manual_seed(5), 403, buffer_rows
    if R >= n:
        order = torch.randperm(n, generator=g)
    else:
        order = torch.cat([w * R + torch.randperm(min(R, n - w * R), generator=g)
                           for w in torch.randperm(math.ceil(n / R), generator=g).tolist()])
    assert [b for b, _ in got] == [len(c) for c in order.split(B)]
    for (_, rows), idx in zip(got, order.split(B)):
        assert torch.equal(rows, X[idx])
    assert sorted(order.tolist()) == list(range(n))  # every row once per epoch


def test_collect_stats_streamed_equals_in_memory(tmp_path):
    """The same batches as in memory: the same statistics, exactly; a view larger than the buffer is read in
    storage order: exactly the statistics of those rows in memory, and the view's own to float64 rounding."""
    X = data(n=403, n_features=12, dtype=torch.float32)
    folder = mixed_folder(tmp_path, X)
    view = torch.randperm(403, generator=torch.Generator().manual_seed(4))[:300]
    for model in (SAE(12, 40, "topk", 1, seed=1), SAE(12, 20, "relu", seed=1)):  # sparse and dense paths
        for buffer_rows, same_as in ((403, X), (100, X[view.sort().values])):
            stream = S.Stream.open(folder, buffer_rows=buffer_rows)
            stream = stream if buffer_rows == 403 else stream[view]
            a, b = collect_stats(model, stream, 64), collect_stats(model, same_as, 64)
            for name in ("sum_z", "sum_x", "zz_upper", "zx", "fired"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert (a.n, a.sum_xx, a.nnz) == (b.n, b.sum_xx, b.nnz)
        a, b = collect_stats(model, S.Stream.open(folder, buffer_rows=100)[view], 64), collect_stats(model, X[view], 64)
        for name in ("sum_z", "sum_x", "zz_upper", "zx"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-13, atol=1e-12), name
        assert torch.equal(a.fired, b.fired) and (a.n, a.nnz) == (b.n, b.nnz)


@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_streamed_training_gives_the_in_memory_result(tmp_path, method):
    """A shuffle buffer that covers the training view: the same batches and the same numbers, exactly."""
    X = data(n=403, dtype=torch.float32)
    x_train, x_test, _, _ = split.split_standardise(S.Stream.open(mixed_folder(tmp_path, X), buffer_rows=100), 0.1, 3)
    cfg = TrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2, solve_batch=50, eval_batch=70)
    streamed, in_memory = SAE(12, 24, "topk", 3, seed=1), SAE(12, 24, "topk", 3, seed=1)
    h1 = train(streamed, x_train.with_buffer(len(x_train)), x_test, cfg, seed=2, progress=False)
    h2 = train(in_memory, x_train.materialise(), x_test.materialise(), cfg, seed=2, progress=False)
    same_history(h1, h2)
    for (name, p), q in zip(streamed.state_dict().items(), in_memory.state_dict().values()):
        assert torch.equal(p, q), name


def test_streamed_training_with_the_recipe_and_a_small_buffer(tmp_path):
    """The recipe's mean centre (float64 sums in another order: to rounding) and the mini-batch solve (random
    rows of the stream); a small buffer trains on every row once per epoch, in its own order."""
    X = data(n=403, dtype=torch.float64)
    x_train, x_test, _, _ = split.split_standardise(S.Stream.open(mixed_folder(tmp_path, X)), 0.1, 3)
    cfg = TrainConfig(method="pam", epochs=2, batch_size=32, lr=1e-2, b_dec_init="mean", centre_input=True,
                      aux_k=4, keep_dead_atoms=True, solve_samples=200)
    streamed, in_memory = SAE(12, 24, "topk", 3, seed=1).double(), SAE(12, 24, "topk", 3, seed=1).double()
    train(streamed, x_train, x_test, cfg, seed=2, progress=False)
    train(in_memory, x_train.materialise(), x_test.materialise(), cfg, seed=2, progress=False)
    for (name, p), q in zip(streamed.state_dict().items(), in_memory.state_dict().values()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10), name
    small = SAE(12, 24, "topk", 3, seed=1).double()
    hist = train(small, x_train.with_buffer(50), x_test, TrainConfig(method="pam", epochs=2, batch_size=32),
                 seed=2, progress=False)
    assert hist[-1]["samples_seen"] == 2 * len(x_train) and hist[-1]["grad_steps"] == 2 * math.ceil(363 / 32)
    with pytest.raises(ValueError, match="median"):
        train(SAE(12, 24, "topk", 3, seed=1).double(), x_train, x_test, TrainConfig(b_dec_init="median", epochs=1),
              progress=False)
    with pytest.raises(ValueError, match="float64 rows for a model of torch.float32"):
        train(SAE(12, 24, "topk", 3, seed=1), x_train, x_test, TrainConfig(epochs=1), progress=False)


def bad_widths(p):
    np.save(p / "a.npy", np.zeros((3, 2), np.float32))
    np.save(p / "b.npy", np.zeros((3, 4), np.float32))


def non_finite(p):
    x = np.zeros((5, 3), np.float32)
    x[3, 1] = np.inf
    np.save(p / "a.npy", np.zeros((4, 3), np.float32))
    np.save(p / "b.npy", x)


@pytest.mark.parametrize("make, match", [
    (None, "no such folder of shards"),
    (lambda p: (p / "x.txt").write_text("1"), "no \\*.npy or \\*.safetensors"),
    (bad_widths, "b.npy: 4 features, but a.npy has 2"),
    (lambda p: np.save(p / "a.npy", np.zeros(5)), "2-D array"),
    (lambda p: (p / "a.npy").write_bytes(b"not numpy"), "a.npy: not a readable .npy file"),
    (lambda p: save_file({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, str(p / "a.safetensors")), "one tensor"),
    (non_finite, "b.npy holds NaN/Inf values \\(first at row 3, feature 1\\)"),
])
def test_bad_folders_are_refused_before_training(tmp_path, make, match):
    folder = tmp_path / "shards"
    if make is not None:
        folder.mkdir()
        make(folder)
    with pytest.raises(DataError, match=match):
        stream = S.Stream.open(folder)
        split.split_standardise(stream, 0.5)
    if make is non_finite:  # train checks it too, before any step
        with pytest.raises(DataError, match="NaN/Inf"):
            stream = S.Stream.open(folder)
            train(SAE(3, 4, "topk", 1, seed=0), stream, stream, TrainConfig(epochs=1), progress=False)


def test_index_json_catches_stale_and_corrupt_shards(tmp_path):
    X = data(n=100, dtype=torch.float32)
    folder = tmp_path / "shards"
    index = SH.write_shards(X, folder, shard_rows=30)
    assert [e["rows"] for e in index["shards"]] == [30, 30, 30, 10] and index["count"] == 100
    assert index["activations_sha256"] == A.tensor_sha256(X)  # the hash the single-file cache records
    assert torch.equal(S.Stream.open(folder).materialise(), X)
    np.save(folder / "00001.npy", X[30:60].numpy() + 1)  # same shape, other values
    with pytest.raises(DataError, match="00001.npy: sha256 differs"):
        S.Stream.open(folder)
    np.save(folder / "00001.npy", X[30:59].numpy())
    with pytest.raises(DataError, match="00001.npy: 29 x 12, but index.json records 30"):
        S.Stream.open(folder)
    (folder / "00001.npy").unlink()
    with pytest.raises(DataError, match="missing: \\['00001.npy'\\]"):
        S.Stream.open(folder)


def test_writer_holds_at_most_one_shard(tmp_path, monkeypatch):
    held = []
    real = SH.ShardWriter._flush
    monkeypatch.setattr(SH.ShardWriter, "_flush", lambda self: held.append(self.n_pending) or real(self))
    writer = SH.ShardWriter(tmp_path / "w", shard_rows=25)
    X = data(n=90, dtype=torch.float32)
    for part in X.split(7):
        writer.write(part)
        assert writer.n_pending < 25
    writer.close()
    assert held == [25, 25, 25, 15]
    assert json.loads((tmp_path / "w" / "index.json").read_text())["count"] == 90


@pytest.mark.parametrize("method", ["pam", "sgd"])
def test_two_ranks_streaming_train_what_one_process_streams(tmp_path, monkeypatch, method):
    """torchrun, 2 gloo ranks, a shuffle buffer smaller than the data (70 of 251 rows): the single-process
    streamed result (which the in-memory one equals when the buffer covers the data)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_worker import problem
    from test_distributed import torchrun

    x_train, x_test, model, cfg = problem(method)
    SH.write_shards(x_train, tmp_path / "train", shard_rows=60)
    SH.write_shards(x_test, tmp_path / "test", shard_rows=60)
    monkeypatch.setenv("SPLINTERP_STREAM_DIR", str(tmp_path))
    res = torchrun(f"{method}_stream", tmp_path / "rank0.pt")
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["world"] == 2
    train(model, S.Stream.open(tmp_path / "train", buffer_rows=70), S.Stream.open(tmp_path / "test"), cfg, seed=2,
          progress=False)
    for name, value in model.state_dict().items():
        assert torch.allclose(got["state"][name], value, rtol=0, atol=1e-10), name


def test_delivered_dtype_digest_and_streamed_user_activations(tmp_path):
    """``open(dtype=)`` delivers float64 shards as float32 (the cast of the rows); ``digest`` names the rows a view
    delivers: equal for the same folder and view, different when a shard, the view or the standardisation changes;
    ``load_user_activations(stream=True)`` returns such a float32 view with the loaded metadata."""
    X = data(n=403, dtype=torch.float64)
    folder = mixed_folder(tmp_path, X)
    s32 = S.Stream.open(folder, dtype=torch.float32)
    assert s32.dtype == torch.float32 and torch.equal(s32.materialise(), X.float())
    assert S.Stream.open(folder).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        S.Stream.open(folder, dtype=torch.float16)
    view = torch.arange(0, 403, 2)
    d = s32[view].digest()
    assert d == S.Stream.open(folder, dtype=torch.float32)[view].digest()
    assert d != s32[view[1:]].digest() and d != S.Stream.open(folder)[view].digest()
    mean, std = torch.zeros(12), torch.ones(12)
    assert d != s32[view].standardised(mean, std).digest()
    assert s32.shard_sha256() == [file_sha256(f) for f in SH.shard_files(folder)]
    got, meta = A.load_user_activations(folder, stream=True)
    loaded, meta_loaded = A.load_user_activations(folder)
    assert isinstance(got, S.Stream) and got.dtype == torch.float32 and torch.equal(got.materialise(), loaded)
    assert meta == meta_loaded
    with pytest.raises(DataError, match="streaming reads a folder of shards"):
        A.load_user_activations(SH.shard_files(folder)[0], stream=True)
    np.save(folder / "00.npy", X[:50].numpy() + 1)  # a changed shard: another digest
    assert S.Stream.open(folder, dtype=torch.float32)[view].digest() != d


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["sgd", "pam"])
def test_streamed_training_on_a_gpu_gives_the_in_memory_result(tmp_path, method):
    """Rows read from the shards on the cpu, delivered to the GPU (``Stream.to``): the in-memory result on the GPU
    (a buffer that holds the training split: the in-memory batches; GPU reductions may add in another order, hence
    a tolerance)."""
    X = data(n=403, dtype=torch.float32)
    x_train, x_test, _, _ = split.split_standardise(S.Stream.open(mixed_folder(tmp_path, X), buffer_rows=400), 0.1, 3)
    cfg = TrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2, solve_batch=50, eval_batch=70)
    streamed, in_memory = SAE(12, 24, "topk", 3, seed=1).to("cuda"), SAE(12, 24, "topk", 3, seed=1).to("cuda")
    h1 = train(streamed, x_train, x_test, cfg, seed=2, progress=False)
    h2 = train(in_memory, x_train.materialise(), x_test.materialise(), cfg, seed=2, progress=False)
    assert streamed.W_enc.device.type == "cuda"
    for a, b in zip(h1, h2):
        assert a["test_mse"] == pytest.approx(b["test_mse"], rel=1e-5)


def test_reads_run_one_buffer_ahead_at_most(tmp_path, monkeypatch):
    """The background read is one buffer ahead of the one in use, never more (two buffers held at most), for the
    epoch's batches and for a pass for sums."""
    X = data(n=403, dtype=torch.float32)
    stream = S.Stream.open(mixed_folder(tmp_path, X), buffer_rows=50)
    reads, real = [], S.Stream._gather
    monkeypatch.setattr(S.Stream, "_gather", lambda self, src: reads.append(len(src)) or real(self, src))
    seen = 0
    for _, batch in stream.batches(50, torch.Generator().manual_seed(1)):
        seen += len(batch)
        # rows read but not yet handed out: the rest of the window in use, the next window, and a batch begun in
        # the previous window (the 3-row last window makes batches straddle windows)
        assert 0 <= sum(reads) - seen < 2 * 50 + 50
    assert seen == 403 and sum(reads) == 403 and len(reads) == 9
    reads.clear()
    for used, _ in enumerate(stream.chunks(50), start=1):
        assert len(reads) <= used + 1
    assert sum(reads) == 403


def test_a_shard_changed_after_opening_is_refused(tmp_path):
    """Rows must not change under a run: a shard rewritten after ``open`` fails the next read, naming the file."""
    X = data(n=403, dtype=torch.float32)
    folder = mixed_folder(tmp_path, X)
    stream = S.Stream.open(folder, buffer_rows=100)
    assert torch.equal(stream.read(0, 10), X[:10])
    np.save(folder / "00.npy", X[:50].numpy() * 2)  # same size, new contents
    with pytest.raises(DataError, match="00.npy changed on disk since the folder was opened"):
        stream.read(0, 10)
    assert torch.equal(S.Stream.open(folder).read(0, 10), 2 * X[:10])  # opened again: the new rows


def test_the_split_reads_the_folder_once(tmp_path, monkeypatch):
    """split_standardise on a fresh folder: one pass (every row checked finite, the training rows' moments); on a
    folder already checked: the training rows only."""
    X = data(n=403, dtype=torch.float64)
    stream = S.Stream.open(mixed_folder(tmp_path, X))
    read, real = [], S.Stream._gather
    monkeypatch.setattr(S.Stream, "_gather", lambda self, src: read.append(len(src)) or real(self, src))
    x_train, _, mean, _ = split.split_standardise(stream, 0.1, 3)
    assert sum(read) == 403
    read.clear()
    _, _, again, _ = split.split_standardise(stream, 0.1, 3)
    assert sum(read) == len(x_train) == 363 and torch.allclose(again, mean, rtol=0, atol=1e-12)
