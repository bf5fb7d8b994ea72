"""The benchmark scripts still run end to end and keep their output contract: the last line of output is one
JSON object carrying the ratios their claims are about.

Tiny sizes and one repetition, so the numbers mean nothing here and are only checked to be finite and
positive; the timing claims themselves are measured by running the scripts, never asserted in tests.
`benchmarks/data_pipeline.py` is left out: even at its smallest it tokenizes ~6M tokens twice (~75 s).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "harness_throughput.py": (["--questions", "2", "--trials", "1", "--layers", "2", "--width", "32"],
                              ["speedup_vs_hflm", "greedy_agreement"]),
    "moe_layer.py": (["--reps", "1", "--warmup", "0", "--tokens", "64"],
                     ["time_vs_dense_top1", "time_vs_dense_top2", "speedup_vs_loop_top1"]),
    "polyglu_ffn.py": (["--reps", "1", "--warmup", "0", "--tokens", "16"],
                       ["speedup_vs_reference", "memory_vs_reference", "time_vs_swiglu"]),
    "sft_throughput.py": (["--steps", "2", "--warmup", "1", "--trials", "1"],
                          ["sft_vs_pretrain", "sft_vs_pretrain_unmasked", "packing_efficiency"]),
    "trainer_overhead.py": (["--steps", "3", "--warmup", "1", "--trials", "1"], ["ratio"]),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_ends_with_its_json_line(script):
    args, ratio_keys = CASES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ratio_keys:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert "target" in result or "targets" in result  # the claim travels with the number
