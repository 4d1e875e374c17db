"""Training recipes: the paper's settings, or the field's TopK recipe (SAELens, EleutherAI sparsify, OpenAI).

A recipe is a set of defaults for the elements below; each element is also a setting of its own
(``SAE(init=...)``, ``TrainConfig(...)``), so any one of them can be switched on or off.

    element            setting (where)                 paper       modern      where it comes from
    decoder init       init (SAE)                      "paper"     "transpose_unit"
                       paper: W_enc ~ 0.1 N(0,1), W_dec ~ 0.01 N(0,1); transpose_unit: unit-norm random
                       atoms and W_enc = the atoms (the decoder is the encoder's transpose)
                       (SAELens init_encoder_as_decoder_transpose; sparsify copies W_enc into W_dec)
    b_dec init         b_dec_init (TrainConfig)        "zero"      "mean"      training mean, or "median":
                       the geometric median (SAELens b_dec_init_method; Bricken et al. 2023)
    input centring     centre_input (TrainConfig)      False       True        the b_dec init is subtracted
                       from x before encoding (both libraries subtract b_dec; here a fixed centre, see
                       docs/DESIGN.md: it keeps PAM's decoder solve exact)
    unit-norm atoms    unit_norm_atoms (TrainConfig)   False       False       after every SGD step each atom
                       is renormalised and, before it, the gradient component parallel to each atom removed
                       (sparsify normalize_decoder; SAELens 6 leaves atoms free). Off in "modern": on MNIST's
                       validation split it cost SGD 3.6% validation MSE and left 16% of latents dead
                       (bench/bench_recipe.py). PAM: docs/DESIGN.md 3.7
    AuxK loss          aux_k, aux_coef, dead_after     0           512, 1/32   Gao et al. 2024 (OpenAI's
                       (TrainConfig)                                           k_aux and coefficient; SAELens
                       uses coefficient 1, k_aux = n_features / 2, dead after 1000 steps; sparsify 1.3.3 has it
                       off by default)
    dead atoms in PAM  keep_dead_atoms (TrainConfig)   False       True        a latent that never fired keeps
                       its previous atom in the decoder solve (an exact minimiser; docs/DESIGN.md 3.6)
    learning rate      lr                              script's    2e-4 / sqrt(n_latents / 2^14)  sparsify
    schedule           lr_schedule, warmup_steps       constant    warm-up then linear decay to 0 (sparsify)
"""
from __future__ import annotations

import math

import torch

RECIPES = ("paper", "modern")
AUX_K = 512            # OpenAI's k_aux (Gao et al. 2024); capped by the number of dead latents
AUX_COEF = 1 / 32      # OpenAI / sparsify auxk_alpha
WARMUP_STEPS = 1000    # sparsify's lr_warmup_steps (capped at a tenth of the run by the training loop)


def library_lr(n_latents: int) -> float:
    """sparsify's default learning rate: 2e-4 / sqrt(n_latents / 2^14) (1.6e-3 at 256 latents)."""
    return 2e-4 / math.sqrt(n_latents / 2 ** 14)


def recipe_settings(recipe: str, n_latents: int, paper_lr: float) -> dict:
    """The recipe's settings: ``init`` (an SAE argument) and TrainConfig fields, ``lr`` included."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; accepted: {', '.join(RECIPES)}")
    if recipe == "paper":
        return dict(init="paper", b_dec_init="zero", centre_input=False, unit_norm_atoms=False, aux_k=0,
                    keep_dead_atoms=False, lr=paper_lr, lr_schedule="constant")
    return dict(init="transpose_unit", b_dec_init="mean", centre_input=True, unit_norm_atoms=False, aux_k=AUX_K,
                aux_coef=AUX_COEF, keep_dead_atoms=True, lr=library_lr(n_latents), lr_schedule="warmup_decay",
                warmup_steps=WARMUP_STEPS)


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising sum_r ||x_r - m|| (Weiszfeld's iteration from the mean, float64), (n_features,)."""
    x64 = x.double()
    m = x64.mean(0)
    for _ in range(iters):
        dist = (x64 - m).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x64).sum(0) / w.sum()
        if float((new - m).norm()) <= tol * (1.0 + float(m.norm())):
            return new
        m = new
    return m


def centre_of(x: torch.Tensor, how: str) -> torch.Tensor:
    """The training data's mean or geometric median (``b_dec_init``), float64 (n_features,)."""
    if how == "mean":
        return x.double().mean(0)
    if how == "median":
        return geometric_median(x)
    raise ValueError(f"centre_of: how must be 'mean' or 'median', got {how!r}")
