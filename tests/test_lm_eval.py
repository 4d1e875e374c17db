"""common/maths/lm_eval.py on tiny transformers built here: the splice against the model's own forward with a hook."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from test_activations import tiny_model, tiny_tokenizer  # noqa: E402

from common.infra import extraction as E  # noqa: E402
from common.infra.data import DataError  # noqa: E402
from common.maths import lm_eval as L  # noqa: E402
from common.maths.sae import SAE  # noqa: E402

TEXTS = ["to be or not to be that is the question", "whether tis nobler in the mind", "to suffer the slings",
         "and arrows of outrageous fortune or to take arms against a sea of troubles"]
LAYER = 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids_of(tok, texts=TEXTS):
    return [list(r) for r in tok(texts)["input_ids"]]


def warp(h):
    """A reconstruction that is neither the identity nor affine."""
    return 0.7 * h + 0.3 * torch.sin(3 * h) + 0.05


def reference(model, ids, layer, fn):
    """CE and KL(clean || spliced) from the model's own full forward, one text at a time (no padding): a hook
    replaces block ``layer - 1``'s output at every position but the first by ``fn``; log-softmax of all logits."""
    block = E.blocks_of(model)[layer - 1]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.cat([h[:, :1], fn(h[:, 1:])], 1)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    ce = kl = n = 0.0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            clean = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
            handle = block.register_forward_hook(hook)
            try:
                spliced = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
            finally:
                handle.remove()
            pos = torch.arange(1, len(row) - 1)  # every position but the first with a next token
            ce += float(F.nll_loss(spliced[pos], x[0, pos + 1], reduction="sum"))
            kl += float(F.kl_div(spliced[pos], clean[pos], log_target=True, reduction="sum"))
            n += len(pos)
    return ce / n, kl / n


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_splice_equals_the_models_forward_with_a_hook(arch, tok):
    model = tiny_model(arch)
    if arch == "gemma3":
        model.config.final_logit_softcapping = 2.0  # Gemma-2's cap, applied after lm_head: exercised here
    ids = ids_of(tok)
    ev = L.LMEval(model, ids, LAYER, mean=torch.zeros(32), batch_size=3, chunk=5)
    assert ev.n_tokens == sum(len(r) - 2 for r in ids) and ev.n_texts == 4
    got = ev.losses({"warp": warp, "zero": torch.zeros_like})
    for name, fn in (("warp", warp), ("zero", torch.zeros_like)):
        ce, kl = reference(model, ids, LAYER, fn)
        assert math.isclose(got[name]["ce"], ce, rel_tol=1e-5), (name, got[name], ce)
        # float32 log-probabilities: KL to ~1e-6 absolute (this tiny model's KL is ~4e-4)
        assert math.isclose(got[name]["kl"], kl, rel_tol=1e-4, abs_tol=2e-6), (name, got[name], kl)
    ce_clean, _ = reference(model, ids, LAYER, lambda h: h)
    assert math.isclose(ev.baselines["ce_clean"], ce_clean, rel_tol=1e-5)
    assert ev.baselines["ce_zero"] == got["zero"]["ce"] and ev.baselines["kl_zero"] == got["zero"]["kl"]


def test_identity_recovers_everything_and_ablations_nothing(tok):
    model = tiny_model("llama")
    mean = torch.randn(32)
    ev = L.LMEval(model, ids_of(tok), LAYER, mean=mean, batch_size=2)
    s = ev.score({"identity": lambda h: h, "zero": torch.zeros_like, "mean": lambda h: mean.expand_as(h)})
    assert s["identity"]["kl_sae"] == 0.0 and s["identity"]["kl_div_score"] == 1.0
    assert math.isclose(s["identity"]["ce_loss_score"], 1.0, abs_tol=1e-9)
    assert math.isclose(s["identity"]["ce_loss_score_mean"], 1.0, abs_tol=1e-9)
    assert s["zero"]["ce_loss_score"] == 0.0 and s["zero"]["kl_div_score"] == 0.0
    assert s["mean"]["ce_loss_score_mean"] == 0.0 and s["mean"]["kl_div_score_mean"] == 0.0
    b = ev.baselines
    assert b["kl_zero"] > 0 and b["kl_mean"] > 0 and b["ce_zero"] != b["ce_clean"]


def test_scores_formula_by_hand():
    b = {"ce_clean": 2.0, "ce_zero": 6.0, "kl_zero": 4.0, "ce_mean": 3.0, "kl_mean": 1.0}
    s = L.scores(2.5, 0.5, b)
    assert s == {"ce_loss_score": 3.5 / 4, "kl_div_score": 3.5 / 4, "ce_sae": 2.5, "kl_sae": 0.5,
                 "ce_loss_score_mean": 0.5, "kl_div_score_mean": 0.5}


def test_chunked_equals_unchunked_and_batching_changes_nothing(tok):
    model = tiny_model("llama")
    ids = ids_of(tok)
    whole = L.LMEval(model, ids, LAYER, mean=torch.zeros(32), batch_size=4, chunk=10 ** 6).losses({"w": warp})["w"]
    for chunk, batch in ((1, 4), (7, 1), (3, 3)):
        part = L.LMEval(model, ids, LAYER, mean=torch.zeros(32), batch_size=batch, chunk=chunk).losses({"w": warp})["w"]
        assert math.isclose(part["ce"], whole["ce"], rel_tol=1e-6) and math.isclose(part["kl"], whole["kl"],
                                                                                   rel_tol=1e-5), (chunk, batch)


def test_last_rows_are_the_extracted_activations(tok):
    model = tiny_model("gemma3")
    ev = L.LMEval(model, ids_of(tok), LAYER, mean=torch.zeros(32), batch_size=3)
    want = E.extract(model, tok, TEXTS, LAYER, "last", progress=False)
    torch.testing.assert_close(ev.last_rows, want, rtol=1e-5, atol=1e-5)
    L.check_heldout(ev.last_rows, want)
    with pytest.raises(ValueError, match="the texts are not those rows"):
        L.check_heldout(ev.last_rows, want[[1, 0, 2, 3]])  # two texts swapped


def test_heldout_ids_score_exactly_the_budget(tok):
    lengths = [len(r) for r in ids_of(tok, TEXTS + ["die"])]  # "die": 2 tokens, nothing to score
    assert lengths[-1] == 2
    ids, used = L.heldout_ids(tok, ["die"] + TEXTS, 128, n_tokens=lengths[0] - 2 + 3)
    assert [len(r) for r in ids] == [lengths[0], 5] and ids[1] == ids_of(tok)[1][:5] and used == [1, 2]
    ids, used = L.heldout_ids(tok, TEXTS, 4, n_tokens=8)  # truncated to 4 tokens each
    assert sum(len(r) - 2 for r in ids) == 8 and used == [0, 1, 2, 3]
    with pytest.raises(DataError, match="hold only 15 positions"):
        L.heldout_ids(tok, TEXTS, 6, n_tokens=16)  # 4 + 4 + 3 + 4


def test_sae_reconstruction_undoes_the_standardisation():
    sae = SAE(n_features=32, n_latents=16, activation="topk", k=4, seed=0)
    mean, std = torch.randn(32), torch.rand(32) + 0.5
    h = torch.randn(10, 32) * 3
    got = L.sae_reconstruction(sae, mean, std)(h)
    want = sae((h - mean) / std).recon.detach() * std + mean
    torch.testing.assert_close(got, want)


def test_an_architecture_whose_logits_differ_is_refused(tok):
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 1.0  # read here, ignored by Llama's own forward
    with pytest.raises(ValueError, match="cannot be spliced here"):
        L.LMEval(model, ids_of(tok), LAYER, mean=torch.zeros(32))


def test_score_runs_gives_every_tuned_row_its_own_runs_scores(tmp_path):
    """Rows of a tuned protocol (two budgets; the second budget's identical runs shared with the first) each get the
    scores of their own run, or of the run they share: the run id includes the budget."""
    import zlib
    from dataclasses import replace

    from common.experiments import experiment
    from common.experiments.experiment import RunSpec, TunedKey

    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(64, 6, generator=g), torch.randn(16, 6, generator=g)
    p = experiment.Protocol(base=dict(n_latents=8, k=2, epochs=1, batch_size=16), ablations={"base": experiment.BASE},
                            methods=("pam", "sgd"), seeds=2, base_seed=1)
    lrs = {("pam", 1): 1e-2, ("pam", 2): 1e-2, ("sgd", 1): 1e-2, ("sgd", 2): 3e-2}   # sgd's budget 2 differs
    tuned = {TunedKey("base", "-", m, r, b): {"lr": lr, "epochs": 1, "stop_epoch": 1}
             for (m, b), lr in lrs.items() for r in range(2)}
    p = replace(p, tuned=tuned)
    rows, _, models = experiment.execute(p, x, xt, tmp_path, progress=False, keep_models="base")
    assert {r["budget"] for r in rows} == {1, 2} and any(r["shared_with"] for r in rows)

    class Fake:
        baselines, n_tokens = {"ce_clean": 1.0}, 4

        def score(self, recons):
            return {rid: {k: float(zlib.crc32(rid.encode()) + i) for i, k in enumerate(L.ROW_KEYS)} for rid in recons}

    L.score_runs(rows, models, p.plan(), tmp_path, "stamp", None, Fake, torch.zeros(6), torch.ones(6),
                 progress=False)
    for r in rows:
        own = r["shared_with"] or RunSpec(r["method"], "base", "-", r["replicate"], r["budget"]).id
        assert own in models
        assert [r[k] for k in L.ROW_KEYS] == [float(zlib.crc32(own.encode()) + i) for i in range(len(L.ROW_KEYS))], r
