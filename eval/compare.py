"""Compare runs: one table and its curves for a sweep's jobs, or for any runs you name.

    python -m eval.compare outputs/multirun/2026-12-02_10-00-00             # a sweep: the report goes into it
    python -m eval.compare outputs/multirun/2026-12-02_10-00-00 --baseline 0_dense
    python -m eval.compare outputs/dense outputs/moe-main --output outputs/compare   # runs from separate launches

Writes report.md, report.csv, eval_loss.png, train_loss.png and (for routed runs) routing.png. Every --multirun
sweep writes the same into its directory after each job (eval/report/sweep_callback.py); this redraws it, or
compares runs that no one sweep holds. A sweep directory's report goes into it; the report on several
directories goes into --output (by default `comparison/` beside the runs). The baseline is --baseline (a job's
name or sweep job number), else the first job with an eval loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eval.report.jobs import find_runs, is_run_dir
from eval.report.write import write_report
from trainer.base.errors import UserError

DEFAULT_OUTPUT = "comparison"


def default_output(paths: list[Path]) -> Path:
    """A sweep directory given alone holds its own report; otherwise `comparison/` beside the compared runs."""
    if len(paths) == 1 and not is_run_dir(paths[0]):
        return paths[0]
    runs = [run.resolve() for run in find_runs(paths)]
    return Path(os.path.commonpath([run.parent for run in runs])) / DEFAULT_OUTPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep directory, or run directories (or several)")
    parser.add_argument("--baseline", help="the job the others are compared with: its name (0_dense, or dense) or "
                                           "sweep job number; default: the first job with an eval loss")
    parser.add_argument("--output", type=Path, help="where the report goes (default: the sweep directory given, "
                                                    f"else {DEFAULT_OUTPUT}/ beside the runs)")
    args = parser.parse_args(argv)
    try:
        for path in args.paths:
            if not path.exists():
                raise UserError(f"{path} does not exist; pass a sweep directory (outputs/multirun/<date>_<time>) "
                                "or run directories")
        out_dir = args.output or default_output(args.paths)
        title = f"Sweep report: {out_dir.name}" if out_dir == args.paths[0] else None
        written = write_report(args.paths, out_dir, baseline=args.baseline, title=title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written[0].read_text(encoding="utf-8"))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
