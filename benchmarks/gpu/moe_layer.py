"""Claim: on a GPU, one MoE layer costs what its active compute says: time_vs_dense_top1 <= 1.10 and
time_vs_dense_top2 <= 2.10 (top-2 does twice a dense layer's FLOPs).

benchmarks/moe_layer.py's measurement (its docstring says what is compared) on CUDA: GPT-2 small sizes (768 /
3072, 8 experts), 8,192 tokens, forward+backward under bf16 autocast as the trainer runs it, the experts on
torch._grouped_mm. The sorted-slice dispatch (the CPU path) and the per-expert loop run beside it, so the JSON
also says what grouped GEMMs buy over each.

    python benchmarks/gpu/moe_layer.py [--tokens 8192] [--reps 20] [--warmup 5] [--dry-run]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common
import moe_layer  # benchmarks/moe_layer.py: the CPU claim's measurement
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        print(f"would time one MoE layer ({moe_layer.D_MODEL} / {moe_layer.D_FF}, {moe_layer.EXPERTS} experts, "
              f"top-1 and top-2) against a dense MLP on {args.tokens} tokens, bf16 on CUDA: {args.warmup} warmup + "
              f"{args.reps} interleaved repetitions of dense, grouped_mm, sorted slices and the per-expert loop")
        common.emit({"dry_run": True, "tokens": args.tokens, "targets": moe_layer.GPU_TARGETS})
        return
    result = moe_layer.measure(args.tokens, args.reps, args.warmup, device="cuda", precision="bf16",
                               with_sorted=True)
    common.emit({**result, **common.device_info(), "targets": moe_layer.GPU_TARGETS})


if __name__ == "__main__":
    main()
