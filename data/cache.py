"""Content-keyed files under `data.cache_dir`, written so a crash or a second rank never leaves half a file."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from trainer.base.atomic_files import atomic_path


def digest(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (tuples and lists hash alike)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def text_digest(texts: list[str], *extra: Any) -> str:
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(data)
    return h.hexdigest()[:20]


def save_array(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_array(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def save_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
