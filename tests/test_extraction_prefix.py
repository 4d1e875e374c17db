"""Extraction in the split's order (activations.load_activations(order_seed=, count=)): a prefix of the order is
extracted and cached, a larger request extracts only the missing texts, a smaller one nothing; the split's
statistics come from the training rows used (split.py); the LM evaluation's held-out texts are the test texts."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_activations import WORDS, save_tiny_model, tiny_tokenizer  # noqa: E402

from common.infra import activations as A  # noqa: E402
from common.infra import extraction as E  # noqa: E402
from common.infra import llm_assets as M  # noqa: E402
from common.infra import split  # noqa: E402
from common.maths import lm_eval as L  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_TEXTS, BATCH, SEED = 40, 4, 11


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def kw(model_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS * 8) + "\n")
    return dict(model=model_dir, layer=2, text=text, n_texts=N_TEXTS, max_tokens=8, batch_size=BATCH,
                cache_dir=tmp_path / "cache", progress=False)


@pytest.fixture
def seen(monkeypatch):
    """The texts the model is run on, one list per extraction."""
    calls, real = [], E.extract
    monkeypatch.setattr(A, "extract", lambda model, tok, texts, *a, **k: calls.append(list(texts)) or
                        real(model, tok, texts, *a, **k))
    return calls


def texts_of(kw):
    return M.split_texts(M.read_text(kw["text"])[0], N_TEXTS, kw["max_tokens"])


def test_a_larger_request_extracts_only_the_missing_texts(kw, seen, model_dir):
    order = split.split_order(N_TEXTS, SEED).tolist()
    texts = texts_of(kw)
    X1, meta1 = A.load_activations(**kw, order_seed=SEED, count=10)
    # whole batches: 10 texts asked, 12 extracted (3 batches of 4), the first 10 returned
    assert X1.shape == (10, 32) and meta1["count"] == 10 and meta1["extracted"] == 12 and not meta1["cached"]
    assert seen == [[texts[i] for i in order[:12]]] and meta1["order_seed"] == SEED
    assert meta1["activations_sha256"] == A.tensor_sha256(X1)
    X2, meta2 = A.load_activations(**kw, order_seed=SEED, count=27)
    assert X2.shape == (27, 32) and meta2["extracted"] == 16 and seen[1] == [texts[i] for i in order[12:28]]
    assert torch.equal(X2[:10], X1)
    # one extraction of the whole order (another cache), and the model run directly on the texts in that order
    full, meta_full = A.load_activations(**dict(kw, cache_dir=kw["cache_dir"].parent / "other"), order_seed=SEED)
    assert full.shape == (N_TEXTS, 32) and meta_full["extracted"] == N_TEXTS
    assert torch.equal(X2, full[:27])
    lm, tok = M.load_model(model_dir)
    direct = E.extract(lm, tok, [texts[i] for i in order], 2, max_tokens=8, batch_size=BATCH, progress=False)
    assert torch.equal(full, direct)
    X3, meta3 = A.load_activations(**kw, order_seed=SEED)  # the rest: the tail of 12 texts
    assert meta3["extracted"] == 12 and len(seen[-1]) == 12 and torch.equal(X3, full)
    stored = json.loads(next(kw["cache_dir"].glob("*_order11_*.json")).read_text())
    assert stored["count"] == N_TEXTS and stored["batch_size"] == BATCH


def test_a_smaller_request_extracts_nothing(kw, seen):
    X, _ = A.load_activations(**kw, order_seed=SEED, count=32)  # whole batches: the entry holds 32
    n = len(seen)
    for count in (32, 30, 29, 5, 1):
        Y, meta = A.load_activations(**kw, order_seed=SEED, count=count)
        assert meta["cached"] and meta["extracted"] == 0 and meta["count"] == count and torch.equal(Y, X[:count])
        assert meta["activations_sha256"] == A.tensor_sha256(Y)
    assert len(seen) == n == 1


def test_text_order_prefix_is_the_old_whole_extraction(kw, seen):
    """order_seed=None: text order, under the key an entry always had (no order seed in it)."""
    whole, meta = A.load_activations(**dict(kw, cache_dir=kw["cache_dir"].parent / "whole"))
    stored = json.loads(next((kw["cache_dir"].parent / "whole").glob("*_40x8_*.json")).read_text())
    assert meta["order_seed"] is None and "order_seed" not in stored and seen[-1] == texts_of(kw)
    part, _ = A.load_activations(**kw, count=9)
    assert torch.equal(part, whole[:9]) and seen[-1] == texts_of(kw)[:12]


@pytest.mark.parametrize("damage", ["truncated data", "edited rows", "truncated meta"])
def test_damaged_ordered_entry_is_recomputed(kw, seen, capsys, damage):
    X, _ = A.load_activations(**kw, order_seed=SEED, count=20)
    data, meta = next(kw["cache_dir"].glob("*.safetensors")), next(kw["cache_dir"].glob("*_order11_*.json"))
    if damage == "truncated data":
        data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
    elif damage == "edited rows":
        from safetensors.torch import load_file, save_file
        save_file({"activations": load_file(data)["activations"] * 2}, str(data))
    else:
        meta.write_bytes(meta.read_bytes()[:50])
    capsys.readouterr()
    Y, again = A.load_activations(**kw, order_seed=SEED, count=8)
    assert str(data if "meta" not in damage else meta) in capsys.readouterr().err
    assert again["extracted"] == 8 and len(seen[-1]) == 8 and torch.equal(Y, X[:8])  # from scratch, only 8
    assert A.load_activations(**kw, order_seed=SEED, count=8)[1]["cached"]


def test_another_order_seed_is_another_entry(kw, seen, capsys):
    X, _ = A.load_activations(**kw, order_seed=SEED, count=N_TEXTS)
    Y, meta = A.load_activations(**kw, order_seed=SEED + 1, count=8)
    assert meta["extracted"] == 8 and len(seen) == 2
    order, other = split.split_order(N_TEXTS, SEED), split.split_order(N_TEXTS, SEED + 1)
    where = {int(t): i for i, t in enumerate(order)}
    torch.testing.assert_close(Y, X[[where[int(t)] for t in other[:8]]], rtol=1e-5, atol=1e-5)  # the same texts' rows
    # an entry holding another seed's rows under this seed's name: its metadata differ, it is not used
    mine = next(kw["cache_dir"].glob(f"*_order{SEED}_*.json"))
    mine.write_text(json.dumps(dict(json.loads(mine.read_text()), order_seed=SEED + 1)))
    capsys.readouterr()
    assert A.load_activations(**kw, order_seed=SEED, count=4)[1]["extracted"] == 4
    assert "metadata differ from the request" in capsys.readouterr().err


def test_an_interrupted_extension_leaves_the_old_entry(kw, seen, monkeypatch):
    X, _ = A.load_activations(**kw, order_seed=SEED, count=8)
    real, writes = A.atomic_write, []

    def crash(path, write):  # the first of the entry's two files is renamed into place, the second is not
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(A, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        A.load_activations(**kw, order_seed=SEED, count=20)
    assert len(writes) == 2
    monkeypatch.setattr(A, "atomic_write", real)
    Y, meta = A.load_activations(**kw, order_seed=SEED, count=8)
    assert meta["cached"] and torch.equal(Y, X) and len(seen) == 2
    Z, meta = A.load_activations(**kw, order_seed=SEED, count=20)  # extended again from the old entry's 8
    assert meta["extracted"] == 12 and torch.equal(Z[:8], X)


def test_order_arguments_are_checked_before_loading(kw, monkeypatch):
    monkeypatch.setattr(A, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    for bad, match in ((dict(count=0), "count=0: expected an int in 1..n_texts=40"),
                       (dict(count=41), "count=41"), (dict(order_seed=1.5), "order_seed=1.5"),
                       (dict(order_seed=1, token_rule="all"), "token rule 'last'")):
        with pytest.raises(ValueError, match=match):
            A.load_activations(**kw, **bad)


def old_split_standardise(X, test_fraction, seed, eps=1e-8):
    """The split and statistics as they were before n_train (a copy of the former code)."""
    n_test = int(round(test_fraction * X.shape[0]))
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    train, test = X[order[n_test:]].double(), X[order[:n_test]].double()
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std <= eps * mean.abs().clamp(min=1.0), torch.ones_like(std), std)
    return ((train - mean) / std).to(X.dtype), ((test - mean) / std).to(X.dtype), mean.to(X.dtype), std.to(X.dtype)


def test_statistics_come_from_the_training_rows_used(tmp_path):
    from common.infra.shards import write_shards
    from common.infra.stream import Stream

    X = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7) + 5
    for got, want in zip(split.split_standardise(X, 0.1, seed=3), old_split_standardise(X, 0.1, 3)):
        assert torch.equal(got, want)  # n_train = 0: what it always was, bit for bit
    train, test, mean, std = split.split_standardise(X, 0.1, seed=3, n_train=50)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3)).numpy()
    rows = X.numpy().astype(np.float64)[order[20:70]]
    assert train.shape == (50, 6) and test.shape == (20, 6)
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), rows.std(0), rtol=1e-6)
    np.testing.assert_allclose(train.numpy(), (rows - rows.mean(0)) / rows.std(0), atol=1e-5)
    np.testing.assert_allclose(test.numpy(), (X.numpy()[order[:20]] - rows.mean(0)) / rows.std(0), atol=1e-5)
    # the prefix path (rows extracted in the split's order) gives the same numbers
    prefix = X[order[:70]]
    for got, want in zip(split.standardise(prefix[20:], prefix[:20]), (train, test, mean, std)):
        assert torch.equal(got, want)
    # streamed: the same rows and statistics
    write_shards(X, tmp_path / "shards", shard_rows=64)
    s_train, s_test, s_mean, s_std = split.split_standardise(Stream.open(tmp_path / "shards"), 0.1, seed=3, n_train=50)
    torch.testing.assert_close(s_mean, mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(s_std, std, rtol=1e-6, atol=0)
    torch.testing.assert_close(s_train.materialise(), train, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_train=181: expected an int in 0..180"):
        split.split_standardise(X, 0.1, seed=3, n_train=181)


def test_heldout_texts_are_the_test_texts_of_the_prefix(kw, model_dir):
    n_test, n_train = split.split_sizes(N_TEXTS, 0.25, 12)
    X, _ = A.load_activations(**kw, order_seed=SEED, count=n_test + n_train)
    train_texts, test_texts = split.split_rows(N_TEXTS, 0.25, SEED, n_train=n_train)
    held = L.heldout_texts(tiny_tokenizer(), texts_of(kw), test_texts.tolist(), 8, n_tokens=30)
    assert set(held["texts"]) <= set(test_texts.tolist()) and len(held["texts"]) == len(held["rows"]) > 1
    everything_trained = split.split_rows(N_TEXTS, 0.25, SEED)[0].tolist()  # n_train = 0: every training text
    assert not set(held["texts"]) & (set(everything_trained) | set(train_texts.tolist()))
    assert held["rows"] == list(range(len(held["rows"])))  # held-out texts skip none here: X's first rows
    lm, _ = M.load_model(model_dir)
    ev = L.LMEval(lm, held["ids"], 2, mean=torch.zeros(32), batch_size=3)
    L.check_heldout(ev.last_rows[:-1], X[held["rows"][:-1]])  # the last text may be cut
    with pytest.raises(ValueError, match="the texts are not those rows"):
        L.check_heldout(ev.last_rows[:-1], X[[t % len(X) for t in held["texts"][:-1]]])  # text numbers as rows


@pytest.mark.slow  # about 20 s: two E3 runs on a tiny model
def test_e3_extracts_the_split_prefix_and_extends_it(tmp_path):
    from common.infra.outputs import derive_seed

    model = save_tiny_model(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 60))
    common = ["--quick", "--SOURCE=llm", f"--MODEL={model}", f"--TEXT={corpus}", f"--CACHE_DIR={tmp_path / 'cache'}",
              "--N_TEXTS=200", "--MAX_TOKENS=16", "--ONLY=base", "--METHODS=pam,sgd", "--WORKERS=1"]

    def e3(out, *extra):
        res = subprocess.run([sys.executable, str(ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"), *common, *extra, "--out",
                              str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, MPLBACKEND="Agg"))
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "activations.json").read_text())

    small = e3(tmp_path / "small", "--N_TRAIN=50", "--LM_EVAL_TOKENS=60")
    seed = derive_seed(42, "split")
    assert small["order_seed"] == seed and small["count"] == 70 and small["extracted"] == 72
    assert (small["n_test"], small["n_train"]) == (20, 50)
    train_texts, test_texts = split.split_rows(200, 0.1, seed)
    held = json.loads((tmp_path / "small" / "lm_eval.json").read_text())["test_texts"]
    assert held and set(held) <= set(test_texts.tolist()) and not set(held) & set(train_texts.tolist())
    full = e3(tmp_path / "full")
    assert full["count"] == 200 and full["extracted"] == 128 and (full["n_test"], full["n_train"]) == (20, 180)
    assert math.isfinite(json.loads((tmp_path / "full" / "table.json").read_text())[0]["test_mse"])


def test_command_line_order_and_count(kw, capsys):
    args = ["extract", "--model", kw["model"], "--layer", "2", "--text", str(kw["text"]), "--n-texts", str(N_TEXTS),
            "--max-tokens", "8", "--batch-size", str(BATCH), "--cache-dir", str(kw["cache_dir"])]
    A.main(args + ["--order-seed", str(SEED), "--count", "6"])
    meta = json.loads(capsys.readouterr().out)
    assert (meta["order_seed"], meta["count"], meta["extracted"]) == (SEED, 6, 8)
    X, again = A.load_activations(**kw, order_seed=SEED, count=6)
    assert again["cached"] and again["activations_sha256"] == meta["activations_sha256"]
    with pytest.raises(SystemExit) as exit_:
        A.main(args + ["--count", "6", "--shard-rows", "16"])
    assert exit_.value.code == 2 and "--shard-rows extracts every text in text order" in capsys.readouterr().err
