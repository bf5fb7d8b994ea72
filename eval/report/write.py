"""Write a report: report.md, report.csv and the figures, into a sweep's directory or the one given."""

from __future__ import annotations

from pathlib import Path

from eval.report.figures import draw_figures
from eval.report.jobs import read_jobs
from eval.report.table import build_table, to_csv, to_markdown
from trainer.base.atomic_files import atomic_write_bytes

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"


def write_report(paths: list[Path], out_dir: Path, baseline: str | None = None, title: str | None = None,
                 ) -> list[Path]:
    """Compare the runs `paths` name (run directories, or sweep directories for their jobs); returns the files
    written into out_dir, report.md first. A job that failed or was refused is a row that says so."""
    table = build_table(read_jobs(paths), baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(table, out_dir)
    title = title or f"Comparison of {len(table.jobs)} run{'s' if len(table.jobs) != 1 else ''}"
    markdown = to_markdown(table, title, [path.relative_to(out_dir).as_posix() for path in figures])
    # Atomic: a report being rewritten while someone reads it (after each job of a sweep) is never half a file.
    atomic_write_bytes(out_dir / REPORT_MD, markdown.encode("utf-8"))
    atomic_write_bytes(out_dir / REPORT_CSV, to_csv(table).encode("utf-8"))
    return [out_dir / REPORT_MD, out_dir / REPORT_CSV, *figures]
