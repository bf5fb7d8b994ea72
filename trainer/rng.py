"""Seeding and RNG state capture, so a resumed run draws exactly the numbers the uninterrupted run would.

Captured states are made of tensors, ints, floats, strings, lists and tuples only: checkpoints are read
back with `torch.load(weights_only=True)`, which refuses numpy arrays and arbitrary Python objects.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

RNG_KEYS = ("python_random_state", "numpy_random_state", "torch_rng_state", "cuda_rng_state_if_available")


def seed_everything(seed: int) -> None:
    # run.seed may be any integer (the data streams fold it the same way); numpy's legacy seeding takes only
    # [0, 2**32) and torch's [-2**63, 2**64), so fold into those ranges rather than fail after data preparation.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed % 2**64)


def use_deterministic_kernels() -> None:
    """hardware.deterministic: kernels that give the same bits on every run. cuBLAS reads its workspace setting when
    its first handle is made, so this runs before the model meets the GPU.

    warn_only: an op without a deterministic kernel warns (once) rather than stopping a run. In that mode
    PyTorch keeps the memory-efficient and cuDNN attention backwards nondeterministic (atomics over key blocks),
    so SDPA is held to its math and flash kernels: fp32 attention (what an exact-resume check runs) is then
    deterministic; bf16's flash backward is deterministic only in PyTorch's strict mode, which other ops here
    (index_copy, multi-dimensional scatter) would refuse."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("hardware.deterministic=true: deterministic kernels (CUBLAS_WORKSPACE_CONFIG=%s)",
             os.environ["CUBLAS_WORKSPACE_CONFIG"])


def _numpy_state_to_safe(state: tuple) -> dict[str, Any]:
    bit_generator, keys, pos, has_gauss, cached_gaussian = state
    # MT19937 keys are uint32; int64 holds them exactly and is a dtype every torch build can store.
    return {
        "bit_generator": str(bit_generator),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_safe(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]),
            float(state["cached_gaussian"]))


def capture_rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    cuda_states = None
    if torch.cuda.is_available():
        cuda_states = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python_random_state": (int(version), tuple(int(x) for x in internal), gauss_next),
        "numpy_random_state": _numpy_state_to_safe(np.random.get_state()),
        "torch_rng_state": torch.get_rng_state().clone(),
        "cuda_rng_state_if_available": cuda_states,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python_random_state"]
    # random.setstate insists on a tuple; a round trip through other serialisers may yield lists.
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    np.random.set_state(_numpy_state_from_safe(state["numpy_random_state"]))
    torch.set_rng_state(state["torch_rng_state"].cpu())

    cuda_states = state.get("cuda_rng_state_if_available")
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint carries CUDA RNG states but CUDA is unavailable here; GPU random streams "
                    "are not restored, so dropout draws will differ from the original run")
        return
    available = torch.cuda.device_count()
    if len(cuda_states) != available:
        log.warning("checkpoint carries %d CUDA RNG states but %d devices are visible; restoring the first %d",
                    len(cuda_states), available, min(len(cuda_states), available))
    for device_index, device_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(device_state.cpu(), device_index)
