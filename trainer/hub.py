"""Fast answers to "can this machine reach the Hugging Face Hub?", so offline runs fail in seconds, not minutes."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

from trainer.schema import UserError

HUB_HOST = "huggingface.co"


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_hub(key: str, value: str, alternative: str) -> None:
    """Raise a one-line UserError unless the hub is reachable. `alternative` says what works offline."""
    if not hub_reachable():
        raise UserError(f"{key}={value!r} needs the Hugging Face Hub, which is not reachable from this machine; "
                        f"{alternative}")
