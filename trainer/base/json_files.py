"""Strict JSON for the small files people and tools read: summary.json and snapshot sidecars.

Strict JSON has no NaN or Infinity, and jq, JavaScript and many loaders reject them; metrics.jsonl, the
per-step record, keeps them on purpose and is written by trainer.tracking alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _json_default(value: Any) -> Any:
    # Metrics often arrive as 0-dim tensors or numpy scalars; both expose .item().
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, Path) or type(value).__module__ == "torch":  # torch.dtype, torch.device
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite_or_null(obj: Any) -> Any:
    # Strict JSON has no NaN or Infinity, and jq, JavaScript and many loaders reject them: a diverged run's
    # non-finite numbers become null (its stop_reason says what happened). metrics.jsonl keeps them on purpose.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def to_json_bytes(obj: Any) -> bytes:
    """Summary and sidecar JSON: strict (non-finite numbers as null), sorted keys, one trailing newline."""
    # A round trip first, so numbers that arrive as tensors or numpy scalars are checked as well.
    plain = json.loads(json.dumps(obj, default=_json_default))
    return (json.dumps(_finite_or_null(plain), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
