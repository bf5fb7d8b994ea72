"""Claims: the tokenize command is at least as fast as `datasets.map`, and the shard loader outruns training.

1. tokenize_vs_datasets_map (target >= 1.0): tokens/s of `tokenize_data` (the `task=tokenize` command:
   source=local JSON Lines -> GPT-2 tokens -> uint32 shards, default worker count = one process per core)
   over tokens/s of the usual Hugging Face recipe on the same file with the same tokenizer:
   `load_dataset("json", ...)` then `.map(batched=True, num_proc=<same count>)` calling the same `tokenizers`
   backend. Both are timed end to end as a user pays them: loading the tokenizer, parsing the JSON Lines,
   encoding, and writing the result (our shards; the baseline's Arrow cache, in a fresh cache dir every trial
   so nothing is reused). Both sides must count the same tokens (ours minus the EOS it appends per document).
   The input is the project's offline corpus (embedded code + prose, repeated `--repeat` times), shuffled into
   one JSON Lines file (see write_corpus for why shuffled). TOKENIZERS_PARALLELISM=false on both sides: one
   process per core, no Rust thread pool on top of them. Same Rust tokenizer, same ids; our side calls its
   encode_batch_fast (no character offsets, which token shards never need), the baseline its encode_batch
   (what a transformers fast tokenizer's __call__ uses, the usual recipe).
2. loader_vs_model (target >= 50): blocks/s the shard loader delivers (the trainer's own path: shards just
   written -> build_shard_data -> MixedStream micro-batches) over blocks/s the shakedown model consumes in
   training (dense GPT-2 at the shakedown preset's sizes, random init, GPT-2 vocabulary, CPU fp32; optimizer
   steps of grad_accum_steps micro-batches of forward+backward, clipping and AdamW), at the preset's batch
   size and block size. Model rate = blocks per optimizer step / median step time after warm-up steps.

Each trial runs both tokenizers back to back, alternating which goes first, then times the loader on the
shards that trial wrote and a few model steps. Reported numbers are medians over trials.

    python benchmarks/data_pipeline.py [--trials 3] [--repeat 2] [--steps 5] [--warmup 2]

Last line: one JSON object with both ratios, the raw rates, the token count, workers, trials and targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# No network here; and one process per core on both sides, as the tokenize command's workers run.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from data.config import DataConfig, DomainConfig, TokenizerConfig
from data.shards.load import build_shard_data
from data.shards.store import read_index
from data.shards.tokenize import domain_dir, resolve_workers, tokenize_data
from data.sources import load_documents
from data.tokenizer import load_gpt2
from models.registry import build_model
from trainer.config.validate import compose_config
from trainer.optim import build_optimizer
from trainer.rng import seed_everything

TARGETS = {"tokenize_vs_datasets_map": ">= 1.0", "loader_vs_model": ">= 50"}
EMBEDDED = ("code", "prose")
DOMAIN = "text"


def shakedown_config():
    return compose_config(["preset=shakedown", "data.tokenizer.name=gpt2"])


def write_corpus(path: Path, cache_dir: str, repeat: int) -> tuple[int, int]:
    """The embedded code and prose domains (all of them), repeated `repeat` times and shuffled, as JSON Lines.

    Shuffled: `datasets.map(num_proc=N)` splits the rows into N contiguous runs, so code's long files all in
    one run would leave the other processes idle; a shuffled file gives the baseline balanced work."""
    cfg = DataConfig(source="embedded", size_mb=10_000.0, domains={d: DomainConfig() for d in EMBEDDED},
                     cache_dir=cache_dir)
    docs, _ = load_documents(cfg)
    corpus = [doc for d in EMBEDDED for doc in docs[d]] * repeat
    order = np.random.default_rng(0).permutation(len(corpus))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"text": corpus[i]}) + "\n")
    return len(corpus), sum(len(doc.encode("utf-8", "surrogatepass")) for doc in corpus)


def shard_config(base: DataConfig, corpus: Path, shards_dir: Path) -> DataConfig:
    return dataclasses.replace(
        base, name="bench", source="local", format="shards", shards_dir=str(shards_dir), mix=[],
        domains={DOMAIN: DomainConfig(paths=[str(corpus)])},
        tokenizer=TokenizerConfig(name="gpt2"), tokenize_workers=0)


def run_ours(cfg: DataConfig) -> tuple[float, int, int]:
    """(seconds, tokens without EOS, documents) of the tokenize command, end to end."""
    start = time.perf_counter()
    tokenize_data(cfg)
    seconds = time.perf_counter() - start
    tokens = documents = 0
    for d in cfg.domains:
        index = read_index(domain_dir(cfg, d))
        with_eos = sum(e["tokens"] for e in index["train"]) + (index["eval"]["tokens"] if index["eval"] else 0)
        tokens += with_eos - index["source_documents"]  # one EOS per document
        documents += index["source_documents"]
    return seconds, tokens, documents


def run_datasets_map(corpus: Path, cache_dir: Path, workers: int) -> tuple[float, int, int]:
    """(seconds, tokens, documents) of load_dataset("json") + map(batched=True, num_proc=workers)."""
    start = time.perf_counter()
    backend = load_gpt2()._backend  # the same tokenizers.Tokenizer object (same settings) our side encodes with
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train",
                               cache_dir=str(cache_dir))
    out = ds.map(lambda b: {"ids": [e.ids for e in backend.encode_batch(b["text"], add_special_tokens=False)]},
                 batched=True, num_proc=workers, remove_columns=["text"])
    seconds = time.perf_counter() - start
    tokens = int(pc.sum(pc.list_value_length(out.data.column("ids"))).as_py())
    return seconds, tokens, len(out)


def loader_rate(cfg, data_cfg: DataConfig, batches: int) -> float:
    """Blocks/s of the trainer's shard stream (build_shard_data -> MixedStream), as the trainer builds it."""
    bundle = build_shard_data(data_cfg, None)
    stream = bundle.train_stream(cfg.train.batch_size, cfg.run.seed, 0, 1, cfg.train.grad_accum_steps,
                                 cfg.train.max_steps)
    for _ in range(5):
        stream.next_batch()
    start = time.perf_counter()
    blocks = 0
    for _ in range(batches):
        blocks += len(stream.next_batch()["input_ids"])
    return blocks / (time.perf_counter() - start)


def model_rate(cfg, data_cfg: DataConfig, vocab_size: int, eos_id: int, steps: int, warmup: int) -> float:
    """Blocks/s the shakedown model trains on: median optimizer-step time over steps after `warmup`."""
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, vocab_size=vocab_size, eos_id=eos_id)
    optimizer = build_optimizer(model, cfg.optim)
    bundle = build_shard_data(data_cfg, None)
    stream = bundle.train_stream(cfg.train.batch_size, cfg.run.seed, 0, 1, cfg.train.grad_accum_steps,
                                 cfg.train.max_steps)
    accum = cfg.train.grad_accum_steps
    # Batches fetched up front: this times the model alone.
    batches = [stream.next_batch() for _ in range((warmup + steps) * accum)]
    model.train()
    durations = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        for micro in range(accum):
            batch = batches[step * accum + micro]
            out = model(input_ids=batch["input_ids"], document_ids=batch["document_ids"])
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(out.loss.detach())
        durations.append(time.perf_counter() - start)
    return cfg.train.batch_size * accum / statistics.median(durations[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the embedded code+prose text")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps of the model per trial")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "data"),
                        help="where the embedded corpus's scan is cached (as the trainer's data.cache_dir)")
    args = parser.parse_args()
    cfg = shakedown_config()
    tokenizer = load_gpt2()
    workers = resolve_workers(0)
    ours_tps, base_tps, ratios, loader_bps, model_bps, load_ratios = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        corpus = tmp / "corpus" / "corpus.jsonl"
        n_docs, n_bytes = write_corpus(corpus, args.cache_dir, args.repeat)
        print(f"corpus: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB of text in {corpus.name} "
              f"({time.perf_counter() - start:.1f}s); {workers} worker process(es) per side", flush=True)
        tokens = None
        for trial in range(args.trials):
            data_cfg = shard_config(cfg.data, corpus, tmp / f"shards{trial}")
            sides = ["ours", "datasets"] if trial % 2 == 0 else ["datasets", "ours"]
            result = {}
            for side in sides:
                if side == "ours":
                    result[side] = run_ours(data_cfg)
                else:
                    result[side] = run_datasets_map(corpus, tmp / f"hf-cache{trial}", workers)
                    shutil.rmtree(tmp / f"hf-cache{trial}", ignore_errors=True)
            (t_ours, tok_ours, docs_ours), (t_base, tok_base, docs_base) = result["ours"], result["datasets"]
            if tok_ours != tok_base or docs_ours != docs_base or docs_ours != n_docs:
                raise SystemExit(f"token/document counts differ: ours {tok_ours}/{docs_ours}, datasets "
                                 f"{tok_base}/{docs_base}, corpus {n_docs} documents")
            tokens = tok_ours
            ours_tps.append(tok_ours / t_ours)
            base_tps.append(tok_base / t_base)
            ratios.append(ours_tps[-1] / base_tps[-1])
            loader_bps.append(loader_rate(cfg, data_cfg, args.loader_batches))
            model_bps.append(model_rate(cfg, data_cfg, tokenizer.vocab_size, tokenizer.eos_id, args.steps,
                                        args.warmup))
            load_ratios.append(loader_bps[-1] / model_bps[-1])
            print(f"trial {trial} ({' first, '.join(sides)} second): ours {ours_tps[-1]:,.0f} tok/s ({t_ours:.2f}s), "
                  f"datasets.map {base_tps[-1]:,.0f} tok/s ({t_base:.2f}s), ratio {ratios[-1]:.3f}; loader "
                  f"{loader_bps[-1]:,.0f} blocks/s, model {model_bps[-1]:.2f} blocks/s, ratio {load_ratios[-1]:,.0f}",
                  flush=True)
            shutil.rmtree(tmp / f"shards{trial}", ignore_errors=True)
    result = {
        "tokenize_vs_datasets_map": round(statistics.median(ratios), 4),
        "loader_vs_model": round(statistics.median(load_ratios), 1),
        "ours_tokens_per_s": round(statistics.median(ours_tps), 1),
        "datasets_map_tokens_per_s": round(statistics.median(base_tps), 1),
        "loader_blocks_per_s": round(statistics.median(loader_bps), 1),
        "model_blocks_per_s": round(statistics.median(model_bps), 3),
        "trial_tokenize_ratios": [round(r, 4) for r in ratios],
        "trial_loader_ratios": [round(r, 1) for r in load_ratios],
        "tokens": tokens, "documents": n_docs, "text_mb": round(n_bytes / 1e6, 2), "workers": workers,
        "trials": args.trials, "batch_size": cfg.train.batch_size, "block_size": cfg.data.block_size,
        "grad_accum_steps": cfg.train.grad_accum_steps, "model_steps": args.steps, "warmup_steps": args.warmup,
        "torch_threads": torch.get_num_threads(), "datasets_version": datasets.__version__,
        "numpy_version": np.__version__, "targets": TARGETS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
