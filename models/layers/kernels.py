"""What the layers' choices of GPU kernel share: the GPU's compute capability (asked once per device) and a log line
that names a choice once per process, since every layer of every forward chooses again."""

from __future__ import annotations

import logging
from functools import cache

import torch


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of the CUDA device a tensor lives on."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_said: set[str] = set()


def say_once(logger: logging.Logger, level: int, message: str) -> None:
    """Log `message` the first time it comes up in this process, never again."""
    if message not in _said:
        _said.add(message)
        logger.log(level, message)
