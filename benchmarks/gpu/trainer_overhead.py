"""Claim: on a GPU too, the trainer's loop costs almost nothing over a bare PyTorch loop. Target: ratio >= 0.95.

benchmarks/trainer_overhead.py (its docstring says how the two loops are compared) at a size where a GPU step
is short enough for per-step Python work to show: GPT-2 small (12 x 768) on 8 x 1024-token blocks a step, bf16
autocast, logging every step. On a CPU the model's compute hides the loop; on a GPU it is tens of milliseconds.

    python benchmarks/gpu/trainer_overhead.py [--steps 30] [--warmup 5] [--trials 2] [--dry-run]

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
import torch
import trainer_overhead as overhead  # benchmarks/trainer_overhead.py: the CPU claim's two loops

from trainer.config.validate import compose_config

GPU = ["hardware=cuda", "model=dense", "model.n_layer=12", "model.n_embd=768", "model.n_head=12",
       "model.n_positions=1024", "data.block_size=1024", "data.size_mb=2", "train.batch_size=8",
       "train.grad_accum_steps=1", "train.log_every=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: a dry run instead", file=sys.stderr)
        cfg = compose_config(GPU)  # the overrides still compose and validate
        print(f"would time the trainer against a bare loop, {args.trials} trials of {args.steps} steps "
              f"({args.warmup} warmup): {cfg.model.family} {cfg.model.n_layer} x {cfg.model.n_embd}, "
              f"{cfg.train.batch_size} x {cfg.data.block_size} tokens a step, {cfg.hardware.precision} on "
              f"{cfg.hardware.device}")
        common.emit({"dry_run": True, "overrides": GPU, "target": overhead.TARGET})
        return
    result = overhead.measure(args.steps, args.warmup, args.trials, GPU)
    common.emit({**result, **common.device_info()})


if __name__ == "__main__":
    main()
