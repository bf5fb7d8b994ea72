"""What every GPU benchmark here shares: the repository on sys.path, the device's name, its measured bf16 matmul
peak (the denominator of MFU), and timing that waits for the GPU. Imported by the scripts next to it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

# Dense bf16 peak (TFLOP/s, no sparsity) of the GPUs this check is meant for, for a second MFU beside the one
# against the measured matmul peak. The measured one is the headline: it is what this GPU, at its clocks and
# power limit, reaches on a large square matmul (an H200 measured about 790 of its nominal 989).
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def device_info() -> dict:
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def nominal_tflops(name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def measure_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """bf16 TFLOP/s of an n x n x n matmul, the best of `reps` after a warmup."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        seconds = timed(lambda: a @ b)
        best = min(best, seconds)
    return 2 * n**3 / best / 1e12


def timed(fn) -> float:
    """Seconds `fn` keeps the GPU busy (host and device synchronised before and after; on a machine without one,
    plain wall time, so the scripts' logic can be tested on CPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def emit(result: dict) -> None:
    """The contract of every benchmark: the last line of output is one JSON object."""
    print(json.dumps(result), flush=True)
