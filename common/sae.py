"""The sparse autoencoder: activations, tied or untied decoder, encode / decode / forward.

Shapes: ``x`` (n_samples, n_features); ``preacts`` and ``codes`` (n_samples, n_latents);
``recon`` (n_samples, n_features). Parameters (docs/DESIGN.md, section 1):

    W_enc (n_latents, n_features)   row i is the encoder direction w_i
    b_enc (n_latents,)
    W_dec (n_latents, n_features)   row i is dictionary atom i, i.e. the paper's W_dec transposed
                                    (absent when tied: the atoms are then the rows of W_enc)
    b_dec (n_features,)
    centre (n_features,)            a buffer, not trained: subtracted from x before encoding
                                    (zero unless the training recipe centres the input)

Activations:
    topk       keep the k largest pre-activations (signed), zero the rest (the theory's TopK)
    topk_relu  topk followed by ReLU
    topk_abs   keep the k entries of largest |preact|, with their sign (the original scripts' choice)
    relu       max(preact, 0); an L1 penalty on codes belongs to the training loss, not the model
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("topk", "topk_relu", "topk_abs", "relu")
TOPK_ACTIVATIONS = ("topk", "topk_relu", "topk_abs")
# forward() decodes TopK codes from their k non-zeros (embedding_bag, with its own backward) up to this
# density k / n_latents, and by a dense product above it. Time of one Adam step, sparse vs dense decode
# (bench/bench_decode.py, one thread, decoder trained): MNIST (784, d 256, k 15, batch 128) 0.65x;
# LLM (640, d 4096, batch 256) k 320 53 vs 77 ms, k 640 69 vs 83 ms, k 1024 90 vs 90, k 1280 103 vs 91.
SPARSE_DECODE_MAX_DENSITY = 0.2
INITS = ("paper", "transpose_unit")


class SAEOutput(NamedTuple):
    """``SAE.forward``: reconstruction (n, n_features), dense codes and pre-activations (n, n_latents)."""

    recon: torch.Tensor
    codes: torch.Tensor
    preacts: torch.Tensor


class TopKOutput(NamedTuple):
    """``SAE.forward_topk``: reconstruction (n, n_features), the k non-zeros of each code (values and
    latent indices, (n, k)) and the pre-activations (n, n_latents)."""

    recon: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor
    preacts: torch.Tensor


def check_activation(activation: str, k, n_latents: int) -> None:
    """Raise ValueError for an unknown activation or a k outside 1..n_latents (TopK variants)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
    if not isinstance(n_latents, int) or n_latents < 1:
        raise ValueError(f"n_latents must be a positive integer, got {n_latents!r}")
    if activation in TOPK_ACTIVATIONS:
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"activation {activation!r} needs an integer k, got {k!r}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must satisfy 1 <= k <= n_latents={n_latents}, got k={k}")


@dataclass
class SAEConfig:
    """What an SAE is built from, its seed aside; the one place of the model's defaults. ``k``: TopK
    activations only (a ReLU model keeps None); ``tied``: no W_dec, the atoms are W_enc's rows; ``init`` and
    the two scales: see ``SAE``. An invalid value raises ValueError naming it."""

    n_features: int
    n_latents: int
    activation: str = "topk"
    k: int | None = None
    tied: bool = False
    enc_init_scale: float = 0.1
    dec_init_scale: float = 0.01
    init: str = "paper"

    def __post_init__(self):
        check_activation(self.activation, self.k, self.n_latents)
        if not isinstance(self.n_features, int) or self.n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {self.n_features!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; accepted: {', '.join(INITS)}")
        if self.activation == "relu":
            self.k = None


def topk_sparse(preacts: torch.Tensor, k: int, activation: str = "topk"):
    """The non-zeros of a TopK code: (values (n, k), indices (n, k)), indices into the latents, in no
    particular order within a row.

    ``topk``: the k largest preacts; ``topk_abs``: the k largest |preacts| with their sign;
    ``topk_relu``: as ``topk`` then ReLU (some values may be 0).
    """
    if activation == "topk_abs":
        idx = preacts.abs().topk(k, dim=-1, sorted=False).indices
        vals = preacts.gather(-1, idx)
    else:
        vals, idx = preacts.topk(k, dim=-1, sorted=False)  # the set matters, not the order: ~15% faster
        if activation == "topk_relu":
            vals = F.relu(vals)
    return vals, idx


def densify(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Scatter sparse (values, indices) (n, k) into dense codes (n, n_latents)."""
    return torch.zeros(vals.shape[0], n_latents, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)


def activate(preacts: torch.Tensor, activation: str, k: int | None = None) -> torch.Tensor:
    """Dense codes (n, n_latents) from pre-activations."""
    if activation == "relu":
        return F.relu(preacts)
    vals, idx = topk_sparse(preacts, k, activation)
    return densify(vals, idx, preacts.shape[-1])


class SAE(nn.Module):
    """A one-layer sparse autoencoder ``recon = decode(rho(W_enc (x - centre) + b_enc))``.

    ``init="paper"`` (the original scripts): W_enc ~ enc_init_scale * N(0, 1), W_dec ~ dec_init_scale *
    N(0, 1); the encoder is drawn first from ``seed``, so a tied and an untied model built with the same
    seed share their encoder. ``init="transpose_unit"`` (SAELens, sparsify): random unit-norm atoms, and
    the encoder equal to them (W_enc = W_dec^T in the docs' orientation); the two scales are not used.
    Biases and the centre start at 0 (the training recipe may set b_dec and the centre from the data).

    ``SAE(*args, seed=0, **kwargs)``: ``args`` and ``kwargs`` are ``SAEConfig``'s fields (positionally in its
    order: n_features, n_latents, activation, k, tied, ...), kept as ``config``; ``seed`` seeds the draw.
    """

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__()
        self.config = c = SAEConfig(*args, **kwargs)
        self.n_features, self.n_latents, self.activation, self.k, self.tied = (
            c.n_features, c.n_latents, c.activation, c.k, c.tied)
        n_latents, n_features = c.n_latents, c.n_features
        g = torch.Generator().manual_seed(int(seed))
        if c.init == "paper":
            w_enc = c.enc_init_scale * torch.randn(n_latents, n_features, generator=g)
            w_dec = c.dec_init_scale * torch.randn(n_latents, n_features, generator=g)
        else:
            w_dec = torch.randn(n_latents, n_features, generator=g)
            w_dec /= w_dec.norm(dim=1, keepdim=True)
            w_enc = w_dec.clone()
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = None if c.tied else nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(n_features))
        self.register_buffer("centre", torch.zeros(n_features))
        self._centred = False

    # --- structure -----------------------------------------------------------------------------
    @property
    def is_topk(self) -> bool:
        return self.activation in TOPK_ACTIVATIONS

    @property
    def decodes_sparse(self) -> bool:
        """Whether ``forward`` decodes from the k non-zeros (TopK with k <= SPARSE_DECODE_MAX_DENSITY d)."""
        return self.is_topk and self.k <= SPARSE_DECODE_MAX_DENSITY * self.n_latents

    @property
    def atoms(self) -> torch.Tensor:
        """Dictionary atoms (n_latents, n_features): W_dec's rows, or W_enc's rows when tied."""
        return self.W_enc if self.tied else self.W_dec

    def encoder_parameters(self):
        return [self.W_enc, self.b_enc]

    def decoder_parameters(self):
        return [self.b_dec] if self.tied else [self.W_dec, self.b_dec]

    @torch.no_grad()
    def set_centre(self, centre: torch.Tensor) -> None:
        """Subtract ``centre`` (n_features,) from every input before encoding (fixed, not trained)."""
        if tuple(centre.shape) != (self.n_features,):
            raise ValueError(f"centre must have shape ({self.n_features},), got {tuple(centre.shape)}")
        self.centre.copy_(centre)
        self._centred = bool(self.centre.any())

    @property
    def centred(self) -> bool:
        """Whether a non-zero centre is subtracted from the input before encoding."""
        return self._centred

    @property
    def encoder_bias(self) -> torch.Tensor:
        """The bias of the affine map x -> preacts: b_enc - W_enc centre (b_enc when not centred). The
        power-diagram weights of docs/DESIGN.md use this bias."""
        return self.b_enc - self.W_enc @ self.centre if self._centred else self.b_enc

    # --- maps --------------------------------------------------------------------------------------
    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations (n, n_latents) = (x - centre) W_enc^T + b_enc."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (n_samples, {self.n_features}), got {tuple(x.shape)}")
        if x.dtype != self.W_enc.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype}, the model's parameters {self.W_enc.dtype}: convert one of them "
                             f"(x.to({self.W_enc.dtype}) or model.to({x.dtype}))")
        if self._centred:
            x = x - self.centre
        return F.linear(x, self.W_enc, self.b_enc)

    def encode_sparse(self, x: torch.Tensor):
        """TopK models only: (values (n, k), indices (n, k), preacts (n, n_latents))."""
        if not self.is_topk:
            raise ValueError(f"encode_sparse needs a TopK activation, this model uses {self.activation!r}")
        a = self.preacts(x)
        bad = ~torch.isfinite(x).all(1)
        if bad.any():
            rows = torch.nonzero(bad).flatten()
            raise ValueError(f"x holds NaN/Inf in {len(rows)} rows (first: row {int(rows[0])}): no active set; "
                             "remove or repair those rows")
        vals, idx = topk_sparse(a, self.k, self.activation)
        return vals, idx, a

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (n, n_latents)."""
        return activate(self.preacts(x), self.activation, self.k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction (n, n_features) = codes @ atoms + b_dec."""
        return codes @ self.atoms + self.b_dec

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the k non-zeros of each code: touches only k atoms per sample (inference)."""
        return F.embedding_bag(idx, self.atoms, per_sample_weights=vals, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """SAEOutput(recon (n, n_features), codes (n, n_latents), preacts (n, n_latents)).

        A TopK model with k <= SPARSE_DECODE_MAX_DENSITY * n_latents decodes from its k non-zeros
        (``decode_sparse``): the same reconstruction and gradients as the dense product, at a fraction
        of the cost of the decoder's forward and backward."""
        if not self.is_topk:
            a = self.preacts(x)
            codes = activate(a, self.activation)
            return SAEOutput(self.decode(codes), codes, a)
        out = self.forward_topk(x)
        return SAEOutput(out.recon, densify(out.vals, out.idx, self.n_latents), out.preacts)

    def forward_topk(self, x: torch.Tensor) -> TopKOutput:
        """TopK models: ``forward`` without the dense codes (their k non-zeros instead)."""
        vals, idx, a = self.encode_sparse(x)
        recon = self.decode_sparse(vals, idx) if self.decodes_sparse else self.decode(densify(vals, idx, self.n_latents))
        return TopKOutput(recon, vals, idx, a)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``forward``'s reconstruction alone: a TopK model never builds the dense codes."""
        return self.forward_topk(x).recon if self.is_topk else self(x).recon

    # --- persistence --------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """Everything needed to rebuild the model, decoder included."""
        return {"config": asdict(self.config),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "SAE":
        model = cls(**ckpt["config"])
        state = dict(ckpt["state_dict"])
        state.setdefault("centre", torch.zeros(model.n_features))  # checkpoints from before the centre
        model.load_state_dict(state)
        model.set_centre(model.centre.clone())
        return model
