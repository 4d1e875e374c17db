"""Residual-stream activations of a language model: hook one block, run batches of texts, select tokens.

- ``layer``: an index into HF ``hidden_states`` (``common/infra/llm_assets.py``): the hook sits on block
  ``layer - 1`` and, with ``early_exit``, the blocks after it are never run.
- ``token_rule``: ``"last"`` takes the last real token of each text (one row per text); ``"all"`` takes
  every real token except the first one of each text (the BOS token where the tokenizer adds one: its
  activations are huge outliers). Padding side never changes the result: the rows are found from the
  attention mask and position ids are computed from it.
- ``dtype``: precision of the matmuls. ``"float32"`` (default) is exact; ``"bfloat16"`` runs them under
  bf16 autocast (~2.8x faster on CPUs with bf16 units; the residual stream and the stored activations
  stay float32; vectors move by ~1% of their norm). Gemma activations exceed 60,000: never float16.

The texts are run in batches of ``batch_size`` consecutive texts of the list given (a caller that wants
another order passes the texts in that order: ``activations.load_activations(order_seed=...)``).
"""
from __future__ import annotations

import torch

from .cpu import FreeCores
from .data import DataError, check_finite

TOKEN_RULES = ("last", "all")
DTYPES = ("float32", "bfloat16")  # precision of the matmuls; activations are always stored as float32


class _StopForward(Exception):
    """Raised by the hook once the chosen block has run: the blocks after it are never computed."""


def blocks_of(model) -> torch.nn.ModuleList:
    """The list of transformer blocks: the first ModuleList as long as the config's num_hidden_layers."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"found no list of {n} blocks in {type(model).__name__}")


def check_layer(layer: int, n_layers: int) -> None:
    """ValueError unless ``layer`` is a hidden_states index of a block output: 1 .. n_layers - 1."""
    if not (isinstance(layer, int) and 1 <= layer <= n_layers - 1):
        raise ValueError(f"layer={layer!r}: expected an int in 1..{n_layers - 1} (hidden_states index; "
                         f"the model has {n_layers} blocks)")


def check_args(token_rule, n_texts, max_tokens, batch_size, padding_side, dtype) -> None:
    """ValueError naming the first extraction argument that is not accepted."""
    if token_rule not in TOKEN_RULES:
        raise ValueError(f"token_rule={token_rule!r}: expected one of {TOKEN_RULES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    for name, value, low in (("n_texts", n_texts, 1), ("max_tokens", max_tokens, 2), ("batch_size", batch_size, 1)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name}={value!r}: expected an int >= {low}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")


def pad(ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length on ``side``. Returns (input_ids (B, T), attention_mask (B, T))."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return input_ids, mask


def select_tokens(hidden: torch.Tensor, mask: torch.Tensor, token_rule: str) -> torch.Tensor:
    """Rows of ``hidden`` (B, T, n_features) kept by ``token_rule``, given ``mask`` (B, T) with 1 on real tokens.

    ``last``: (B, n_features), the last real token of each text, wherever the padding is.
    ``all``: (n_real - B, n_features), every real token but the first of each text, text by text.
    """
    width = mask.shape[1]
    if token_rule == "last":
        last = width - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0]), last]
    keep = mask.bool().clone()
    keep[torch.arange(mask.shape[0]), mask.argmax(1)] = False  # first real token of each text
    return hidden[keep]


def extract(model, tokenizer, texts: list[str], layer: int, token_rule: str = "last", max_tokens: int = 128,
            batch_size: int = 8, padding_side: str = "right", dtype: str = "float32", early_exit: bool = True,
            progress: bool = True, adapt_threads: bool = True) -> torch.Tensor:
    """Residual-stream activations ``hidden_states[layer]`` of ``texts``, float32 on the cpu.

    Returns (len(texts), n_features) for ``last``, (n_real_tokens - len(texts), n_features) for ``all``.
    ``dtype="bfloat16"`` runs the matmuls under bf16 autocast (the residual stream stays float32).
    With ``early_exit`` the forward pass stops after block ``layer - 1``. Raises DataError on NaN/Inf.
    ``adapt_threads``: follow the free cores (common/infra/cpu.py); False keeps torch's thread count.
    """
    return torch.cat(list(extract_batches(model, tokenizer, texts, layer, token_rule, max_tokens, batch_size,
                                          padding_side, dtype, early_exit, progress, adapt_threads)))


def extract_batches(model, tokenizer, texts: list[str], layer: int, token_rule: str = "last", max_tokens: int = 128,
                    batch_size: int = 8, padding_side: str = "right", dtype: str = "float32", early_exit: bool = True,
                    progress: bool = True, adapt_threads: bool = True):
    """:func:`extract`, one batch of texts at a time: yields each batch's rows (float32, cpu), in order, so
    that a caller can write them to disk as they come (``activations.activation_shards``). Arguments as in
    ``extract``."""
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("texts is empty")
    check_args(token_rule, len(texts), max_tokens, batch_size, padding_side, dtype)
    blocks = blocks_of(model)
    check_layer(layer, len(blocks))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    if min(len(row) for row in ids) < (2 if token_rule == "all" else 1):
        raise DataError("a text is empty after tokenisation")
    captured = {}

    def hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        if early_exit:
            raise _StopForward

    handle = blocks[layer - 1].register_forward_hook(hook)
    device = next(model.parameters()).device
    bar = tqdm(total=sum(map(len, ids)), unit="tok", unit_scale=True, disable=not progress,
               desc=f"hidden_states[{layer}] ({token_rule})")
    # threads for the cores other processes leave free (common/infra/cpu.py): a competing process costs a share
    # of the throughput instead of stalling spinning threads; restored afterwards
    threads, free = torch.get_num_threads(), FreeCores() if adapt_threads and device.type == "cpu" else None
    try:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            for start in range(0, len(ids), batch_size):
                input_ids, mask = pad(ids[start:start + batch_size], pad_id, padding_side)
                # Positions count real tokens only, so a left-padded text sees the positions it has alone.
                position_ids = (mask.cumsum(1) - 1).clamp(min=0)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                chunk = select_tokens(captured.pop("hidden").float().cpu(), mask, token_rule)
                check_finite(chunk, f"activations of texts {start}..{start + len(input_ids) - 1}")
                yield chunk
                bar.update(int(mask.sum()))
                if free is not None:
                    free.update()
    finally:
        handle.remove()
        bar.close()
        torch.set_num_threads(threads)

