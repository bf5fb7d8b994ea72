"""data.format=memory: documents -> text-level train/eval split -> tokenizer -> token streams (cached) -> blocks.

The whole corpus is read, tokenized and packed in memory, capped at data.size_mb per domain; the token streams
and a trained tokenizer are cached under data.cache_dir, keyed by the documents' signature and the settings.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zlib

import numpy as np

from trainer.base.errors import UserError

from . import sources
from .bundle import DataBundle
from .cache import digest, load_array, load_json, save_array, save_json
from .config import DataConfig
from .packing import PackedBlocks, pack
from .streams.schedule import MixSchedule
from .tokenizer import (
    BPE_RECIPE_VERSION,
    TextTokenizer,
    build_tokenizer,
    load_bpe_file,
    load_named_tokenizer,
)

log = logging.getLogger(__name__)

CORPUS_FORMAT = 1  # bump when the cached arrays' meaning changes
SPLITS = ("train", "eval")


def split_documents(docs: list[str], eval_fraction: float, seed: int, domain: str,
                    size_mb: float, source: str = "embedded") -> tuple[list[str], list[str]]:
    """Hold out whole documents before any packing, so no eval text can leak into a training block."""
    if len(docs) < 2:
        # Local files may simply hold one document (a .txt file is one), which no data.size_mb can fix.
        also = (f", or, if the source holds only one (a .txt or .md file is one document; JSON Lines has one per "
                f"line), add documents to data.domains.{domain}") if source == "local" else ""
        raise UserError(f"data.size_mb={size_mb} gives domain {domain!r} only {len(docs)} document(s); "
                        f"the train/eval split needs at least 2, so raise data.size_mb{also}")
    # Each domain gets its own stream, so adding a domain does not reshuffle the others.
    rng = np.random.default_rng((seed % 2**64, zlib.crc32(domain.encode())))
    order = rng.permutation(len(docs))
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]


def tokenize(tokenizer: TextTokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents back to back, each followed by EOS; returns (tokens int32, per-document lengths incl. EOS)."""
    pieces, lengths = [], np.empty(len(docs), dtype=np.int64)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for i, ids in enumerate(tokenizer.iter_encoded(docs)):
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eos)
        lengths[i] = len(ids) + 1
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
    return tokens, lengths


def tokenizer_key(cfg: DataConfig) -> list:
    """The tokenizer's part of a cached corpus's key: a bpe's settings and recipe, else its name."""
    if cfg.tokenizer.name == "bpe":
        return ["bpe", cfg.tokenizer.vocab_size, BPE_RECIPE_VERSION]
    return [cfg.tokenizer.name]


def _corpus_dir(cfg: DataConfig, seed: int) -> str:
    key = digest(CORPUS_FORMAT, sources.signature(cfg), cfg.eval_fraction, seed, tokenizer_key(cfg))
    return os.path.join(cfg.cache_dir, "corpora", key)


def tokenizer_record(tokenizer: TextTokenizer, tok_file: str | None, cache_dir: str) -> dict:
    """What a cached corpus's manifest says of its tokenizer, for cached_tokenizer to find it again."""
    return {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
            "file": os.path.relpath(tok_file, cache_dir) if tok_file else None}


def cached_tokenizer(cfg: DataConfig, record: dict) -> TextTokenizer | None:
    """The tokenizer a cached corpus was made with (its manifest's tokenizer_record): the trained bpe file it names,
    or the named tokenizer loaded again; None when the bpe file is gone."""
    if cfg.tokenizer.name != "bpe":
        return load_named_tokenizer(cfg.tokenizer)
    path = os.path.join(cfg.cache_dir, record["file"])
    return load_bpe_file(path) if os.path.exists(path) else None


def _load_cached(cfg: DataConfig, corpus: str) -> tuple[TextTokenizer, dict, dict] | None:
    """The cached token streams and their tokenizer, or None when anything is missing or stale."""
    manifest_path = os.path.join(corpus, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    manifest = load_json(manifest_path)
    tok_info = manifest["tokenizer"]
    tokenizer = cached_tokenizer(cfg, tok_info)
    if tokenizer is None:
        return None
    if tokenizer.fingerprint != tok_info["fingerprint"]:
        log.info("tokenizer %s changed since the corpus was cached; re-tokenizing", cfg.tokenizer.name)
        return None
    streams = {}
    try:
        for domain in manifest["domains"]:
            for split in SPLITS:
                base = os.path.join(corpus, f"{domain}.{split}")
                streams[domain, split] = (load_array(base + ".tokens.npy"), load_array(base + ".doclens.npy"))
    except (OSError, ValueError):
        return None
    return tokenizer, streams, manifest


def _build_streams(cfg: DataConfig, seed: int, corpus: str) -> tuple[TextTokenizer, dict, dict]:
    docs, provenance = sources.load_documents(cfg)
    splits = {d: split_documents(docs[d], cfg.eval_fraction, seed, d, cfg.size_mb, cfg.source) for d in docs}
    train_texts = [text for d in sorted(splits) for text in splits[d][0]]
    tokenizer, tok_file = build_tokenizer(cfg.tokenizer, cfg.cache_dir, train_texts)
    streams = {}
    for domain, parts in splits.items():
        for split, texts in zip(SPLITS, parts, strict=False):
            tokens, lengths = tokenize(tokenizer, texts)
            base = os.path.join(corpus, f"{domain}.{split}")
            save_array(base + ".tokens.npy", tokens)
            save_array(base + ".doclens.npy", lengths)
            streams[domain, split] = (tokens, lengths)
    manifest = {
        "domains": sorted(splits),
        "provenance": provenance,
        "tokenizer": tokenizer_record(tokenizer, tok_file, cfg.cache_dir),
        "python": sys.version.split()[0],
    }
    save_json(os.path.join(corpus, "manifest.json"), manifest)  # written last: its presence means complete
    return tokenizer, streams, manifest


def build_memory_data(cfg: DataConfig, seed: int, mix: MixSchedule | None) -> DataBundle:
    """Build (or load from data.cache_dir) the tokenizer, the packed training blocks and per-domain eval blocks."""
    start = time.perf_counter()
    domains = sources.check_domains(cfg)
    capped = [d for d in domains if cfg.domains[d].max_tokens is not None]
    if capped:
        # A token budget is a tokenize setting (polyglu-mix sets one per domain); here it would silently not apply.
        log.warning("data.domains.%s.max_tokens applies to token shards (task=tokenize) and is ignored with "
                    "data.format=memory, which reads up to data.size_mb=%g MB per domain: lower data.size_mb, or "
                    "tokenize into shards", capped[0], cfg.size_mb)
    corpus = _corpus_dir(cfg, seed)
    cached = _load_cached(cfg, corpus)
    hit = cached is not None
    tokenizer, streams, manifest = cached if cached is not None else _build_streams(cfg, seed, corpus)

    train_tokens = {d: streams[d, "train"][0] for d in domains}
    budget = min(len(t) for t in train_tokens.values()) if cfg.balance_tokens else None
    train_parts, eval_blocks, per_domain = [], {}, {}
    for d in domains:
        tokens, lengths = streams[d, "train"]
        used = tokens[:budget] if budget is not None else tokens
        train = pack(used, lengths, cfg.block_size, d, domains)
        etokens, elengths = streams[d, "eval"]
        ev = pack(etokens, elengths, cfg.block_size, d, domains, max_blocks=cfg.max_eval_blocks)
        if len(train) == 0 or len(ev) == 0:
            which = "training" if len(train) == 0 else "eval"
            have = len(used) if len(train) == 0 else len(etokens)
            raise UserError(f"data.size_mb={cfg.size_mb} leaves domain {d!r} {have} {which} tokens, less than "
                            f"one block of data.block_size={cfg.block_size}; raise data.size_mb"
                            + (" or data.eval_fraction" if which == "eval" else "")
                            + " or lower data.block_size")
        train_parts.append(train)
        eval_blocks[d] = ev
        per_domain[d] = {
            "train": {"docs": len(lengths), "tokens": len(used), "tokens_before_balance": len(tokens),
                      "blocks": len(train)},
            "eval": {"docs": len(elengths), "tokens": len(etokens), "blocks": len(ev)},
            "source": manifest["provenance"][d],
        }
    summary = {
        "source": cfg.source,
        "domains": per_domain,
        "train_blocks": sum(len(p) for p in train_parts),
        "block_size": cfg.block_size,
        "balanced": bool(cfg.balance_tokens),
        "balanced_train_tokens_per_domain": budget,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "fingerprint": tokenizer.fingerprint},
        "split_seed": seed,
        "eval_fraction": cfg.eval_fraction,
        "python": manifest["python"],
        "cache": {"dir": corpus, "hit": hit},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("data: %d train blocks, eval %s, tokenizer %s (%s), %s in %.2fs", summary["train_blocks"],
             {d: len(b) for d, b in eval_blocks.items()}, tokenizer.name, tokenizer.fingerprint,
             "cache hit" if hit else "built", summary["build_seconds"])
    if mix is not None:
        summary["mix"] = mix.describe()
    return DataBundle(tokenizer=tokenizer, train=PackedBlocks.concat(train_parts), eval=eval_blocks, summary=summary,
                      train_by_domain=dict(zip(domains, train_parts, strict=True)), mix=mix)
