"""The sweep report at the end of every --multirun sweep: a Hydra callback, configured in conf/config.yaml.

It rewrites <sweep dir>/report.md (and .csv and the figures) after each job, so a long sweep's report grows as
its jobs finish, and a sweep that stops part-way still has one:
- a failed or refused job still ends (Hydra catches its exception and calls on_job_end): it is a row;
- Hydra then skips on_multirun_end, so each job's own update is what the report relies on;
- a job stopped by SIGTERM or Ctrl-C ends the sweep process without on_job_end (the sweep must not go on), so
  the report is written once more as the process exits.
A sweep re-launched into its directory with run.resume=auto rewrites it. Disable with ~hydra.callbacks.sweep_report;
set the baseline with hydra.callbacks.sweep_report.baseline=<job>. Imports stay inside the methods: Hydra builds
its callbacks for every launch, and a launch must not pay for matplotlib.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


def _trains(config: Any) -> bool:
    return config.get("run", {}).get("task", "train") == "train" and int(os.environ.get("RANK", 0)) == 0


class SweepReport(Callback):
    def __init__(self, baseline: str | int | None = None) -> None:
        self.baseline = None if baseline is None else str(baseline)
        self._unreported: Path | None = None  # the sweep whose running job has not been reported yet

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        atexit.register(self._report_unfinished)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN and _trains(config):
            self._unreported = Path(config.hydra.sweep.dir)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if self._unreported is not None:
            self.write(self._unreported)

    def _report_unfinished(self) -> None:
        if self._unreported is not None:
            self.write(self._unreported)

    def write(self, sweep_dir: Path) -> None:
        self._unreported = None
        try:
            from eval.report.write import write_report

            written = write_report([sweep_dir], sweep_dir, baseline=self.baseline,
                                   title=f"Sweep report: {sweep_dir.name}")
        except Exception as err:  # a report must never fail the sweep it reports on
            log.warning("sweep report not written (%s: %s); write it with: python -m eval.compare %s",
                        type(err).__name__, err, sweep_dir)
            return
        log.info("sweep report: %s", written[0])
