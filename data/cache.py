"""Content-keyed files under `data.cache_dir`, written so a crash or a second rank never leaves half a file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


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


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success move it into place in one os.replace."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by other users' runs
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
