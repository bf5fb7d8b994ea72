"""`python trainer/run.py task=tokenize data=<entry>`: every domain's documents -> uint32 token shards.

Deterministic: the shard layout depends only on the documents, the tokenizer and the size settings, never
on the number of worker processes or batch sizes. A shard ends after the document that fills it, so
shards hold whole documents, and index.json records how many source documents the finished shards
consumed. Re-running the same command after an interruption skips those documents without tokenizing
them and continues with the next shard, which is why the result equals an uninterrupted run byte for byte.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice

import numpy as np
from tqdm import tqdm

from trainer.base.atomic_files import remove_temporaries
from trainer.base.errors import UserError

from .. import sources
from ..config import DataConfig
from ..sources import hub
from ..tokenizer import TextTokenizer, load_named_tokenizer
from . import store

log = logging.getLogger(__name__)


def shards_root(cfg: DataConfig) -> str:
    return cfg.shards_dir or os.path.join(cfg.cache_dir, "shards", cfg.name)


def domain_dir(cfg: DataConfig, domain: str) -> str:
    return os.path.join(shards_root(cfg), domain)


def tokenize_command(cfg: DataConfig, shards_dir: str | None = None) -> str:
    shards_dir = shards_dir or cfg.shards_dir
    extra = f" data.shards_dir={shards_dir}" if shards_dir else ""
    return f"python trainer/run.py task=tokenize data={cfg.name}{extra} (plus this run's other data.* overrides)"


def shard_settings(cfg: DataConfig, domain: str, tokenizer: TextTokenizer,
                   local_files_seen: list | None = None) -> dict:
    """Everything that decides the shards' bytes; a resumed run must match it exactly. `local_files_seen`: see
    sources.domain_signature."""
    return {
        "source": sources.domain_signature(cfg, domain, local_files_seen),
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "shard_tokens": cfg.shard_tokens, "eval_tokens": cfg.eval_tokens,
        "max_tokens": cfg.domains[domain].max_tokens, "dtype": "uint32",
    }


# Settings that cut the same token sequence into other files: shards end at document edges and a run reads
# their concatenation, so training need not match them. The tokenizer is compared by fingerprint instead.
LAYOUT_ONLY = ("shard_tokens",)


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def settings_differences(recorded: dict, wanted: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Where this run's shard_settings (`wanted`) differ from an index's `recorded` ones, keys in `ignore` aside:
    "key (recorded in the shards, wanted in this run)". Nested settings are named by their own keys
    (source.files, source.filter), so a user sees what to change without reading both file lists."""
    out = []
    for key in sorted(recorded.keys() | wanted.keys()):
        was, now = recorded.get(key), wanted.get(key)
        if key in ignore or was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            out += settings_differences(was, now, prefix=f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} ({_shown(was)} in the shards, {_shown(now)} in this run)")
    return out


# -- encoding, in worker processes ------------------------------------------------------------------------
_WORKER_TOKENIZER: TextTokenizer | None = None


def encode_flat(tokenizer: TextTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (uint32 tokens with EOS after each document, int64 lengths incl. EOS)."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    eos = (tokenizer.eos_id,)
    flat = np.fromiter(chain.from_iterable(chain(x, eos) for x in ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _init_worker(spec: tuple | None) -> None:
    global _WORKER_TOKENIZER
    # Ctrl-C reaches the whole process group; the parent alone decides to stop (and then lets the batches in
    # flight finish), so a worker interrupted mid-task can neither lose a batch nor break the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per core already: the tokenizer's own thread pool would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if spec is not None:  # spawned workers rebuild it; forked ones inherited the parent's
        _WORKER_TOKENIZER = TextTokenizer.from_spec(spec)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return encode_flat(_WORKER_TOKENIZER, texts)


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def encoded_batches(docs: Iterable[str], tokenizer: TextTokenizer, workers: int,
                    batch_docs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in document order. With workers > 1, batches are tokenized in parallel processes
    with a bounded number in flight, so a fast source never piles up in memory."""
    if workers <= 1:
        for batch in _batched(docs, batch_docs):
            yield encode_flat(tokenizer, batch)
        return
    global _WORKER_TOKENIZER
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    _WORKER_TOKENIZER = tokenizer if method == "fork" else None
    spec = None if method == "fork" else tokenizer.spec()
    # Not multiprocessing.Pool: leaving its `with` on an error or interrupt terminate()s workers, and one
    # killed while holding the result queue's lock deadlocks Pool's own shutdown (seen in CI on an
    # interrupted tokenization). The executor's shutdown waits for the batches in flight (at most
    # 2 * workers) and cancels the rest, and a worker that dies fails the run instead of hanging it.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                               initargs=(spec,))
    try:
        pending: deque = deque()
        for batch in _batched(docs, batch_docs):
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- shard assembly ----------------------------------------------------------------------------------------
class ShardBuilder:
    """Cuts the encoded document sequence into an eval shard, then training shards, at document edges."""

    def __init__(self, directory: str, index: dict, eval_tokens: int, shard_tokens: int, max_tokens: int | None):
        self.directory, self.index = directory, index
        self.eval_tokens, self.shard_tokens, self.max_tokens = eval_tokens, shard_tokens, max_tokens
        self.pieces: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.buffered = 0
        self.train_tokens = sum(e["tokens"] for e in index["train"])

    @property
    def in_eval(self) -> bool:
        return self.eval_tokens > 0 and self.index["eval"] is None

    def _target(self) -> int:
        if self.in_eval:
            return self.eval_tokens
        if self.max_tokens is not None:
            return min(self.shard_tokens, self.max_tokens - self.train_tokens)
        return self.shard_tokens

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> bool:
        """Take one encoded batch; returns True once the token budget is reached (stop reading)."""
        pos_doc, pos_tok = 0, 0
        while pos_doc < len(lengths):
            need = self._target() - self.buffered
            cum = np.cumsum(lengths[pos_doc:])
            k = int(np.searchsorted(cum, need, side="left"))  # the document that reaches the target
            if k >= len(cum):
                self._buffer(flat[pos_tok:], lengths[pos_doc:])
                return False
            end_tok = pos_tok + int(cum[k])
            self._buffer(flat[pos_tok:end_tok], lengths[pos_doc:pos_doc + k + 1])
            pos_doc, pos_tok = pos_doc + k + 1, end_tok
            was_eval = self.in_eval
            self.flush()
            if not was_eval and self.max_tokens is not None and self.train_tokens >= self.max_tokens:
                return True
        return False

    def _buffer(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.pieces.append(tokens.copy())
        self.lengths.append(lengths.copy())
        self.buffered += len(tokens)

    def flush(self) -> None:
        if not self.buffered:
            return
        tokens, lengths = np.concatenate(self.pieces), np.concatenate(self.lengths)
        if self.in_eval:
            self.index["eval"] = store.write_shard(self.directory, "eval-00000", tokens, lengths)
        else:
            name = f"train-{len(self.index['train']):05d}"
            self.index["train"].append(store.write_shard(self.directory, name, tokens, lengths))
            self.train_tokens += len(tokens)
        self.index["source_documents"] += len(lengths)
        store.write_index(self.directory, self.index)  # last: the shard counts from here on
        self.pieces, self.lengths, self.buffered = [], [], 0


def _clean_stale(directory: str, index: dict) -> None:
    """Temporary files of an interrupted write, and shard files renamed into place but never indexed."""
    listed = {e["name"] for e in index["train"]} | ({index["eval"]["name"]} if index["eval"] else set())
    remove_temporaries(directory)
    for path in glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.docs.npy")):
        if os.path.basename(path).split(".")[0] not in listed:
            os.unlink(path)


def tokenize_domain(cfg: DataConfig, domain: str, tokenizer: TextTokenizer, workers: int) -> dict:
    directory = domain_dir(cfg, domain)
    os.makedirs(directory, exist_ok=True)
    settings = shard_settings(cfg, domain, tokenizer)
    index = store.read_index(directory)
    # Resuming appends to the existing shards byte for byte, so here even layout-only settings must match.
    changed = settings_differences(index["settings"], settings) if index is not None else []
    if changed:
        raise UserError(f"{directory} was tokenized with other settings ({'; '.join(changed)}); delete it "
                        "to start over, or point data.shards_dir elsewhere")
    if index is None:
        index = {"format_version": store.FORMAT_VERSION, "domain": domain, "settings": settings,
                 "eval": None, "train": [], "source_documents": 0, "complete": False}
    if index["complete"]:
        log.info("%s: already tokenized (%d shards) in %s", domain, len(index["train"]), directory)
        return _summary(domain, directory, index, 0, 0.0, workers)
    _clean_stale(directory, index)
    skip = index["source_documents"]
    if skip:
        log.info("%s: resuming after %d finished shard(s), skipping %d documents", domain, len(index["train"]), skip)
    builder = ShardBuilder(directory, index, cfg.eval_tokens, cfg.shard_tokens, cfg.domains[domain].max_tokens)
    budget = cfg.domains[domain].max_tokens
    start, new_tokens = time.perf_counter(), 0
    docs = islice(sources.domain_documents(cfg, domain), skip, None)
    budget_reached = False
    # A context manager, so an error or Ctrl-C closes the bar first and its message starts on a line of its own.
    with tqdm(total=None if budget is None else budget + cfg.eval_tokens, initial=builder.train_tokens,
              unit="tok", unit_scale=True, desc=f"tokenize {domain}", dynamic_ncols=True, mininterval=1.0) as bar:
        for flat, lengths in encoded_batches(docs, tokenizer, workers, cfg.tokenize_batch_docs):
            new_tokens += len(flat)
            bar.update(len(flat))
            if builder.add(flat, lengths):
                budget_reached = True
                break
    if not budget_reached:
        if builder.in_eval:
            raise UserError(f"data.domains.{domain}: the source ran out after {builder.buffered} tokens, all held "
                            f"out for eval (data.eval_tokens={cfg.eval_tokens}); lower data.eval_tokens or add text")
        builder.flush()  # the source ran out: its last, shorter shard
    if not index["train"]:
        raise UserError(f"data.domains.{domain}: the source gave no training tokens after the eval shard; "
                        "lower data.eval_tokens or add text")
    index["complete"] = True
    store.write_index(directory, index)
    elapsed = time.perf_counter() - start
    return _summary(domain, directory, index, new_tokens, elapsed, workers)


def _summary(domain: str, directory: str, index: dict, new_tokens: int, seconds: float, workers: int) -> dict:
    return {"domain": domain, "directory": directory, "shards": len(index["train"]),
            "train_tokens": sum(e["tokens"] for e in index["train"]),
            "train_documents": sum(e["documents"] for e in index["train"]),
            "eval_tokens": index["eval"]["tokens"] if index["eval"] else 0,
            "tokenized_now": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else None, "workers": workers}


def resolve_workers(requested: int) -> int:
    if requested > 0:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenize_data(cfg: DataConfig) -> list[dict]:
    """Tokenize every domain of `cfg` into `shards_root(cfg)/<domain>`; returns one summary per domain."""
    sources.check_domains(cfg)
    if cfg.source == "hub":  # before the tokenizer: offline, name the datasets and the local-files way out
        for domain in sorted(cfg.domains):
            hub.check_reachable(domain, cfg.domains[domain])
    tokenizer = load_named_tokenizer(cfg.tokenizer)
    workers = resolve_workers(cfg.tokenize_workers)
    results = []
    for domain in sorted(cfg.domains):
        summary = tokenize_domain(cfg, domain, tokenizer, workers)
        results.append(summary)
        rate = f"{summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "nothing new"
        print(f"{domain}: {summary['train_tokens']:,} training tokens in {summary['shards']} shard(s) + "
              f"{summary['eval_tokens']:,} eval tokens -> {summary['directory']} ({rate}, "
              f"{workers} worker(s))", flush=True)
    return results
