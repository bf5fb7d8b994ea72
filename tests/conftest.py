"""Shared helpers: run the real entrypoint as a user would, with a tiny model and corpus."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "trainer" / "run.py")

# Tiny everything, real code paths: a 2-layer GPT-2 on ~50 KB per domain, 64-token blocks.
TINY_GPT2 = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=64"]
TINY = [
    "data.size_mb=0.05", "data.block_size=64", "data.tokenizer.vocab_size=512", "data.max_eval_blocks=4",
    "train.batch_size=2", "train.grad_accum_steps=2", "tracking.wandb_mode=disabled",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/corpus cache for the whole session: tests pay for tokenization once."""
    return tmp_path_factory.mktemp("data-cache")


def compose_validated(overrides: list[str]):
    """The typed Config trainer/run.py would train with, composed in-process from conf/."""
    from trainer.config.validate import compose_config

    return compose_config(overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # PYTHONFAULTHANDLER: if a launched run dies on a signal (a native abort at distributed teardown was
    # seen once in CI), its stderr, which assert_ok prints, carries every thread's Python stack.
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                **extra})
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, launcher: list[str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), RUN, *args]
    return subprocess.run(command, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def tiny_args(tmp_path: Path, data_cache: Path, *overrides: str, name: str | None = "run",
              model_sizes: list[str] = TINY_GPT2) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    flags = [o for o in overrides if o.startswith("--")]  # argparse wants --multirun before the overrides
    return [*flags, *model_sizes, *TINY, f"data.cache_dir={data_cache}", f"run.output_dir={tmp_path}",
            *([f"run.name={name}"] if name else []), *(o for o in overrides if not o.startswith("--"))]


def tiny_run(tmp_path: Path, data_cache: Path, *overrides: str, name: str | None = "run",
             model_sizes: list[str] = TINY_GPT2, **kwargs):
    """Run trainer/run.py tiny; name=None keeps the default run name (the preset's). model_sizes: the
    tiny sizes of the family under test (GPT-2's by default; later overrides win)."""
    args = tiny_args(tmp_path, data_cache, *overrides, name=name, model_sizes=model_sizes)
    return run_cli(args, cwd=tmp_path, **kwargs)


def start_tiny_run(tmp_path: Path, data_cache: Path, *overrides: str, name: str = "run",
                   launcher: list[str] | None = None) -> subprocess.Popen:
    """tiny_run in the background, for tests that signal a run while it trains."""
    args = tiny_args(tmp_path, data_cache, *overrides, name=name)
    return subprocess.Popen([*(launcher or [sys.executable]), RUN, *args], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}")
