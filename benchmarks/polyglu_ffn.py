"""Claim: the fused PolyGLU FFN is cheaper than the stacked reference and close to a SwiGLU of the same size.

At d=1024, d_ff=4096, 2 x 512 tokens, fp32 on CPU, mean pool, training mode, forward+backward of
  (a) `PolyGLU` (custom autograd mixing: no [B, T, d_ff, K] stack, derivatives recomputed from h),
  (b) `stacked_reference` on the same module (stack of the 4 activations, plain autograd),
  (c) `SwiGLU` of the same d/d_ff (the floor: PolyGLU adds 3 activations and a tiny routing net to it).
Targets: speedup_vs_reference >= 1.5, memory_vs_reference <= 0.6, time_vs_swiglu <= 1.25.

Time: repetitions interleave the variants, reversing their order every other repetition so drift on a shared
machine hits all alike; each variant reports the median over repetitions after warmups. Parameter gradients
are reset to None before each step, as a trainer's zero_grad does.

Memory: bytes of the distinct tensors autograd saves for backward during the forward (counted through
torch.autograd.graph.saved_tensors_hooks, each storage once, parameters and the input excluded). That is the
activation memory the claim is about, it is exact and deterministic, and CPU PyTorch has no allocator
statistics to read a true peak from. ru_maxrss is reported too (per variant, in a fresh subprocess) as a coarse
cross-check of the whole-process peak, weights and all.

    python benchmarks/polyglu_ffn.py [--reps 7] [--warmup 2] [--tokens 512]

Last line: one JSON object with the ratios, the raw medians (ms) and saved bytes, and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# 2 MB-page CPU allocations (read at torch's first allocation): without them every large tensor is a fresh
# mmap whose 4 KB pages fault in one by one, a cost that would blur the comparison. Applies to all alike.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

from models.polyglu.ffn import PolyGLU, SwiGLU, stacked_reference

D_MODEL, D_FF, BATCH = 1024, 4096, 2
TARGETS = {"speedup_vs_reference": 1.5, "memory_vs_reference": 0.6, "time_vs_swiglu": 1.25}
VARIANTS = ("polyglu", "reference", "swiglu")


def build(tokens: int):
    torch.manual_seed(0)
    poly = PolyGLU(D_MODEL, D_FF, routing_pool="mean").train()
    swi = SwiGLU(D_MODEL, D_FF).train()
    x = torch.randn(BATCH, tokens, D_MODEL)
    steps = {
        "polyglu": (poly, lambda: poly(x)),
        "reference": (poly, lambda: stacked_reference(poly, x)),
        "swiglu": (swi, lambda: swi(x)),
    }
    return x, steps


def step(module, fn) -> None:
    for p in module.parameters():
        p.grad = None
    fn().sum().backward()


def saved_bytes(module, fn, x) -> int:
    """Distinct storages autograd keeps for backward, parameters and the input itself excluded."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    out.sum().backward()
    for p in module.parameters():
        p.grad = None
    return total


def maxrss_child(variant: str, tokens: int) -> None:
    _, steps = build(tokens)
    module, fn = steps[variant]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(module, fn)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_delta_kb": after - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence (batch is 2)")
    ap.add_argument("--maxrss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.maxrss_child:
        maxrss_child(args.maxrss_child, args.tokens)
        return

    # Before this process allocates anything: a child starts with its parent's ru_maxrss (Linux keeps it
    # across fork/exec), so a parent that has already run the benchmark would mask the children's peaks.
    rss = {}
    for v in VARIANTS:
        res = subprocess.run([sys.executable, __file__, "--maxrss-child", v, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rss[v] = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_delta_kb"]

    x, steps = build(args.tokens)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.warmup + args.reps):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for v in order:
            module, fn = steps[v]
            t0 = time.perf_counter()
            step(module, fn)
            dt = (time.perf_counter() - t0) * 1e3
            if rep >= args.warmup:
                times[v].append(dt)
    ms = {v: statistics.median(t) for v, t in times.items()}
    saved = {v: saved_bytes(*steps[v], x) for v in VARIANTS}

    for v in VARIANTS:
        print(f"{v:10s} fwd+bwd {ms[v]:8.1f} ms (min {min(times[v]):.1f})  saved {saved[v] / 2**20:7.1f} MiB  "
              f"maxrss +{rss[v] / 1024:7.1f} MiB")
    result = {
        "speedup_vs_reference": round(ms["reference"] / ms["polyglu"], 3),
        "memory_vs_reference": round(saved["polyglu"] / saved["reference"], 3),
        "time_vs_swiglu": round(ms["polyglu"] / ms["swiglu"], 3),
        "maxrss_vs_reference": round(rss["polyglu"] / rss["reference"], 3) if rss["reference"] > 0 else None,
        "ms": {v: round(t, 2) for v, t in ms.items()},
        "saved_bytes": saved,
        "maxrss_delta_kb": rss,
        "memory_method": "saved_tensors_hooks: distinct saved storages, params and input excluded",
        "shape": {"d_model": D_MODEL, "d_ff": D_FF, "batch": BATCH, "tokens": args.tokens, "dtype": "fp32"},
        "threads": torch.get_num_threads(),
        "targets": TARGETS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
