"""The train/test split of a data set's rows and its standardisation with the training statistics only
(docs/DESIGN.md, 9.3).

One seeded permutation, :func:`split_order`, orders the rows: its first ``n_test = round(test_fraction * n)``
positions are the test rows, the rest the training rows in that order, of which ``n_train`` (0: all) are kept.
The same permutation orders E3's extraction (``activations.load_activations(order_seed=...)``), so the rows a
split needs are a prefix of it: the test rows, then the first ``n_train`` training rows. A folder of shards
(``common.infra.stream.Stream``) is split and standardised the same way, by streaming.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .stream import Stream


def split_order(n: int, seed: int) -> torch.Tensor:
    """The seeded permutation of ``n`` rows that the split takes its test rows, then its training rows, from."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def split_sizes(n: int, test_fraction: float = 0.1, n_train: int = 0) -> tuple[int, int]:
    """(n_test, training rows kept) of the split of ``n`` rows: ``n_test = round(test_fraction * n)``, and
    ``n_train`` of the ``n - n_test`` training rows (0: all). ValueError naming the argument that leaves a split
    empty or asks for more training rows than there are."""
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction={test_fraction!r}: expected a float in (0, 1)")
    n_test = int(round(test_fraction * n))
    if not 1 <= n_test < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} samples leaves an empty train or test set")
    if not (isinstance(n_train, int) and 0 <= n_train <= n - n_test):
        raise ValueError(f"n_train={n_train!r}: expected an int in 0..{n - n_test} (the training rows of {n} "
                         f"samples at test_fraction={test_fraction}; 0: all of them)")
    return n_test, n_train or n - n_test


def split_rows(n: int, test_fraction: float = 0.1, seed: int = 0,
               n_train: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, test rows) of :func:`split_standardise`'s split of ``n`` rows, in the order it takes them:
    ``order = split_order(n, seed)``, its first ``n_test`` positions for the test, the next ``n_train`` (0: all the
    rest) for training. With token rule ``last`` a row is a text: the test rows are the held-out texts
    (``common/maths/lm_eval.py``)."""
    n_test, n_train = split_sizes(n, test_fraction, n_train)
    order = split_order(n, seed)
    return order[n_test:n_test + n_train], order[:n_test]


def standardisation(mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, list[int]]:
    """The per-feature divisor of the z-scores, and the features that are not scaled (docs/DESIGN.md, 9.3).

    ``mean``, ``std``: the training rows' float64 mean and population std. A feature whose std is at most
    ``eps * max(1, |mean|)`` is constant on the training rows (up to rounding at its magnitude): it is centred
    and not scaled (divisor 1), so rounding noise is never blown up into unit variance. Returns (float64 divisor,
    indices of the constant features)."""
    constant = std <= eps * mean.abs().clamp(min=1.0)
    return torch.where(constant, torch.ones_like(std), std), torch.nonzero(constant).flatten().tolist()


def report_constant(constant: list[int], n_features: int) -> None:
    """Say which features are constant on the training rows (centred, not scaled), on stderr."""
    if constant:
        shown = ", ".join(map(str, constant[:20])) + (f" and {len(constant) - 20} more" if len(constant) > 20 else "")
        print(f"standardisation: {len(constant)} of {n_features} features are constant on the training rows "
              f"(std <= eps max(1, |mean|)): centred, not scaled: {shown}", file=sys.stderr)


def standardise(train: torch.Tensor, test: torch.Tensor, eps: float = 1e-8, info: dict | None = None):
    """Per-feature z-scores of ``train`` and ``test`` with the mean and std of the ``train`` rows alone.

    Returns (train, test, mean, std). The moments (population std) and the z-scores ``(x - mean) / std`` are
    computed in float64 and returned in the rows' dtype (so data near the float32 range, or a constant column far
    from 0, are standardised exactly; docs/DESIGN.md, 9.3). A feature with std <= ``eps * max(1, |mean|)`` is
    constant: centred, not scaled (its returned std is 1); such features are printed on stderr and listed in
    ``info["constant_features"]`` when ``info`` (a dict) is given."""
    dtype = train.dtype
    train, test = train.double(), test.double()
    mean = train.mean(0)
    std, constant = standardisation(mean, train.std(0, unbiased=False), eps)
    report_constant(constant, train.shape[1])
    if info is not None:
        info["constant_features"] = constant
    return ((train - mean) / std).to(dtype), ((test - mean) / std).to(dtype), mean.to(dtype), std.to(dtype)


def split_standardise(X: torch.Tensor, test_fraction: float = 0.1, seed: int = 0, eps: float = 1e-8,
                      info: dict | None = None, n_train: int = 0):
    """Random train/test split (:func:`split_rows`), then :func:`standardise` with the statistics of the
    training rows kept: the first ``n_train`` of them (0: all).

    X (N, n_features) -> (train (n_train or N - n_test, n_features), test (n_test, n_features), mean (n_features,),
    std (n_features,)), n_test = round(test_fraction * N), in X's dtype.
    ``X`` may be a ``common.infra.stream.Stream`` (a folder of shards): the same split and statistics, by streaming
    (:func:`_split_standardise_stream`; the splits are then views, standardised as they are read).
    """
    if isinstance(X, Stream):
        return _split_standardise_stream(X, test_fraction, seed, eps, info, n_train)
    train_rows, test_rows = split_rows(X.shape[0], test_fraction, seed, n_train)
    return standardise(X[train_rows], X[test_rows], eps, info)


def _moments(blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and population std of the rows of float64 arrays ``blocks``, accumulated in float64 by
    merging block moments (Chan et al.), float64 (n_features,)."""
    n, mean, m2 = 0, 0.0, 0.0
    for x in blocks:
        nb = x.shape[0]
        if nb == 0:
            continue
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        delta = mb - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta ** 2 * (n * nb / total)
        n = total
    return torch.from_numpy(mean), torch.from_numpy(np.sqrt(m2 / n))


def _split_standardise_stream(X: Stream, test_fraction: float = 0.1, seed: int = 0, eps: float = 1e-8,
                              info: dict | None = None, n_train: int = 0):
    """:func:`split_standardise` for a folder of shards, by streaming.

    The same split (:func:`split_rows`: the first ``n_test`` positions of ``split_order(N, seed)`` are the
    test rows, the next ``n_train`` (0: all the rest) the training rows, each view in that order) and the same
    standardisation (the kept training rows' mean and population std accumulated in float64 in one pass, which also
    checks every row finite; constant features centred, not scaled: :func:`standardisation`); the views
    standardise in float64 as they read and deliver the data's dtype. Returns (train view, test view, mean, std),
    mean and std in the data's dtype; nothing else is read.
    """
    train_rows, test_rows = split_rows(len(X), test_fraction, seed, n_train)
    train, test = X[train_rows.numpy()], X[test_rows.numpy()]
    if X.root.get("checked"):  # the folder was checked before: read the training rows only
        mean, std = _moments(x for _, x in train.scan())
    else:  # one pass over the folder: every row checked finite, the training rows' moments (with multiplicity)
        weight = np.bincount(train.source_rows(), minlength=int(X.offsets[-1]))
        mean, std = _moments(x[np.repeat(np.arange(len(src)), weight[src])] for src, x in X.checked_scan())
    std, constant = standardisation(mean, std, eps)
    report_constant(constant, X.n_features)
    if info is not None:
        info["constant_features"] = constant
    return train.standardised(mean, std), test.standardised(mean, std), mean.to(X.dtype), std.to(X.dtype)
