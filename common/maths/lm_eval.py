"""Loss recovered on the language model: an SAE's reconstruction spliced into the residual stream (DESIGN 9.2).

The SAE replaces ``hidden_states[layer]`` (the output of block ``layer - 1``, the tensor the activations were
extracted from: ``common/infra/extraction.py``) at every real position of held-out texts but the first (the BOS where
the tokenizer adds one, as token rule ``all`` leaves it out), in the model's own units; the rest of the model
runs on it. Scored: the next-token cross-entropy and ``KL(clean || spliced)`` at every position but the first
whose next token is in the text, averaged over those positions. Scores as SAELens defines them
(``sae_lens/evals.py``, ``get_downstream_reconstruction_metrics``), against an ablation of the same positions:

    ce_loss_score = (CE_ablated - CE_sae) / (CE_ablated - CE_clean)      1: the clean loss, 0: the ablation's
    kl_div_score  = (KL_ablated - KL_sae) / KL_ablated

``ce_loss_score`` / ``kl_div_score``: zero ablation (SAELens'); ``ce_loss_score_mean`` / ``kl_div_score_mean``:
the training mean in its place (mean ablation).

Cost: the blocks below the splice run once per text (:class:`LMEval` caches their output); each reconstruction
runs the blocks above it and the vocabulary projection, the latter in chunks of positions so that memory stays
bounded (Gemma-3: 262k logits a position); the clean logits of a chunk are computed once for every
reconstruction scored together.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..infra.extraction import blocks_of, pad
from ..infra.data import DataError

ROW_KEYS = ("ce_loss_score", "kl_div_score", "ce_sae", "kl_sae", "ce_loss_score_mean", "kl_div_score_mean")
BASELINE_KEYS = ("ce_clean", "ce_zero", "kl_zero", "ce_mean", "kl_mean")


def heldout_ids(tokenizer, texts: list[str], max_tokens: int, n_tokens: int) -> tuple[list[list[int]], list[int]]:
    """(token ids, which of ``texts`` they are): ``texts`` in the order given, tokenised as the extraction does
    (truncated to ``max_tokens``), as many as it takes to score exactly ``n_tokens`` positions (a text of L tokens
    scores L - 2: every position but the first whose next token is in the text); the last one cut to fit, texts
    with nothing to score skipped. Raises DataError when the texts hold fewer than ``n_tokens`` such positions."""
    if not (isinstance(n_tokens, int) and n_tokens >= 1):
        raise ValueError(f"n_tokens={n_tokens!r}: expected an int >= 1")
    out, used, left = [], [], n_tokens
    for i, ids in enumerate(tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]):
        if len(ids) < 3:
            continue
        out.append(list(ids[:left + 2]))
        used.append(i)
        left -= len(out[-1]) - 2
        if left == 0:
            return out, used
    raise DataError(f"n_tokens={n_tokens}: the {len(texts)} held-out texts hold only {n_tokens - left} positions "
                    "to score (every token but the first and the last of each text)")


def heldout_texts(tokenizer, texts: list[str], test_texts: list[int], max_tokens: int, n_tokens: int) -> dict:
    """E3's held-out tokens (DESIGN 9.2): the split's test texts ``test_texts`` (numbers of ``texts``, in the split's
    order; with the extraction in that order they are the first rows of ``X``) through :func:`heldout_ids`.

    Returns {"ids": token ids, "rows": the rows of ``X`` they are (positions in ``test_texts``), "texts": their
    numbers in ``texts``, "pad_id"}."""
    ids, used = heldout_ids(tokenizer, [texts[i] for i in test_texts], max_tokens, n_tokens)
    return dict(ids=ids, rows=used, texts=[test_texts[i] for i in used],
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def sae_reconstruction(sae, mean: torch.Tensor, std: torch.Tensor, device=None):
    """The function ``h -> std * sae(standardised h) + mean``: an SAE trained on standardised activations
    (``split.split_standardise``) reconstructing in the model's own units."""
    model = copy.deepcopy(sae).to(device or "cpu").eval()
    mean, std = mean.to(device or "cpu"), std.to(device or "cpu")

    def reconstruct(h):
        with torch.no_grad():
            return model.reconstruct((h.float() - mean) / std) * std + mean
    return reconstruct


@contextlib.contextmanager
def _bypassed(blocks, returns_tuple: bool):
    """Blocks that hand their input on unchanged (their own forward is restored on exit)."""
    def passthrough(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if returns_tuple else h
    for block in blocks:
        block.forward = passthrough
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class LMEval:
    """The held-out texts ``ids`` (token-id lists, :func:`heldout_ids`) run once through ``model`` up to
    ``hidden_states[layer]``; :meth:`losses` and :meth:`score` splice reconstructions there.

    ``mean``: the training mean in the model's units (mean ablation). ``batch_size`` texts a forward pass,
    ``chunk`` positions a vocabulary projection. The clean loss and both ablations are computed here
    (``baselines``)."""

    def __init__(self, model, ids: list[list[int]], layer: int, mean: torch.Tensor, batch_size: int = 8,
                 chunk: int = 128, pad_id: int = 0):
        for name, value in (("batch_size", batch_size), ("chunk", chunk)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: expected an int >= 1")
        if not ids or min(len(row) for row in ids) < 3:
            raise ValueError("ids: expected token-id lists of at least 3 tokens each (one position to score)")
        self.model, self.layer, self.chunk = model, layer, chunk
        self.blocks = blocks_of(model)
        if not (isinstance(layer, int) and 1 <= layer <= len(self.blocks) - 1):
            raise ValueError(f"layer={layer!r}: expected an int in 1..{len(self.blocks) - 1}")
        self.device = next(model.parameters()).device
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.mean = mean.to(self.device).float()
        self.n_texts = len(ids)
        self.batches, finals, targets, lasts = [], [], [], []
        captured = {}

        def hook(module, args, output):
            captured["tuple"] = isinstance(output, tuple)
            captured["hidden"] = output[0] if captured["tuple"] else output

        handle = self.blocks[layer - 1].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                for start in range(0, len(ids), batch_size):
                    input_ids, mask = pad(ids[start:start + batch_size], pad_id, "right")
                    input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
                    final = self.base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
                    lengths = mask.sum(1)
                    splice = mask.bool() & (position_ids >= 1)
                    scored = splice & (position_ids <= (lengths - 2)[:, None])
                    self.batches.append(dict(mask=mask, position_ids=position_ids, hidden=captured.pop("hidden"),
                                             splice=splice, scored=scored))
                    finals.append(final[scored])
                    targets.append(input_ids[:, 1:][scored[:, :-1]])
                    lasts.append(self.batches[-1]["hidden"][torch.arange(len(lengths)), lengths - 1])
        finally:
            handle.remove()
        self.returns_tuple = captured["tuple"]
        self.final_clean, self.targets = torch.cat(finals), torch.cat(targets)
        self.last_rows = torch.cat(lasts).float().cpu()  # hidden_states[layer] at each text's last token
        self.n_tokens = len(self.targets)
        self._check_splice(ids[0], pad_id)
        clean = self._chunks({})
        self.baselines = {"ce_clean": clean["clean"]["ce"], "n_tokens": self.n_tokens, "n_texts": self.n_texts}
        ablated = self.losses({"zero": torch.zeros_like, "mean": lambda h: self.mean.expand_as(h)})
        for name in ("zero", "mean"):
            self.baselines[f"ce_{name}"], self.baselines[f"kl_{name}"] = ablated[name]["ce"], ablated[name]["kl"]

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """The model's logits (float32) from its final hidden states (after the final norm)."""
        z = self.head(final).float()
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def _check_splice(self, first: list[int], pad_id: int) -> None:
        """The identity splice of the first text reproduces the model's own logits (else its architecture
        computes something this module does not: ValueError)."""
        b = self.batches[0]
        n = len(first)
        with torch.inference_mode():
            want = self.model(input_ids=torch.tensor([first], device=self.device), use_cache=False).logits[0].float()
            with _bypassed(self.blocks[:self.layer], self.returns_tuple):
                final = self.base(inputs_embeds=b["hidden"][:1, :n], attention_mask=b["mask"][:1, :n],
                                  position_ids=b["position_ids"][:1, :n], use_cache=False).last_hidden_state
            got = self.logits(final[0])
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            raise ValueError(f"{type(self.model).__name__}: logits of the model's forward differ from its blocks "
                             f"after hidden_states[{self.layer}] followed by its output layer (max difference "
                             f"{float((got - want).abs().max()):.3g}): this architecture cannot be spliced here")

    def _final(self, reconstruct) -> torch.Tensor:
        """Final hidden states (n_tokens, d) at the scored positions with ``reconstruct`` spliced in."""
        out = []
        with torch.inference_mode(), _bypassed(self.blocks[:self.layer], self.returns_tuple):
            for b in self.batches:
                h = b["hidden"].clone()
                h[b["splice"]] = reconstruct(h[b["splice"]]).to(h.dtype)
                final = self.base(inputs_embeds=h, attention_mask=b["mask"], position_ids=b["position_ids"],
                                  use_cache=False).last_hidden_state
                out.append(final[b["scored"]])
        return torch.cat(out)

    def _chunks(self, finals: dict) -> dict:
        """{name: {"ce", "kl"}} from final hidden states, ``chunk`` positions at a time; also "clean"."""
        sums = {name: [0.0, 0.0] for name in ("clean", *finals)}
        with torch.inference_mode():
            for start in range(0, self.n_tokens, self.chunk):
                rows = slice(start, start + self.chunk)
                target = self.targets[rows, None]
                clean = F.log_softmax(self.logits(self.final_clean[rows]), -1)
                sums["clean"][0] -= float(clean.gather(1, target).double().sum())
                p = clean.exp()
                for name, final in finals.items():
                    logq = F.log_softmax(self.logits(final[rows]), -1)
                    sums[name][0] -= float(logq.gather(1, target).double().sum())
                    sums[name][1] += float((p * (clean - logq)).sum(-1).double().sum())
        return {name: {"ce": ce / self.n_tokens, "kl": kl / self.n_tokens} for name, (ce, kl) in sums.items()}

    def losses(self, reconstructions: dict) -> dict:
        """{name: {"ce": CE with the reconstruction spliced, "kl": KL(clean || spliced)}}, means over the scored
        positions; ``reconstructions``: {name: function (n, d) -> (n, d) in the model's units}."""
        finals = {name: self._final(fn) for name, fn in reconstructions.items()}
        return {name: v for name, v in self._chunks(finals).items() if name in reconstructions}

    def score(self, reconstructions: dict) -> dict:
        """{name: {key: value for ROW_KEYS}}: the losses and their scores against both ablations."""
        b = self.baselines
        return {name: scores(v["ce"], v["kl"], b) for name, v in self.losses(reconstructions).items()}


def check_heldout(last_rows: torch.Tensor, extracted: torch.Tensor, tol: float = 0.05) -> None:
    """ValueError unless each held-out text's activation at its last token (``LMEval.last_rows``, all but a last
    text that was cut) is the extracted test row it is meant to be (``extracted``, same order): a misaligned list
    of texts would be scored as held out while it is not. ``tol``: relative distance (bf16 extraction moves rows
    by ~1%)."""
    n = min(len(last_rows), len(extracted))
    if n == 0:
        return
    gap = ((last_rows[:n] - extracted[:n]).norm(dim=1) / extracted[:n].norm(dim=1).clamp(min=1e-12)).max()
    if not float(gap) <= tol:
        raise ValueError(f"the held-out texts' last-token activations differ from the extracted test rows by up to "
                         f"{float(gap):.3g} (relative; tolerance {tol}): the texts are not those rows")


def scores(ce: float, kl: float, baselines: dict) -> dict:
    """ROW_KEYS from the spliced CE and KL and the baselines (ce_clean, ce_zero, kl_zero, ce_mean, kl_mean)."""
    b = baselines
    return {"ce_loss_score": (b["ce_zero"] - ce) / (b["ce_zero"] - b["ce_clean"]),
            "kl_div_score": (b["kl_zero"] - kl) / b["kl_zero"], "ce_sae": ce, "kl_sae": kl,
            "ce_loss_score_mean": (b["ce_mean"] - ce) / (b["ce_mean"] - b["ce_clean"]),
            "kl_div_score_mean": (b["kl_mean"] - kl) / b["kl_mean"]}


def ids_sha256(ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def source_sha256() -> str:
    """The scores' code: this module and the extraction's (the splice point)."""
    common = Path(__file__).resolve().parents[1]
    return hashlib.sha256(b"".join((common / f).read_bytes() for f in ("maths/lm_eval.py", "infra/extraction.py"))
                          ).hexdigest()


def score_runs(rows: list[dict], models: dict, runs: list, out: Path, stamp: str, eval_key: str | None, evaluator,
               mean: torch.Tensor, std: torch.Tensor, group: int = 8, device=None, progress: bool = True) -> dict:
    """Add ROW_KEYS to every row (of ``experiment.execute``) whose model is in ``models`` ({run id: SAE}; a
    shared row's model is its ``shared_with`` run's); returns the baselines.

    Each run's scores are kept in ``<out>/lm_eval/<run file stem>.json`` with its run key, ``stamp`` (the data
    and training code: ``experiment.fingerprint``) and ``eval_key`` (the language model, layer, held-out tokens and
    this code), and reused only when all three match (``eval_key`` None: never). ``evaluator()`` makes the
    :class:`LMEval`, only when some run must be scored; ``group`` SAEs are scored together (one clean vocabulary
    projection for all of them). ``mean``, ``std``: the standardisation the SAEs were trained under."""
    from tqdm.auto import tqdm

    from ..infra.outputs import write_json
    from ..experiments.experiment import RunSpec, run_file

    by_id = {r.spec.id: r for r in runs}
    folder = Path(out) / "lm_eval"
    found, baselines = {}, None
    for rid in models:
        try:
            saved = json.loads((folder / f"{run_file(out, by_id[rid]).stem}.json").read_text())
            if eval_key is not None and (saved["key"], saved["fingerprint"], saved["eval"]) == (
                    by_id[rid].key, stamp, eval_key):
                found[rid], baselines = saved["scores"], saved["baselines"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    todo = [rid for rid in models if rid not in found]
    if found:
        tqdm.write(f"  LM loss: {len(found)} runs scored earlier with the same settings, data and code ({folder}); "
                   f"{len(todo)} to score")
    if todo:
        ev = evaluator()
        baselines = ev.baselines
        bar = tqdm(total=len(todo), desc=f"LM loss ({ev.n_tokens} tokens)", disable=not progress)
        for start in range(0, len(todo), group):
            part = todo[start:start + group]
            got = ev.score({rid: sae_reconstruction(models[rid], mean, std, device) for rid in part})
            for rid in part:
                found[rid] = got[rid]
                write_json(folder / f"{run_file(out, by_id[rid]).stem}.json",
                           {"key": by_id[rid].key, "fingerprint": stamp, "eval": eval_key, "scores": got[rid],
                            "baselines": baselines})
            bar.update(len(part))
        bar.close()
    for row in rows:
        rid = row["shared_with"] or RunSpec(row["method"], row["ablation"], row["value"], row["replicate"],
                                            row.get("budget", 0)).id
        if rid in found:
            row.update(found[rid])
    return baselines


def summary(rows: list[dict], baselines: dict) -> str:
    """Markdown: per ablation and value, each method's LM scores (mean ± std over seeds) for the rows that
    have them, after the baselines."""
    from ..experiments.report import aggregate
    from .train import METHODS

    scored = [r for r in rows if r.get("ce_sae") is not None]
    b = baselines
    lines = ["## Loss recovered on the language model", "",
             f"{b['n_tokens']} held-out tokens ({b['n_texts']} test texts); the SAE's reconstruction replaces "
             "the layer's residual stream at every position but the first. CE (nats/token): clean "
             f"{b['ce_clean']:.4f}, zero ablation {b['ce_zero']:.4f}, mean ablation {b['ce_mean']:.4f}; KL to the "
             f"clean model: zero ablation {b['kl_zero']:.4f}, mean ablation {b['kl_mean']:.4f}. CE score = "
             "(CE_ablated - CE_sae) / (CE_ablated - CE_clean), KL score = (KL_ablated - KL_sae) / KL_ablated "
             "(SAELens' definitions; 1: the clean model). 'zero' / 'mean': the ablation the score is measured "
             "against.", ""]
    if not scored:
        return "\n".join(lines + ["(no run has a kept model to score)", ""])
    agg = {k: aggregate(scored, k) for k in ("ce_loss_score", "ce_loss_score_mean", "kl_div_score", "ce_sae",
                                             "kl_sae")}
    present = [m for m in METHODS if any(r["method"] == m for r in scored)]
    for ablation in dict.fromkeys(r["ablation"] for r in scored):
        lines += [f"### {ablation}", "", "| value | " + " | ".join(
            f"{m} CE score (zero) | CE score (mean) | KL score (zero) | CE | KL" for m in present) + " |",
            "|---" * (1 + 5 * len(present)) + "|"]
        for v in dict.fromkeys(r["value"] for r in scored if r["ablation"] == ablation):
            cells = []
            for m in present:
                if (ablation, v, m) not in agg["ce_sae"]:
                    cells.append("– | – | – | – | –")
                    continue
                cells.append(" | ".join(_cell(agg[k][(ablation, v, m)]) for k in agg))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(stat) -> str:
    mean, std, n = stat
    return f"{mean:.4f}" + (f" ± {std:.4f}" if n > 1 and np.isfinite(std) else "")
