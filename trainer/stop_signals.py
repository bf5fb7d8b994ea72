"""Pre-emption and Ctrl-C: finish the current update, save a checkpoint and stop, instead of dying mid-step.

Schedulers (SLURM, Kubernetes, cloud spot instances) send SIGTERM and kill the job a grace period later.
Python's default is to die on the spot: everything since the last `checkpoint.save_every` is lost, and
there is no summary.json and no W&B finish. While training, SIGTERM and SIGINT only raise a flag; the loop
agrees on it across processes at the next update, saves a full checkpoint and stops, so `run.resume=auto`
continues exactly where the job was stopped.

A second Ctrl-C interrupts at once. A repeated SIGTERM does not: SLURM signals every process of a job
step, so a torchrun worker gets SIGTERM from SLURM and again from torchrun passing it on.
"""

from __future__ import annotations

import logging
import signal
import threading

from trainer.rank_logging import EVERY_RANK

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `received` (the first signal's name)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Python only lets the main thread install handlers; elsewhere (a test harness thread) the
        # default behaviour stays and nothing is ever flagged.
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("%s received: stopping after the current update with a checkpoint "
                        "(press Ctrl-C again to stop at once, without one)", name, extra=EVERY_RANK)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second stop signal ({name}) while stopping")
        else:
            log.warning("%s received again: already stopping after the current update", name, extra=EVERY_RANK)

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process killed by the signal: 128 + its number (143 for SIGTERM).
        A process that only learned of the stop from another rank reports SIGTERM's code."""
        return 128 + int(signal.Signals[self.received] if self.received else signal.SIGTERM)
