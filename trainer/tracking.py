"""Metric tracking: `metrics.jsonl` in the run directory is the record; W&B mirrors it when it can.

W&B is best effort by design: a missing package, no network, a bad API key or a hung server must cost
at most `tracking.online_timeout_s` at startup and never an exception during training.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from trainer.base.atomic_files import atomic_write_bytes
from trainer.base.errors import one_line
from trainer.base.json_files import to_json_bytes
from trainer.config.schema import TrackingConfig

log = logging.getLogger("trainer.tracking")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_WANDB_URL = "https://api.wandb.ai"
REACHABILITY_TIMEOUT_S = 3.0
# Measured (wandb 0.31): ~0.6 s service start beyond init_timeout, ~2 s teardown after a hung init.
SERVICE_OVERHEAD_S = 3.0
_RESERVED_KEYS = ("step", "time")


def _unreachable_reason(base_url: str, timeout_s: float) -> str | None:
    """None if a TCP connection to the W&B host (or the proxy in front of it) opens within timeout_s.

    The probe runs in a daemon thread because socket timeouts do not cover DNS resolution, which can
    stall far longer on a machine without network.
    """
    parsed = urlparse(base_url)
    scheme = parsed.scheme or "https"
    host = parsed.hostname or "api.wandb.ai"
    port = parsed.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass_environment(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80

    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome["ok"] = ""
        except OSError as err:
            outcome["error"] = f"{host}:{port} unreachable ({err})"

    worker = threading.Thread(target=probe, name="wandb-reachability", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return f"no answer from {host}:{port} within {timeout_s:.1f}s"
    return outcome.get("error")


def wandb_credentials_configured() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL)).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    """"auto" is the seed's contract (try online first) for users who set W&B up, and offline for everyone
    else, so a machine without W&B never waits on a network probe. WANDB_MODE, when set, wins in auto."""
    if configured != "auto":
        return configured
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_credentials_configured() else "offline"


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """One record of metrics.jsonl, or None for a line that is not one: the torn last line of a crashed write."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order (none when it has none); a torn line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [record for line in path.read_text(encoding="utf-8").splitlines()
            if (record := parse_metrics_line(line)) is not None]


class Tracker:
    """Writes one JSON line per `log` call and mirrors it to W&B; `wandb_mode` says what W&B really did.

    `wandb_mode` is "online", "offline", "disabled" (configured off, or a non-zero rank) or
    "unavailable" (wandb could not be imported or initialised; metrics.jsonl is still written).
    `resume_step` continues an interrupted run: lines it logged after that step are dropped so the
    file reads as one uninterrupted run, and the W&B run id stored in the run directory is reused.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        run_name: str,
        config: dict[str, Any],
        enabled: bool = True,
        resume_step: int | None = None,
        group: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_mode = "disabled"
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._run: Any = None
        self._metrics_file = None
        self._wandb_failure_reported = False
        self._skipped_keys: set[str] = set()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_metrics_file(resume_step)
        # Line buffering plus an explicit flush per call: a crash loses at most the line being written.
        self._metrics_file = open(self.metrics_path, "a", buffering=1, encoding="utf-8")
        mode = resolve_wandb_mode(cfg.wandb_mode)
        if mode != "disabled":
            self._start_wandb(cfg, mode, run_name, config, resuming=resume_step is not None, group=group)

    # ------------------------------------------------------------------ metrics.jsonl

    def _prepare_metrics_file(self, resume_step: int | None) -> None:
        if not self.metrics_path.exists():
            return
        if resume_step is None:
            if self.metrics_path.stat().st_size:
                # A fresh run must not append to another run's record, nor silently destroy it.
                kept = self.metrics_path.with_name(f"{METRICS_FILE}.replaced-{int(time.time())}")
                os.replace(self.metrics_path, kept)
                log.warning("fresh run in %s: moved the existing %s to %s", self.run_dir, METRICS_FILE, kept.name)
            return
        original = self.metrics_path.read_text(encoding="utf-8")
        kept_lines = [line for line in original.splitlines()
                      if (record := parse_metrics_line(line)) is not None and record["step"] <= resume_step]
        trimmed = "".join(f"{line}\n" for line in kept_lines)
        if trimmed != original:
            atomic_write_bytes(self.metrics_path, trimmed.encode("utf-8"))
            log.info("resuming at step %d: dropped %d metrics lines logged after it",
                     resume_step, len(original.splitlines()) - len(kept_lines))

    def _clean(self, metrics: dict[str, Any]) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in _RESERVED_KEYS:
                self._warn_skipped(key, "the name is reserved for the record's own field")
                continue
            if isinstance(value, str):
                clean[key] = value
                continue
            try:
                clean[key] = float(value)  # 0-dim tensors and numpy scalars convert here
            except (TypeError, ValueError, RuntimeError):
                self._warn_skipped(key, f"a {type(value).__name__} is not a number")
        return clean

    def _warn_skipped(self, key: str, why: str) -> None:
        if key not in self._skipped_keys:
            self._skipped_keys.add(key)
            log.warning("metric '%s' not logged: %s", key, why)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._metrics_file is None:
            return
        clean = self._clean(metrics)
        record = {"step": int(step), "time": time.time(), **clean}
        self._metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
        self._metrics_file.flush()
        if self._run is not None:
            try:
                self._run.log(clean, step=int(step))
            except Exception as err:
                self._report_wandb_failure("log", err)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        atomic_write_bytes(self.summary_path, to_json_bytes(summary))
        if self._run is not None:
            try:
                json_safe = json.loads(to_json_bytes(summary))
                self._run.summary.update(json_safe)
            except Exception as err:
                self._report_wandb_failure("summary", err)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
            self._metrics_file.close()
            self._metrics_file = None
        if self._run is not None:
            run, self._run = self._run, None
            try:
                run.finish()
            except Exception as err:
                self._report_wandb_failure("finish", err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ W&B

    def _report_wandb_failure(self, action: str, err: BaseException) -> None:
        if not self._wandb_failure_reported:
            self._wandb_failure_reported = True
            log.warning("W&B %s failed (%s); further W&B errors are not reported, metrics.jsonl is complete",
                        action, one_line(err, with_type=True))

    def _run_id(self, resuming: bool) -> str:
        id_path = self.run_dir / RUN_ID_FILE
        if resuming and id_path.is_file():
            stored = id_path.read_text(encoding="utf-8").strip()
            if stored:
                return stored
        run_id = secrets.token_hex(4)
        atomic_write_bytes(id_path, f"{run_id}\n".encode())
        return run_id

    def _start_wandb(self, cfg: TrackingConfig, mode: str, run_name: str, config: dict[str, Any],
                     resuming: bool, group: str | None = None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        # Importing wandb takes about a second; it counts against the online budget too.
        deadline = time.monotonic() + cfg.online_timeout_s
        try:
            import wandb
        except Exception as err:
            self.wandb_mode = "unavailable"
            log.warning("wandb could not be imported (%s); metrics go to %s only", one_line(err, with_type=True),
                        METRICS_FILE)
            return
        common = {
            "project": cfg.wandb_project,
            "entity": cfg.wandb_entity,
            "name": run_name,
            "group": group,
            "config": config,
            "id": self._run_id(resuming),
            "resume": "allow",
            "dir": str(self.run_dir),
        }
        if mode == "online":
            failure = self._init_online(wandb, common, deadline, cfg.online_timeout_s)
            if failure is None:
                return
            log.warning("W&B online init failed (%s); logging to W&B offline instead (upload later with "
                        "`wandb sync %s`)", failure, self.run_dir / "wandb")
        try:
            self._adopt(wandb.init(mode="offline", **common))
        except Exception as err:
            _discard_wandb_service(wandb)
            self.wandb_mode = "unavailable"
            log.warning("W&B offline init failed (%s); metrics go to %s only", one_line(err, with_type=True),
                        METRICS_FILE)

    def _init_online(self, wandb: Any, common: dict[str, Any], deadline: float, budget_s: float) -> str | None:
        """Try an online run before `deadline`; returns None on success, else why it failed."""
        # At most a third of the budget on the probe leaves the rest for the init handshake itself.
        probe_timeout = min(REACHABILITY_TIMEOUT_S, budget_s / 3)
        reason = _unreachable_reason(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL), probe_timeout)
        if reason:
            return reason
        # wandb overruns init_timeout by the service start-up, and a failed init costs a service
        # shutdown (see _discard_wandb_service); both must fit inside the budget.
        init_timeout = deadline - time.monotonic() - SERVICE_OVERHEAD_S
        if init_timeout < 1.0:
            return f"tracking.online_timeout_s={budget_s} leaves no time for an online init; raise it"
        try:
            settings = wandb.Settings(init_timeout=round(init_timeout, 1))
            self._adopt(wandb.init(mode="online", settings=settings, **common))
        except Exception as err:
            _discard_wandb_service(wandb)
            return one_line(err, with_type=True)
        return None

    def _adopt(self, run: Any) -> None:
        self._run = run
        mode = str(getattr(getattr(run, "settings", None), "mode", "online"))
        self.wandb_mode = {"dryrun": "offline", "offline": "offline", "disabled": "disabled"}.get(mode, "online")
        group = getattr(run, "group", None)
        log.info("W&B %s run %r%s, id %s", self.wandb_mode, getattr(run, "name", None),
                 f" in group {group!r}" if group else "", getattr(run, "id", None))


def _discard_wandb_service(wandb: Any) -> None:
    # A failed init leaves its run registered in the wandb service, which then refuses the same run id
    # ("run ID is in use") for the offline fallback; a fresh service is the only public way to clear it.
    try:
        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()
    except Exception:
        pass
