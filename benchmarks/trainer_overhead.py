"""Claim: the trainer's loop costs almost nothing over a bare PyTorch loop. Target: ratio >= 0.95.

Both loops train the same model (same config, same init), on the same packed blocks, with the same
AdamW parameter groups, micro-batch, accumulation, clipping and precision. Each trial runs both loops
back to back, alternating which goes first (drift within a session then hits both alike). A loop's
throughput is tokens per step over its *median* steady-state step time (the first `warmup` steps are
excluded): on a shared 2-core VM single steps swing by 30%+, and one slow step should not decide a
trial. The reported ratio is the median over trials of each trial's trainer/bare ratio; the ratio of
mean step times is reported beside it.

    python benchmarks/trainer_overhead.py [--steps 40] [--trials 5] [override ...]

Last line: {"ratio": median over trials of trainer_tokens_per_s / bare_tokens_per_s, ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from data.build import build_data
from models.registry import build_model
from trainer.config.validate import compose_config
from trainer.engines.base import autocast_context
from trainer.fit import train
from trainer.optim import build_optimizer, build_scheduler
from trainer.rng import seed_everything

TARGET = ">= 0.95"


def config(steps: int, run_dir: Path, extra: list[str]):
    overrides = [
        f"train.max_steps={steps}", f"train.eval_every={10**6}", f"checkpoint.save_every={10**6}",
        "checkpoint.save_final=false", "tracking.wandb_mode=disabled", "data.max_eval_blocks=1",
        f"run.output_dir={run_dir}", "run.name=bench", *extra,
    ]
    return compose_config(overrides)


def bare_step_times(cfg, warmup: int) -> list[float]:
    """The loop anyone would write by hand: no stream object, no logging, no callbacks, no progress bar."""
    seed_everything(cfg.run.seed)
    data = build_data(cfg.data, seed=cfg.data.split_seed)
    # hardware=cuda puts both loops on the GPU (benchmarks/gpu/trainer_overhead.py); anything else is the CPU.
    device = torch.device("cuda" if cfg.hardware.device == "cuda" else "cpu")
    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, eos_id=data.tokenizer.eos_id).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    rng = np.random.default_rng(0)
    blocks = torch.from_numpy(data.train.input_ids.astype(np.int64)).to(device)
    b, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    model.train()
    durations = []
    for _ in range(cfg.train.max_steps):
        start = time.perf_counter()
        for _micro in range(accum):
            x = blocks[rng.integers(0, len(blocks), size=b)]
            with autocast_context(device, cfg.hardware.precision):
                out = model(input_ids=x)
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(out.loss.detach())  # the bare loop also reads its loss once per step
        durations.append(time.perf_counter() - start)
    return durations[warmup:]


def trainer_step_times(cfg, run_dir: Path, warmup: int) -> list[float]:
    """The real trainer (engine, stream, tracker, callbacks, tqdm), timed from its own per-step log lines:
    the gap between two steps' lines is everything the loop does for one step."""
    train(cfg, run_dir)
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            times[row["step"]] = row["time"]
    return [times[s] - times[s - 1] for s in range(warmup + 1, cfg.train.max_steps + 1)]


def measure(steps: int, warmup: int, trials: int, overrides: list[str]) -> dict:
    ratios, bare_tps, trainer_tps, mean_ratios = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(trials):
            run_dir = Path(tmp) / f"trial{trial}"
            cfg = config(steps, Path(tmp), [f"run.name=trial{trial}", *overrides])
            tokens_per_step = cfg.train.batch_size * cfg.data.block_size * cfg.train.grad_accum_steps
            if trial % 2 == 0:
                bare = bare_step_times(cfg, warmup)
                ours = trainer_step_times(cfg, run_dir, warmup)
            else:
                ours = trainer_step_times(cfg, run_dir, warmup)
                bare = bare_step_times(cfg, warmup)
            bare_tps.append(tokens_per_step / statistics.median(bare))
            trainer_tps.append(tokens_per_step / statistics.median(ours))
            ratios.append(trainer_tps[-1] / bare_tps[-1])
            mean_ratios.append(statistics.fmean(bare) / statistics.fmean(ours))
            print(f"trial {trial}: bare {bare_tps[-1]:.0f} tok/s, trainer {trainer_tps[-1]:.0f} tok/s, "
                  f"ratio {ratios[-1]:.3f} (of mean step times {mean_ratios[-1]:.3f})", flush=True)
    return {
        "ratio": statistics.median(ratios),
        "ratio_of_mean_step_times": statistics.median(mean_ratios),
        "trainer_tokens_per_s": statistics.median(trainer_tps),
        "bare_tokens_per_s": statistics.median(bare_tps),
        "trial_ratios": [round(r, 4) for r in ratios],
        "trials": trials, "steps": steps, "warmup_steps": warmup, "target": TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.n_embd=256")
    args = parser.parse_args()
    print(json.dumps(measure(args.steps, args.warmup, args.trials, args.overrides)))


if __name__ == "__main__":
    main()
