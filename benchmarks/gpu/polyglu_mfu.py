"""Claim: PolyGLU-600M (preset=polyglu-pretrain, the paper's 597M PolychromaticLM) trains at >= 40% MFU on one
H200 in bf16 at sequence 4096, about 3x the seed's A100 run (~11,800 tokens/s, ~13% MFU).

For activation checkpointing off and on: the largest micro-batch that fits is found by doubling until out of
memory (then one step between the last fit and the first miss), and at that micro-batch full training steps are
timed: forward and backward under bf16 autocast, gradient clipping, AdamW. Every row is packed documents of
random lengths (mean ~1k tokens), so attention runs through the document-masked varlen kernel as in
pretraining. Vocabulary: Qwen3's 151,669 (random token ids; the tokenizer itself is not needed).

MFU = model FLOPs per second / the GPU's measured bf16 matmul peak (an 8192^3 matmul, best of 20), with model
FLOPs per token = 6 x parameters (the tied head's matmul included, the embedding lookup counted too): the
convention of the seed's 13%. `mfu_with_attention` adds the attention scores, 12 x layers x heads x head_dim x
seq (PaLM's appendix B; it counts the full T x T where causal document masks compute less). `mfu_vs_nominal`
divides by the datasheet peak instead.

    python benchmarks/gpu/polyglu_mfu.py [--seq 4096] [--steps 6] [--warmup 2] [--dry-run]

--dry-run (any machine): builds the configuration on the meta device and says what it would measure.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: I001 - puts the repository root on sys.path first

import torch

from eval.param_count import KNOWN_VOCAB
from models.registry import build_model
from trainer.config.validate import compose_config
from trainer.engines.base import autocast_context
from trainer.optim import build_optimizer

PRESET = "polyglu-pretrain"
TARGET = {"mfu": ">= 0.40"}
SEED_A100 = {"tokens_per_s": 11_800, "mfu": 0.13}
MEAN_DOCUMENT = 1024


def config(checkpointing: bool, seq: int):
    cfg = compose_config([f"preset={PRESET}", f"model.activation_checkpointing={str(checkpointing).lower()}",
                          f"data.block_size={seq}", "tracking.wandb_mode=disabled"])
    return cfg, KNOWN_VOCAB[cfg.data.tokenizer.name]


def flops_per_token(model_cfg, n_params: int, seq: int) -> tuple[float, float]:
    """(6N, 6N + attention scores) per token; see the module docstring."""
    attention = 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_dim * seq
    return 6.0 * n_params, 6.0 * n_params + attention


def packed_documents(b: int, t: int, generator: torch.Generator) -> torch.Tensor:
    """[B, T] document ids as the data pipeline numbers them: documents of exponential lengths (mean ~1k)."""
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < t:
            lengths.append(max(16, int(torch.empty(1).exponential_(1 / MEAN_DOCUMENT, generator=generator))))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:t])
    return torch.stack(rows)


class Trainer:
    """One model and optimizer; `step(b)` runs one full training step on a fresh micro-batch of b rows."""

    def __init__(self, cfg, vocab: int, device: str = "cuda"):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = build_model(cfg.model, vocab_size=vocab, eos_id=0).to(self.device).train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.cfg, self.vocab = cfg, vocab
        self.generator = torch.Generator().manual_seed(0)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def step(self, b: int) -> float:
        t = self.cfg.data.block_size
        ids = torch.randint(0, self.vocab, (b, t), generator=self.generator).to(self.device, non_blocking=True)
        docs = packed_documents(b, t, self.generator).to(self.device, non_blocking=True)
        with autocast_context(self.device, "bf16"):
            loss = self.model(ids, document_ids=docs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def release(self) -> None:
        """Give the GPU memory back before the next configuration is built."""
        self.model = self.optimizer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def forget_failed_step(self) -> None:
        """After an out-of-memory step: drop its partial gradients and give the cached blocks back."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, b: int) -> bool:
        try:
            self.step(b)
            return True
        except torch.OutOfMemoryError:
            self.forget_failed_step()
            return False


def largest_micro_batch(trainer: Trainer, start: int, limit: int) -> int:
    """Double from `start` until a step runs out of memory, then try once between the last fit and the miss."""
    fit, b = 0, start
    while b <= limit and trainer.fits(b):
        fit, b = b, b * 2
    if fit and b <= limit:
        middle = (fit + b) // 2
        if middle > fit and trainer.fits(middle):
            fit = middle
    return fit


def timed_steps(trainer: Trainer, b: int, args) -> tuple[list[float], int]:
    """Seconds of `args.steps` steps after `args.warmup`, at b rows, or at b/2 (and b/4) if a later step runs out
    of memory where the search's single step did not (fragmentation at the edge of memory). Returns the times
    and how many times b was halved."""
    for halvings in range(3):
        rows = b >> halvings
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                trainer.step(rows)
            return [common.timed(lambda r=rows: trainer.step(r)) for _ in range(args.steps)], halvings
        except torch.OutOfMemoryError:
            trainer.forget_failed_step()
            if rows == 1:
                break
    raise RuntimeError(f"out of memory at {b} rows and at every halving down to {max(b >> 2, 1)}")


def measure(checkpointing: bool, args, peak: float, nominal: float | None) -> dict:
    cfg, vocab = config(checkpointing, args.seq)
    trainer = Trainer(cfg, vocab)
    b = largest_micro_batch(trainer, args.start_batch, args.max_batch)
    if b == 0:
        trainer.release()
        return {"activation_checkpointing": checkpointing, "micro_batch": 0,
                "error": f"{args.start_batch} rows of {args.seq} tokens do not fit"}
    seconds, backed_off = timed_steps(trainer, b, args)
    b = b >> backed_off
    tokens_per_s = b * args.seq / statistics.median(seconds)
    six_n, with_attention = flops_per_token(cfg.model, trainer.n_params, args.seq)
    result = {
        "activation_checkpointing": checkpointing, "micro_batch": b, "tokens_per_step": b * args.seq,
        "tokens_per_s": round(tokens_per_s), "step_s_median": round(statistics.median(seconds), 4),
        "halved_after_oom": backed_off,
        "mfu": round(tokens_per_s * six_n / (peak * 1e12), 4),
        "mfu_with_attention": round(tokens_per_s * with_attention / (peak * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    if nominal:
        result["mfu_vs_nominal"] = round(tokens_per_s * six_n / (nominal * 1e12), 4)
    trainer.release()
    return result


def dry_run(args) -> dict:
    cfg, vocab = config(False, args.seq)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(cfg.model, vocab_size=vocab, eos_id=0).parameters())
    six_n, with_attention = flops_per_token(cfg.model, n_params, args.seq)
    print(f"would measure preset={PRESET} ({n_params:,} parameters, vocabulary {vocab:,}) at sequence {args.seq}, "
          f"bf16, activation checkpointing off and on: largest micro-batch from {args.start_batch} (doubling, "
          f"<= {args.max_batch}), {args.warmup} warmup + {args.steps} timed steps; "
          f"{six_n / 1e9:.2f} GFLOP/token (6N), {with_attention / 1e9:.2f} with attention")
    return {"dry_run": True, "preset": PRESET, "parameters": n_params, "seq": args.seq,
            "gflop_per_token_6n": round(six_n / 1e9, 3),
            "gflop_per_token_with_attention": round(with_attention / 1e9, 3), "targets": TARGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=64)  # 262k tokens a micro-batch: MFU has long flattened
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: a dry run instead", file=sys.stderr)
        common.emit(dry_run(args))
        return
    info = common.device_info()
    peak = common.measure_peak_tflops()
    nominal = common.nominal_tflops(info["device"])
    print(f"{info['device']}: bf16 matmul peak {peak:.0f} TFLOP/s measured (nominal {nominal})", flush=True)
    runs = []
    for checkpointing in (False, True):
        runs.append(measure(checkpointing, args, peak, nominal))
        print(runs[-1], flush=True)
    best = max(runs, key=lambda r: r.get("tokens_per_s", 0))
    mfu = best.get("mfu", 0.0)
    common.emit({
        "mfu": mfu, "tokens_per_s": best.get("tokens_per_s", 0), "best": best, "runs": runs,
        "vs_seed_a100_mfu": round(mfu / SEED_A100["mfu"], 2) if math.isfinite(mfu) else None,
        "peak_tflops_measured": round(peak, 1), "peak_tflops_nominal": nominal, "seq": args.seq,
        "preset": PRESET, **info, "targets": TARGET,
    })


if __name__ == "__main__":
    main()
