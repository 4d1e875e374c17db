"""The sharded extraction (common/infra/activations.py, activation_shards): shards written as the extraction goes,
the same rows as the in-memory extraction, the cache rules of the single-file entry, and a folder that
--ACTIVATIONS and common/infra/stream.py read."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_activations import WORDS, save_tiny_model  # noqa: E402

from common.infra import activations as A  # noqa: E402
from common.infra import extraction as E  # noqa: E402
from common.infra import llm_assets as M  # noqa: E402
from common.infra import shards as SH  # noqa: E402
from common.infra import stream as S  # noqa: E402
from common.infra.data import DataError  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_shards"))


@pytest.fixture
def kw(model_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS * 8) + "\n")
    return dict(model=model_dir, layer=2, token_rule="all", text=text, n_texts=6, max_tokens=8,
                cache_dir=tmp_path / "cache", progress=False, batch_size=2)


def test_shards_hold_the_in_memory_extraction(kw, monkeypatch):
    X, meta = A.load_activations(**kw)
    written = []
    real = SH.ShardWriter.write
    monkeypatch.setattr(SH.ShardWriter, "write", lambda self, rows: written.append(len(rows)) or real(self, rows))
    folder, index = A.activation_shards(**kw, shard_rows=10)
    assert not index["cached"] and folder.name.endswith(".shards") and folder.parent == kw["cache_dir"]
    assert len(written) == 3 and sum(written) == X.shape[0] == 42  # one write per batch of 2 texts
    assert [e["rows"] for e in index["shards"]] == [10, 10, 10, 10, 2]
    for key in ("model_sha256", "text_sha256", "layer", "count", "n_features", "activations_sha256"):
        assert index[key] == meta[key], key
    assert torch.equal(S.Stream.open(folder).materialise(), X)
    assert torch.equal(A.load_user_activations(folder)[0], X)  # what --ACTIVATIONS=folder reads
    assert json.loads((folder / SH.INDEX).read_text())["shards"][0]["name"] == "00000.npy"
    np.save(folder / "00002.npy", np.load(folder / "00002.npy") + 1)  # a changed shard is refused there too
    with pytest.raises(DataError, match="00002.npy: sha256 differs"):
        A.load_user_activations(folder)


@pytest.mark.parametrize("damage", ["changed shard", "missing shard", "stale index", "unreadable index"])
def test_stale_or_corrupt_shards_are_extracted_again(kw, monkeypatch, capsys, damage):
    folder, _ = A.activation_shards(**kw, shard_rows=16)
    X = S.Stream.open(folder).materialise()
    assert A.activation_shards(**kw, shard_rows=16)[1]["cached"]
    calls = []
    real = E.extract_batches
    monkeypatch.setattr(A, "extract_batches", lambda *a, **k: calls.append(1) or real(*a, **k))
    if damage == "changed shard":
        np.save(folder / "00001.npy", np.load(folder / "00001.npy") * 2)
        target = folder / "00001.npy"
    elif damage == "missing shard":
        (folder / "00002.npy").unlink()
        target = folder
    else:
        target = folder / SH.INDEX
        index = json.loads(target.read_text())
        target.write_text("{" if damage == "unreadable index" else json.dumps(dict(index, layer=1)))
    capsys.readouterr()
    folder2, index2 = A.activation_shards(**kw, shard_rows=16)
    assert not index2["cached"] and calls == [1] and folder2 == folder
    assert str(target) in capsys.readouterr().err  # the miss names what was wrong
    assert torch.equal(S.Stream.open(folder).materialise(), X)
    assert A.activation_shards(**kw, shard_rows=16)[1]["cached"] and calls == [1]


def test_an_interrupted_sharded_extraction_leaves_no_entry(kw, monkeypatch):
    def crash(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(SH.ShardWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        A.activation_shards(**kw, shard_rows=10)
    assert [p.name for p in kw["cache_dir"].iterdir()] == [M.FILE_HASHES]
    with pytest.raises(ValueError, match="shard_rows=0"):
        A.activation_shards(**kw, shard_rows=0)
