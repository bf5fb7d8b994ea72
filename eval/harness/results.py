"""What a harness run leaves: lm-eval's results JSON (at --output and under <run>/eval/) and a printed table."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from trainer.base.atomic_files import atomic_write_bytes

STDERR_SUFFIX = "_stderr"


def results_json(results: dict) -> bytes:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False).encode("utf-8")


def write_results(results: dict, snapshot: Path, output: Path | None) -> list[Path]:
    """The JSON beside the run (eval/lm_eval-<snapshot>-<time>.json, never overwritten) and at `output`."""
    blob = results_json(results)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = snapshot.name.removesuffix(snapshot.suffix)
    paths = [snapshot.parent / "eval" / f"lm_eval-{stem}-{stamp}.json"]
    if output is not None:
        paths.append(output)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
    return paths


def table_rows(results: dict) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric[,filter], value, stderr, n) for every score lm-eval reported, tasks and groups alike."""
    rows = []
    counts = results.get("n-samples", {})
    for task, scores in results.get("results", {}).items():
        n = counts.get(task, {}).get("effective")
        metrics = results.get("higher_is_better", {}).get(task)  # leaves out bookkeeping such as sample_len
        for key, value in scores.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, flt = key.partition(",")
            if metric.endswith(STDERR_SUFFIX) or (metrics is not None and metric not in metrics):
                continue
            stderr = scores.get(f"{metric}{STDERR_SUFFIX},{flt}" if flt else f"{metric}{STDERR_SUFFIX}")
            name = metric if flt in ("", "none") else f"{metric} ({flt})"
            rows.append((task, name, float(value), _number(stderr), n))
    return rows


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def format_table(rows: list[tuple[str, str, float, float | None, int | None]]) -> str:
    header = ("task", "metric", "value", "stderr", "n")
    cells = [header] + [(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                         "" if n is None else str(n)) for task, metric, value, stderr, n in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
