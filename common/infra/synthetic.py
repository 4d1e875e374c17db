"""Synthetic data with known features: the ground truth of the SAE literature's toy experiments.

Sharkey et al. 2022 ("Taking features out of superposition with sparse autoencoders") and Anthropic's
"Towards Monosemanticity" (2023) draw data as sparse non-negative combinations of a known dictionary, so that
what an SAE learns can be compared with the true features (docs/DESIGN.md, section 10). Here:

    dictionary  n_true unit-norm atoms in n_features dimensions, uniform on the sphere (normalised Gaussians);
                n_true may exceed n_features (superposition)
    firing      feature i (0-based, in rank order) fires with probability p_i = min(1, c (i + 1)^-zipf_exponent),
                c chosen so that sum_i p_i = mean_active (the expected number of active features per sample)
    co-firing   features are cut into consecutive groups of ``group_size``; within a group, whether each fires
                is read from a Gaussian copula: z ~ N(0, S) with S_ii = 1, S_ij = correlation, and feature i
                fires iff z_i < Phi^-1(p_i). Each marginal stays exactly p_i; a positive correlation makes
                features of a group fire together, a negative one apart; groups are independent
    magnitudes  independent of firing, non-negative and heavy-tailed: "exponential" (mean 1) or "lognormal"
                (exp(lognormal_sigma N(0, 1)), median 1)
    data        x = codes @ dictionary + noise_std N(0, I)

Seeded and deterministic: the dictionary depends only on (n_true, n_features, seed); firing, magnitudes and
noise each draw from their own stream of the seed, so changing the noise level leaves the codes unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtri

MAGNITUDES = ("exponential", "lognormal")


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generator draws (module docstring); an invalid value raises ValueError naming it."""

    n_features: int               # dimensions of x
    n_true: int                   # true features (atoms of the dictionary)
    mean_active: float = 5.0      # expected number of active features per sample
    zipf_exponent: float = 1.0    # firing probability of the feature of rank i ~ (i + 1)^-zipf_exponent
    magnitude: str = "exponential"
    lognormal_sigma: float = 1.0  # "lognormal" magnitudes only
    group_size: int = 1           # features co-fire within consecutive groups of this size
    correlation: float = 0.0      # the copula's correlation within a group (group_size >= 2)
    noise_std: float = 0.0        # standard deviation of the additive Gaussian noise per feature

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        def integer(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        need(integer(self.n_features) and self.n_features >= 1,
             f"n_features must be an integer >= 1, got {self.n_features!r}")
        need(integer(self.n_true) and self.n_true >= 1, f"n_true must be an integer >= 1, got {self.n_true!r}")
        need(number(self.mean_active) and 0 < self.mean_active <= self.n_true,
             f"mean_active must be a number in (0, n_true = {self.n_true}], got {self.mean_active!r}")
        need(number(self.zipf_exponent) and self.zipf_exponent >= 0,
             f"zipf_exponent must be a finite number >= 0, got {self.zipf_exponent!r}")
        need(self.magnitude in MAGNITUDES, f"magnitude must be one of {', '.join(MAGNITUDES)}, got {self.magnitude!r}")
        need(number(self.lognormal_sigma) and self.lognormal_sigma > 0,
             f"lognormal_sigma must be a finite number > 0, got {self.lognormal_sigma!r}")
        need(integer(self.group_size) and 1 <= self.group_size <= self.n_true,
             f"group_size must be an integer in [1, n_true = {self.n_true}], got {self.group_size!r}")
        need(number(self.correlation), f"correlation must be a finite number, got {self.correlation!r}")
        if self.group_size == 1:
            need(self.correlation == 0, f"correlation {self.correlation!r} needs group_size >= 2 (features co-fire "
                                        "within groups); with group_size 1 it must be 0")
        else:
            low = -1 / (self.group_size - 1)  # the equicorrelation matrix is positive definite iff low < rho < 1
            need(low < self.correlation < 1, f"correlation must be in ({low:g}, 1) for group_size {self.group_size} "
                                             f"(a positive definite copula), got {self.correlation!r}")
        need(number(self.noise_std) and self.noise_std >= 0,
             f"noise_std must be a finite number >= 0, got {self.noise_std!r}")


@dataclass
class SyntheticData:
    """``x`` (n_samples, n_features) float32, the true ``codes`` (n_samples, n_true) float32 (non-negative),
    the ``dictionary`` (n_true, n_features) float32 with unit-norm rows, and each feature's firing
    probability ``firing_prob`` (n_true,) float64; x = codes @ dictionary + noise."""

    x: torch.Tensor
    codes: torch.Tensor
    dictionary: torch.Tensor
    firing_prob: np.ndarray


def _streams(seed: int) -> dict:
    """Independent generators per part of the draw, from one seed."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    parts = ("dictionary", "firing", "magnitudes", "noise")
    return {p: np.random.default_rng([int(seed), i]) for i, p in enumerate(parts)}


def dictionary(n_true: int, n_features: int, seed: int) -> np.ndarray:
    """``n_true`` atoms uniform on the unit sphere of R^n_features (n_true, n_features), float64."""
    d = _streams(seed)["dictionary"].standard_normal((n_true, n_features))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def firing_probabilities(n_true: int, mean_active: float, zipf_exponent: float) -> np.ndarray:
    """p_i = min(1, c (i + 1)^-zipf_exponent) with sum_i p_i = mean_active (c by bisection), (n_true,)."""
    if not 0 < mean_active <= n_true:
        raise ValueError(f"mean_active must be in (0, n_true = {n_true}], got {mean_active!r}")
    law = np.arange(1, n_true + 1, dtype=np.float64) ** -float(zipf_exponent)
    if mean_active == n_true:
        return np.ones(n_true)
    lo, hi = 0.0, 1.0 / law[-1]   # at hi every p_i is 1: the sum is n_true > mean_active
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(1.0, mid * law).sum() < mean_active:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, hi * law)


def _fires(p: np.ndarray, n_samples: int, group_size: int, correlation: float, rng) -> np.ndarray:
    """Which features fire (n_samples, n_true) bool: feature i iff z_i < Phi^-1(p_i), z Gaussian with
    correlation ``correlation`` within consecutive groups of ``group_size``, independent across groups."""
    z = rng.standard_normal((n_samples, len(p)))
    if group_size > 1 and correlation != 0:
        for start in range(0, len(p), group_size):
            g = min(group_size, len(p) - start)
            if g == 1:
                continue
            cov = np.full((g, g), float(correlation))
            np.fill_diagonal(cov, 1.0)
            z[:, start:start + g] = z[:, start:start + g] @ np.linalg.cholesky(cov).T
    return z < ndtri(p)


def generate(config: SyntheticConfig, n_samples: int, seed: int) -> SyntheticData:
    """``n_samples`` samples of ``config``'s model (module docstring), deterministic in ``seed``."""
    if not isinstance(config, SyntheticConfig):
        raise ValueError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    c = config
    rngs = _streams(seed)
    atoms = dictionary(c.n_true, c.n_features, seed)
    p = firing_probabilities(c.n_true, c.mean_active, c.zipf_exponent)
    fires = _fires(p, n_samples, c.group_size, c.correlation, rngs["firing"])
    if c.magnitude == "exponential":
        mags = rngs["magnitudes"].exponential(1.0, (n_samples, c.n_true))
    else:
        mags = np.exp(c.lognormal_sigma * rngs["magnitudes"].standard_normal((n_samples, c.n_true)))
    codes = np.where(fires, mags, 0.0)
    x = codes @ atoms
    if c.noise_std > 0:
        x += c.noise_std * rngs["noise"].standard_normal(x.shape)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return SyntheticData(as_tensor(x), as_tensor(codes), as_tensor(atoms), p)
