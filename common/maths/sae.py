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

Activations (``ACTIVATION_TABLE``, one entry per activation; docs/DESIGN.md, sections 1 and 2):
    topk       keep the k largest pre-activations (signed), zero the rest (the theory's TopK)
    topk_relu  topk followed by ReLU
    topk_abs   keep the k entries of largest |preact|, with their sign (the original scripts' choice)
    relu       max(preact, 0); an L1 penalty on codes belongs to the training loss, not the model
    jumprelu   preact * H(preact - theta_i), a learned per-latent threshold theta >= 0 (parameter ``threshold``),
               trained through straight-through estimators with an L0 penalty (Rajamanoharan et al. 2024)
    batchtopk  training: ReLU, then the k * batch largest values of the whole batch; inference: a learned
               threshold, preact * H(preact - theta) (buffer ``threshold``, a running average of the smallest
               value kept in training, as SAELens's BatchTopK)

Adding an activation is a subclass of ``Activation`` and its entry in ``ACTIVATION_TABLE`` (and its tests).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# forward() decodes TopK codes from their k non-zeros (embedding_bag, with its own backward) up to this
# density k / n_latents, and by a dense product above it. Time of one Adam step, sparse vs dense decode
# (bench/bench_decode.py, one thread, decoder trained): MNIST (784, d 256, k 15, batch 128) 0.65x;
# LLM (640, d 4096, batch 256) k 320 53 vs 77 ms, k 640 69 vs 83 ms, k 1024 90 vs 90, k 1280 103 vs 91.
SPARSE_DECODE_MAX_DENSITY = 0.2
INITS = ("paper", "transpose_unit")
PENALTIES = ("none", "l1", "l0")
# the region structures of docs/DESIGN.md section 2 (an activation's ``regions``)
REGIONS = {"order_k": "order-K power cells of the sites w_i (DESIGN 2.2)",
           "order_k_signed": "order-K power cells of the 2d signed sites +-w_i (DESIGN 2.2, topk_abs)",
           "patterns": "activation patterns are power cells of the patterns' sites (DESIGN 2.3)",
           "shifted_patterns": "activation patterns are the power cells of 2.3 with the biases b_i - theta_i "
                               "(DESIGN 2.7)"}
# batchtopk: the weight of the newest batch in the running average of the smallest value kept (SAELens's
# topk_threshold_lr default)
BATCHTOPK_THRESHOLD_RATE = 0.01


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


# --- straight-through estimators (JumpReLU; docs/DESIGN.md, section 3.10) ------------------------------
def rectangle(t: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((t > -0.5) & (t < 0.5)).to(t.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z = a H(a - theta). Backward: dz/da = H(a - theta) (no estimator for a); the pseudo-derivative
    dz/dtheta = -(theta / bandwidth) K((a - theta) / bandwidth), K the rectangle kernel, summed over rows."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return a * (a > theta)

    @staticmethod
    def backward(ctx, grad):
        a, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(theta / eps) * rectangle((a - theta) / eps) * grad).sum(0)
        return (a > theta).to(grad.dtype) * grad, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(a - theta) (the L0 count). Backward: no gradient to a; the pseudo-derivative
    dH/dtheta = -(1 / bandwidth) K((a - theta) / bandwidth), summed over rows."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * rectangle((a - theta) / eps) * grad).sum(0), None


# --- the activation table --------------------------------------------------------------------------------
class Activation:
    """One activation: what it computes and every property the rest of the code reads off it.

    name            its name (``SAEConfig.activation``)
    takes_k         needs an integer 1 <= k <= n_latents (the others keep k = None)
    sparse_k        its (inference) codes hold at most k non-zeros per row and are computed as those
                    (values, indices): the sparse decode, sparse evaluation, sparse PAM statistics and AuxK
    penalty         the sparsity penalty its training takes by default: "none", "l1" (on codes) or "l0"
    regions         the region structure of docs/DESIGN.md section 2 (a key of ``REGIONS``)
    threshold       None, "learned" (a per-latent ``nn.Parameter`` trained by gradient, an encoder parameter)
                    or "running" (a scalar buffer set by the training forward pass)
    trains_on_batch training codes depend on the whole batch (not row by row)
    saelens         the SAELens 6.x architecture that reproduces it exactly, or None
    sparsify        the sparsify 1.3 activation that reproduces it exactly, or None
    nearest_export  what an inexact export (``allow_inexact``) writes instead
    inexact_note    why the formats without an exact equivalent cannot reproduce it

    Methods: ``codes`` (inference, dense), ``sparse`` (sparse_k only), ``train_codes`` (what training
    differentiates; by default the inference codes), ``aux_select`` (AuxK's choice among dead latents).
    """

    name: ClassVar[str]
    takes_k: ClassVar[bool] = False
    sparse_k: ClassVar[bool] = False
    penalty: ClassVar[str] = "none"
    regions: ClassVar[str]
    threshold: ClassVar[str | None] = None
    trains_on_batch: ClassVar[bool] = False
    saelens: ClassVar[str | None] = None
    sparsify: ClassVar[str | None] = None
    nearest_export: ClassVar[str] = "topk_relu"
    inexact_note: ClassVar[str] = ""

    def sparse(self, preacts: torch.Tensor, k: int):
        """The non-zeros of the codes: (values (n, k), latent indices (n, k)), in no particular order."""
        raise ValueError(f"activation {self.name!r} has no k non-zeros per row (not a TopK activation)")

    def codes(self, preacts: torch.Tensor, k: int | None = None, threshold: torch.Tensor | None = None):
        """Dense inference codes (n, n_latents)."""
        vals, idx = self.sparse(preacts, k)
        return densify(vals, idx, preacts.shape[-1])

    def train_codes(self, preacts, k=None, threshold=None, bandwidth: float = 0.0):
        """Dense codes as training computes (and differentiates) them."""
        return self.codes(preacts, k, threshold)

    def aux_select(self, preacts: torch.Tensor, dead: torch.Tensor, k_aux: int):
        """AuxK: (values, indices) (n, k_aux) of the k_aux highest pre-activations among the dead latents,
        ReLU'd: only a positive pre-activation can grow into the codes; a signed target would let a dead latent
        reconstruct the residual with a negative value (its atom turned around) and stay dead."""
        idx = preacts.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
        return F.relu(preacts.gather(-1, idx)), idx

    def pattern_bias(self, bias: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        """Regions "patterns" and "shifted_patterns": the bias b' with code i non-zero <=> w_i . x + b'_i > 0."""
        raise ValueError(f"activation {self.name!r} has regions {self.regions!r}, not activation patterns")

    def __repr__(self) -> str:
        return f"<activation {self.name}>"


class TopK(Activation):
    name, takes_k, sparse_k, regions = "topk", True, True, "order_k"
    inexact_note = "keeps negative selected pre-activations, which the library's TopK sets to 0 (ReLU)"

    def sparse(self, preacts, k):
        return preacts.topk(k, dim=-1, sorted=False)  # the set matters, not the order: ~15% faster


class TopKReLU(TopK):
    name, saelens, sparsify = "topk_relu", "topk", "topk"

    def sparse(self, preacts, k):
        vals, idx = super().sparse(preacts, k)
        return F.relu(vals), idx


class TopKAbs(Activation):
    name, takes_k, sparse_k, regions, saelens = "topk_abs", True, True, "order_k_signed", "abstopk"
    inexact_note = "selects by |pre-activation|; sparsify has no such TopK (it applies ReLU, then keeps the k largest)"

    def sparse(self, preacts, k):
        idx = preacts.abs().topk(k, dim=-1, sorted=False).indices
        return preacts.gather(-1, idx), idx

    def aux_select(self, preacts, dead, k_aux):
        """As the codes: chosen by |a|, the sign kept."""
        idx = preacts.abs().masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
        return preacts.gather(-1, idx), idx


class ReLU(Activation):
    name, penalty, regions, saelens, sparsify = "relu", "l1", "patterns", "standard", "topk"
    nearest_export = "relu"

    def codes(self, preacts, k=None, threshold=None):
        return F.relu(preacts)

    def pattern_bias(self, bias, threshold):
        return bias


class JumpReLU(Activation):
    name, penalty, regions, threshold, saelens = "jumprelu", "l0", "shifted_patterns", "learned", "jumprelu"
    nearest_export = "relu"
    inexact_note = "has a learned per-latent threshold; sparsify has no thresholded activation"

    def codes(self, preacts, k=None, threshold=None):
        return preacts * (preacts > threshold)

    def train_codes(self, preacts, k=None, threshold=None, bandwidth=0.0):
        return JumpReLUFunction.apply(preacts, threshold, bandwidth)

    def l0(self, preacts, threshold, bandwidth: float) -> torch.Tensor:
        """The mean over rows of the number of non-zero codes, with the Step estimator's theta gradient."""
        return StepFunction.apply(preacts, threshold, bandwidth).sum(-1).mean()

    def pattern_bias(self, bias, threshold):
        return bias - threshold


class BatchTopK(Activation):
    name, takes_k, regions, threshold, trains_on_batch = "batchtopk", True, "shifted_patterns", "running", True
    saelens, nearest_export = "jumprelu", "relu"
    inexact_note = "is a thresholded ReLU at inference; sparsify has no thresholded activation"

    def codes(self, preacts, k=None, threshold=None):
        return preacts * (preacts > threshold)

    def train_codes(self, preacts, k=None, threshold=None, bandwidth=0.0):
        """ReLU, then the k * n_rows largest values of the whole batch (the rest 0)."""
        acts = F.relu(preacts)
        flat = acts.reshape(-1)
        vals, idx = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)

    @torch.no_grad()
    def update_threshold(self, threshold: torch.Tensor, codes: torch.Tensor) -> None:
        """threshold <- (1 - r) threshold + r * (the smallest positive code kept), r = BATCHTOPK_THRESHOLD_RATE;
        unchanged when no code is positive."""
        positive = codes[codes > 0]
        if positive.numel():
            r = BATCHTOPK_THRESHOLD_RATE
            threshold.copy_((1 - r) * threshold.double() + r * positive.min().double())

    def pattern_bias(self, bias, threshold):
        return bias - threshold


ACTIVATION_TABLE = {a.name: a for a in (TopK(), TopKReLU(), TopKAbs(), ReLU(), JumpReLU(), BatchTopK())}
ACTIVATIONS = tuple(ACTIVATION_TABLE)
TOPK_ACTIVATIONS = tuple(n for n, a in ACTIVATION_TABLE.items() if a.sparse_k)


def activation_spec(activation: str) -> Activation:
    """The table entry of ``activation``; ValueError naming the accepted ones for an unknown name."""
    if activation not in ACTIVATION_TABLE:
        raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATION_TABLE[activation]


def check_activation(activation: str, k, n_latents: int) -> None:
    """Raise ValueError for an unknown activation or a k outside 1..n_latents (activations that take k)."""
    spec = activation_spec(activation)
    if not isinstance(n_latents, int) or n_latents < 1:
        raise ValueError(f"n_latents must be a positive integer, got {n_latents!r}")
    if spec.takes_k:
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"activation {activation!r} needs an integer k, got {k!r}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must satisfy 1 <= k <= n_latents={n_latents}, got k={k}")


@dataclass
class SAEConfig:
    """What an SAE is built from, its seed aside; the one place of the model's defaults. ``k``: activations
    that take one only (the others keep None); ``tied``: no W_dec, the atoms are W_enc's rows; ``init`` and
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
        if not activation_spec(self.activation).takes_k:
            self.k = None


def topk_sparse(preacts: torch.Tensor, k: int, activation: str = "topk"):
    """The non-zeros of a TopK code: (values (n, k), indices (n, k)), indices into the latents, in no
    particular order within a row.

    ``topk``: the k largest preacts; ``topk_abs``: the k largest |preacts| with their sign;
    ``topk_relu``: as ``topk`` then ReLU (some values may be 0).
    """
    return activation_spec(activation).sparse(preacts, k)


def densify(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Scatter sparse (values, indices) (n, k) into dense codes (n, n_latents)."""
    return torch.zeros(vals.shape[0], n_latents, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)


def activate(preacts: torch.Tensor, activation: str, k: int | None = None,
             threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Dense inference codes (n, n_latents) from pre-activations (``threshold``: jumprelu, batchtopk)."""
    return activation_spec(activation).codes(preacts, k, threshold)


class SAE(nn.Module):
    """A one-layer sparse autoencoder ``recon = decode(rho(W_enc (x - centre) + b_enc))``.

    ``init="paper"`` (the original scripts): W_enc ~ enc_init_scale * N(0, 1), W_dec ~ dec_init_scale *
    N(0, 1); the encoder is drawn first from ``seed``, so a tied and an untied model built with the same
    seed share their encoder. ``init="transpose_unit"`` (SAELens, sparsify): random unit-norm atoms, and
    the encoder equal to them (W_enc = W_dec^T in the docs' orientation); the two scales are not used.
    Biases and the centre start at 0 (the training recipe may set b_dec and the centre from the data), and so
    does a threshold (jumprelu: a parameter (n_latents,), trained; batchtopk: a scalar buffer, set in training).

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
        self.act = activation_spec(c.activation)  # the activation's table entry
        if self.act.threshold == "learned":
            self.threshold = nn.Parameter(torch.zeros(n_latents))
        elif self.act.threshold == "running":
            self.register_buffer("threshold", torch.zeros(()))
        else:
            self.threshold = None

    # --- structure -----------------------------------------------------------------------------
    @property
    def is_topk(self) -> bool:
        """Whether the codes are computed as their k non-zeros per row (the activation's ``sparse_k``)."""
        return self.act.sparse_k

    @property
    def decodes_sparse(self) -> bool:
        """Whether ``forward`` decodes from the k non-zeros (TopK with k <= SPARSE_DECODE_MAX_DENSITY d)."""
        return self.is_topk and self.k <= SPARSE_DECODE_MAX_DENSITY * self.n_latents

    @property
    def atoms(self) -> torch.Tensor:
        """Dictionary atoms (n_latents, n_features): W_dec's rows, or W_enc's rows when tied."""
        return self.W_enc if self.tied else self.W_dec

    def encoder_parameters(self):
        """W_enc, b_enc and a learned threshold (jumprelu)."""
        return [self.W_enc, self.b_enc] + ([self.threshold] if self.act.threshold == "learned" else [])

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
        vals, idx = self.act.sparse(a, self.k)
        return vals, idx, a

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (n, n_latents)."""
        return self.act.codes(self.preacts(x), self.k, self.threshold)

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
            codes = self.act.codes(a, self.k, self.threshold)
            return SAEOutput(self.decode(codes), codes, a)
        out = self.forward_topk(x)
        return SAEOutput(out.recon, densify(out.vals, out.idx, self.n_latents), out.preacts)

    def forward_train(self, x: torch.Tensor, bandwidth: float = 0.0) -> SAEOutput:
        """``forward`` as training computes it: the activation's ``train_codes`` (jumprelu: the straight-through
        estimator with this kernel ``bandwidth``; batchtopk: the batch's k * n_rows largest values, and the
        running threshold updated from them). The same as ``forward`` for the other activations."""
        if self.is_topk:
            return self(x)
        a = self.preacts(x)
        codes = self.act.train_codes(a, self.k, self.threshold, bandwidth)
        if self.act.threshold == "running":
            self.act.update_threshold(self.threshold, codes.detach())
        return SAEOutput(self.decode(codes), codes, a)

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
