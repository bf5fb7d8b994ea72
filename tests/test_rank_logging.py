"""Under torchrun, processes other than rank 0 log only errors and their own lines (trainer/rank_logging.py)."""

from __future__ import annotations

import io
import logging

from trainer.rank_logging import EVERY_RANK, quiet_replicas


def logged_by(rank: int) -> str:
    root = logging.getLogger(f"test-rank-{rank}")  # stands in for the root logger Hydra configures
    root.propagate, root.level = False, logging.INFO
    console, log_file = io.StringIO(), io.StringIO()
    for stream in (console, log_file):
        root.addHandler(logging.StreamHandler(stream))
    quiet_replicas(rank, root)
    child = root.getChild("trainer.optim")  # a module's logger: its records propagate to the root's handlers
    child.info("data: 10 train blocks")
    child.warning("resuming with another lr schedule")
    child.warning("SIGTERM received", extra=EVERY_RANK)
    child.error("checkpoint missing")
    assert console.getvalue() == log_file.getvalue(), "both handlers see the same lines, tagged once"
    return console.getvalue()


def test_the_main_process_logs_everything_and_the_others_only_errors_and_their_own_lines():
    assert logged_by(0).splitlines() == ["data: 10 train blocks", "resuming with another lr schedule",
                                         "SIGTERM received", "checkpoint missing"]
    assert logged_by(1).splitlines() == ["[rank 1] SIGTERM received", "[rank 1] checkpoint missing"]
