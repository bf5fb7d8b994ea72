"""Fast answers to "can this machine reach the Hugging Face Hub?", so offline runs fail in seconds, not minutes."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from trainer.base.errors import UserError

HUB_HOST = "huggingface.co"
_FALSE = ("0", "", "false", "no", "off")


def _offline_by_env() -> bool:
    return any(os.environ.get(name, "0").strip().lower() not in _FALSE
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    return urlparse(endpoint).hostname or HUB_HOST


@lru_cache(maxsize=8)
def _probe(host: str, timeout_s: float) -> bool:
    """One TCP connect per host and process: the network's answer is cached, the environment's is not."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False at once when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say so (read on every call), else probe the host."""
    if _offline_by_env():
        return False
    return _probe(_hub_host(), timeout_s)


def require_hub(key: str, value: str, alternative: str, detail: str = "") -> None:
    """Raise a one-line UserError unless the hub is reachable. `alternative` says what works offline;
    `detail` (such as the hub files a generic loader reads) follows the value."""
    if not hub_reachable():
        raise UserError(f"{key}={value!r}{detail} needs the Hugging Face Hub, which is not reachable from this "
                        f"machine; {alternative}")
