"""Do experts specialise by domain? The mutual information between a token's domain and its expert.

From one MoE layer's expert fractions per domain at an eval, p(e|d), with every domain weighted alike: the eval
holds about as many tokens per domain, and equal weights put the ceiling at log(D), whatever the token counts:

    p(e)             = mean_d p(e|d)
    I(domain; expert) = mean_d sum_e p(e|d) log(p(e|d) / p(e))      nats

0 when every domain routes alike; log(D) when no two domains share an expert (possible once there are at least as
many experts as domains, so the normalised form divides by log(min(D, E))).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _table(shares_by_domain: Mapping[str, Sequence[float]]) -> np.ndarray:
    """[domains x experts], each row a distribution (a top-k layer's fractions already sum to 1)."""
    table = np.array([list(shares) for shares in shares_by_domain.values()], dtype=np.float64)
    totals = table.sum(axis=1, keepdims=True)
    return np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)


def domain_expert_information(shares_by_domain: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """(I(domain; expert) in nats, normalised to [0, 1]); (0, 0) with fewer than two domains."""
    table = _table(shares_by_domain)
    domains, experts = table.shape if table.ndim == 2 else (0, 0)
    if domains < 2 or experts < 2:
        return 0.0, 0.0
    marginal = table.mean(axis=0)
    ratio = np.divide(table, marginal, out=np.ones_like(table), where=table > 0)
    information = max(0.0, float((table * np.log(ratio)).sum(axis=1).mean()))  # clamp float noise below 0
    return information, information / math.log(min(domains, experts))


def domain_shares_per_expert(shares_by_domain: Mapping[str, Sequence[float]]) -> np.ndarray:
    """[experts x domains]: p(d|e) under equal domain weights, the share of each expert's tokens from each domain
    (a row of zeros for an expert no domain used)."""
    table = _table(shares_by_domain).T
    totals = table.sum(axis=1, keepdims=True)
    return np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
