"""The GPU check's one JSON: every part's result (the last JSON line of its log), the CUDA tests' counts, and each
claim against its target. run.sh calls it last; it writes <out>/gpu_check.json and prints the same object as
its last line.

    python benchmarks/gpu/summarize.py --out DIR [--dry-run] [--wall-s SECONDS]
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# claim -> (part, key in that part's JSON, comparison, target). Restated from the scripts' own targets rather than
# imported: the summary must still be written when a broken install keeps those scripts (torch, hydra, the
# project) from importing. tests/test_gpu_check.py holds the two in agreement.
CLAIMS = {
    "polyglu_600m_mfu": ("polyglu_mfu", "mfu", ">=", 0.40),
    "moe_time_vs_dense_top1": ("moe_layer", "time_vs_dense_top1", "<=", 1.10),
    "moe_time_vs_dense_top2": ("moe_layer", "time_vs_dense_top2", "<=", 2.10),
    "trainer_overhead_ratio": ("trainer_overhead", "ratio", ">=", 0.95),
}
COMPARE = {">=": operator.ge, "<=": operator.le}
PARTS = ("env", "polyglu_mfu", "moe_layer", "trainer_overhead")


def last_json_line(path: Path) -> dict | None:
    """The part's result: the last line of its log that parses as a JSON object (None if it wrote none)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def pytest_counts(junit: Path) -> dict | None:
    if not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def planned_tests(log: Path) -> list[str]:
    """The test ids `pytest --collect-only -q` listed (the dry run's plan)."""
    if not log.is_file():
        return []
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "::" in line]


def claim_results(parts: dict[str, dict | None]) -> dict[str, dict]:
    claims = {}
    for name, (part, key, op, target) in CLAIMS.items():
        value = (parts.get(part) or {}).get(key)
        met = None if not isinstance(value, (int, float)) else bool(COMPARE[op](value, target))
        claims[name] = {"value": value, "target": f"{op} {target}", "met": met}
    return claims


def summarize(out: Path, dry_run: bool, wall_s: float | None) -> dict:
    logs = out / "logs"
    parts = {part: last_json_line(logs / f"{part}.log") for part in PARTS}
    tests = pytest_counts(out / "pytest-cuda.xml")
    claims = claim_results(parts)
    exit_codes = {}
    if (out / "exit_codes.json").is_file():
        exit_codes = json.loads((out / "exit_codes.json").read_text())
    summary = {
        "dry_run": dry_run,
        "claims": claims,
        "cuda_tests": tests,
        "cuda_tests_planned": planned_tests(logs / "tests.log") if dry_run else None,
        "all_claims_met": None if dry_run else all(c["met"] for c in claims.values()),
        "all_tests_passed": None if tests is None else not tests["failed"] and tests["passed"] > 0,
        "exit_codes": exit_codes,
        "wall_s": wall_s,
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--wall-s", type=float, default=None)
    args = parser.parse_args()
    summary = summarize(args.out, args.dry_run, args.wall_s)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
