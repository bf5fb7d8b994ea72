"""Per-domain sampling weights that follow a schedule over training (a data curriculum).

The rules for valid points live in data.config.normalise_mix, which config validation calls too.
"""

from __future__ import annotations

from ..config import normalise_mix


class MixSchedule:
    """Piecewise-linear per-domain weights over the fraction of training done.

    Every point is normalised on its own, so a linear blend of two points sums to 1 as well and the
    weights a stream sees never need renormalising (which would bend the line between points).
    """

    def __init__(self, points: list[tuple[float, dict[str, float]]], domains: list[str]):
        self.domains = sorted(set(domains))
        self.points = normalise_mix(points, self.domains)  # the rules config validation applies too

    @staticmethod
    def constant(weights: dict[str, float]) -> MixSchedule:
        return MixSchedule([(0.0, weights)], list(weights))

    def weights_at(self, fraction: float) -> dict[str, float]:
        """Normalised weights at `fraction` of training (clipped to [0, 1]), domains in sorted order."""
        f = min(max(float(fraction), 0.0), 1.0)
        # Last point at or before f; the first point is at 0.0, so there always is one.
        i = max(j for j, (at, _) in enumerate(self.points) if at <= f)
        at, w = self.points[i]
        if i + 1 < len(self.points):
            nxt_at, nxt = self.points[i + 1]
            t = (f - at) / (nxt_at - at)
            w = tuple(a + t * (b - a) for a, b in zip(w, nxt, strict=True))
        return dict(zip(self.domains, w, strict=True))

    def describe(self) -> list[dict]:
        return [{"at": at, "weights": dict(zip(self.domains, w, strict=True))} for at, w in self.points]
