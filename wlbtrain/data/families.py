"""Generated document-length families: the packer's robustness suite beyond the shared samples.

Each family is a seeded function of (number of documents, seed) → lengths [n] (int64, ≥ 1) in
tokens, absolute rather than relative to a context, so the same corpus meets the 64K and 128K
layouts as a real one would. Together they cover what the wlb packer must hold on: a smooth
encyclopedia-like body, tails reaching millions of tokens (split by the stream into full-context
pieces), point masses at a few lengths, two separated modes, nothing long, and nothing short.
"""

from __future__ import annotations

import numpy as np

MAX_LENGTH = 4_000_000  # the longest generated document: a book-sized tail


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    """Encyclopedia-like: median ~1.5K tokens, a smooth right tail into the tens of thousands."""
    rng = np.random.default_rng([seed, 1])
    return _clip(rng.lognormal(np.log(1500), 1.3, n))


def pareto(n: int, seed: int = 0) -> np.ndarray:
    """Heavy tail: Pareto(α = 1.1) above 500 tokens, a few documents reaching millions."""
    rng = np.random.default_rng([seed, 2])
    return _clip(500 * (1 + rng.pareto(1.1, n)))


def spiky(n: int, seed: int = 0) -> np.ndarray:
    """Mostly short documents plus point masses: 2% at 24K, 2% at 60K, 1% at 128K tokens
    (templated reports, truncated crawls, documents pre-cut at a context)."""
    rng = np.random.default_rng([seed, 3])
    lengths = rng.lognormal(np.log(800), 0.8, n)
    kind = rng.random(n)
    lengths[kind < 0.05] = 24_576
    lengths[kind < 0.03] = 61_440
    lengths[kind < 0.01] = 131_072
    return _clip(lengths)


def bimodal(n: int, seed: int = 0) -> np.ndarray:
    """Chat-like short turns (~600 tokens) and long-form documents (~40K), 90 : 10."""
    rng = np.random.default_rng([seed, 4])
    long = rng.random(n) < 0.10
    return _clip(np.where(long, rng.normal(40_000, 10_000, n), rng.lognormal(np.log(600), 0.6, n)))


def all_short(n: int, seed: int = 0) -> np.ndarray:
    """Nothing long: uniform 50 .. 4K tokens (code snippets, tweets, QA pairs)."""
    rng = np.random.default_rng([seed, 5])
    return _clip(rng.uniform(50, 4096, n))


def all_long(n: int, seed: int = 0) -> np.ndarray:
    """Nothing short: 32K .. 512K tokens (books, long code repositories)."""
    rng = np.random.default_rng([seed, 6])
    return _clip(np.exp(rng.uniform(np.log(32_768), np.log(524_288), n)))


def _clip(values) -> np.ndarray:
    return np.clip(np.round(values), 1, MAX_LENGTH).astype(np.int64)


FAMILIES = {"lognormal": lognormal, "pareto": pareto, "spiky": spiky, "bimodal": bimodal,
            "all-short": all_short, "all-long": all_long}
