"""Under torchrun every process runs the same code and would log the same lines, each once per process.

The main process reports. The others log their errors, and the few lines that are theirs alone (a stop
signal only they received), each tagged with its rank.
"""

from __future__ import annotations

import logging

EVERY_RANK = {"every_rank": True}  # extra= for a line every process logs, not only the main one


class _ReplicaFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not getattr(record, "every_rank", False):
            return False
        if not getattr(record, "rank_tagged", False):  # one record reaches the console and run.log handlers
            record.msg = f"[rank {self.rank}] {record.msg}"
            record.rank_tagged = True
        return True


def quiet_replicas(rank: int, logger: logging.Logger | None = None) -> None:
    """On a process other than rank 0, keep only errors and EVERY_RANK lines on the handlers of `logger`
    (the root logger, where Hydra puts the console and run.log). Handler filters see every record that
    propagates to them, which filters on a logger would not."""
    if rank == 0:
        return
    replica_filter = _ReplicaFilter(rank)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(replica_filter)
