"""Per-domain sampling weights that follow a schedule over training (a data curriculum).

Standard library only, like trainer/schema.py: config checks can build a schedule without importing torch.
"""

from __future__ import annotations

import math
from numbers import Real

from trainer.schema import UserError

KEY = "data.mix"


def _number(value: object) -> bool:
    # bool is an int subclass; `true` as a weight is a YAML slip, not a weight of 1.
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


class MixSchedule:
    """Piecewise-linear per-domain weights over the fraction of training done.

    Every point is normalised on its own, so a linear blend of two points sums to 1 as well and the
    weights a stream sees never need renormalising (which would bend the line between points).
    """

    def __init__(self, points: list[tuple[float, dict[str, float]]], domains: list[str]):
        self.domains = sorted(set(domains))
        if not self.domains:
            raise UserError(f"{KEY} needs at least one domain; list data.domains first")
        if not points:
            raise UserError(f"{KEY} is empty; give at least one point, e.g. [[0.0, {{{self.domains[0]}: 1.0}}]]")
        self.points: list[tuple[float, tuple[float, ...]]] = []
        for i, point in enumerate(points):
            try:
                at, weights = point
            except (TypeError, ValueError):
                raise UserError(f"{KEY}[{i}]={point!r} is not an [at, {{domain: weight}}] pair") from None
            if not _number(at) or not 0.0 <= float(at) <= 1.0:
                raise UserError(f"{KEY}[{i}] at={at!r} must be a fraction of training in [0, 1]")
            at = float(at)
            if i == 0 and at != 0.0:
                raise UserError(f"{KEY}[0] at={at} must be 0.0 so the mix is defined from the first step")
            if self.points and at <= self.points[-1][0]:
                raise UserError(f"{KEY}[{i}] at={at} must be greater than the previous point's "
                                f"at={self.points[-1][0]}; list points in strictly increasing order")
            self.points.append((at, self._normalised(i, weights)))

    def _normalised(self, i: int, weights: object) -> tuple[float, ...]:
        if not isinstance(weights, dict):
            raise UserError(f"{KEY}[{i}] weights={weights!r} must be a mapping {{domain: weight}}")
        missing = [d for d in self.domains if d not in weights]
        if missing:
            raise UserError(f"{KEY}[{i}] has no weight for domain {missing[0]!r}; "
                            f"give one for each of {self.domains} (0 to skip it)")
        extra = sorted(str(d) for d in weights if d not in self.domains)
        if extra:
            raise UserError(f"{KEY}[{i}] names domain {extra[0]!r}, which is not one of {self.domains}")
        for d in self.domains:
            w = weights[d]
            if not _number(w) or float(w) < 0:
                raise UserError(f"{KEY}[{i}].{d}={w!r} must be a finite number >= 0")
        total = sum(float(weights[d]) for d in self.domains)
        if total <= 0:
            raise UserError(f"{KEY}[{i}] weights sum to {total}; at least one domain needs a weight > 0")
        return tuple(float(weights[d]) / total for d in self.domains)

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
