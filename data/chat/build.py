"""data.chat=true: conversations -> train/eval split (whole conversations) -> tokenizer with the chat markers ->
ids and assistant masks (cached) -> blocks with labels, packed best fit decreasing."""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from trainer.base.errors import UserError

from .. import sources
from ..bundle import DataBundle
from ..cache import digest, load_array, load_json, save_array, save_json
from ..config import DataConfig
from ..memory import SPLITS, cached_tokenizer, split_documents, tokenizer_key, tokenizer_record
from ..packing import PackedBlocks, pack_conversations
from ..streams.schedule import MixSchedule
from ..tokenizer import TextTokenizer, build_tokenizer
from .format import encode_conversations, ensure_chat_markers
from .sources import code_signature, load_conversations, where

log = logging.getLogger(__name__)

CHAT_FORMAT = 1  # bump when the cached arrays' meaning changes


def _corpus_dir(cfg: DataConfig, seed: int) -> str:
    fields = {d: cfg.domains[d].messages_field for d in sorted(cfg.domains)}
    key = digest("chat", CHAT_FORMAT, sources.signature(cfg), fields, code_signature(), cfg.eval_fraction, seed,
                 tokenizer_key(cfg))
    return os.path.join(cfg.cache_dir, "chat", key)


def _flat(encoded: list[tuple[list[int], list[bool]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    ids = np.fromiter((t for i, _ in encoded for t in i), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for _, ms in encoded for m in ms), dtype=bool, count=int(lengths.sum()))
    return ids, mask, lengths


def _split(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    ends = np.cumsum(lengths)
    return [(ids[e - n:e], mask[e - n:e]) for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)]


def _load_cached(cfg: DataConfig, corpus: str) -> tuple[TextTokenizer, dict, dict] | None:
    manifest_path = os.path.join(corpus, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    manifest = load_json(manifest_path)
    tok_info = manifest["tokenizer"]
    tokenizer = cached_tokenizer(cfg, tok_info)
    if tokenizer is None:
        return None
    ensure_chat_markers(tokenizer)
    if tokenizer.fingerprint != tok_info["fingerprint"]:
        log.info("tokenizer %s changed since the conversations were cached; re-tokenizing", cfg.tokenizer.name)
        return None
    streams = {}
    try:
        for domain in manifest["domains"]:
            for split in SPLITS:
                base = os.path.join(corpus, f"{domain}.{split}")
                streams[domain, split] = _split(load_array(base + ".ids.npy"), load_array(base + ".mask.npy"),
                                                load_array(base + ".lengths.npy"))
    except (OSError, ValueError):
        return None
    return tokenizer, streams, manifest


def _build(cfg: DataConfig, seed: int, corpus: str) -> tuple[TextTokenizer, dict, dict]:
    convs, provenance = {}, {}
    for d in sources.check_domains(cfg):
        convs[d], provenance[d] = load_conversations(cfg, d)
    splits = {d: split_documents(c, cfg.eval_fraction, seed, d, cfg.size_mb, cfg.source) for d, c in convs.items()}
    train_texts = [c.text for d in sorted(splits) for c in splits[d][0]]
    tokenizer, tok_file = build_tokenizer(cfg.tokenizer, cfg.cache_dir, train_texts)
    added = ensure_chat_markers(tokenizer)
    streams, counts = {}, {}
    for domain, parts in splits.items():
        counts[domain] = {"conversations_with_tool_calls": sum(c.tool_turns > 0 for c in convs[domain]),
                          "skipped_tool_turns": sum(c.tool_turns for c in convs[domain])}
        for split, part in zip(SPLITS, parts, strict=True):
            ids, mask, lengths = _flat(encode_conversations(tokenizer, [c.turns for c in part]))
            base = os.path.join(corpus, f"{domain}.{split}")
            save_array(base + ".ids.npy", ids)
            save_array(base + ".mask.npy", mask)
            save_array(base + ".lengths.npy", lengths)
            streams[domain, split] = _split(ids, mask, lengths)
    manifest = {
        "domains": sorted(splits),
        "provenance": provenance,
        "counts": counts,
        "tokenizer": {**tokenizer_record(tokenizer, tok_file, cfg.cache_dir), "markers_added": added},
        "python": sys.version.split()[0],
    }
    save_json(os.path.join(corpus, "manifest.json"), manifest)  # written last: its presence means complete
    return tokenizer, streams, manifest


def _eval_prefix(convs: list, block_size: int, max_blocks: int) -> list:
    """The held-out conversations, in their random split order, up to about max_blocks blocks' worth (an eval
    pass costs the same whatever the corpus size; packing all and keeping the first blocks would favour long
    conversations, which best fit decreasing places first)."""
    budget, total = max_blocks * block_size, 0
    for i, (ids, _) in enumerate(convs):
        total += min(len(ids), block_size)
        if total > budget:
            return convs[:i + 1]
    return convs


def build_chat_data(cfg: DataConfig, seed: int, mix: MixSchedule | None) -> DataBundle:
    """The tokenizer (with the chat markers), training blocks with labels and per-domain eval blocks."""
    start = time.perf_counter()
    domains = sources.check_domains(cfg)
    corpus = _corpus_dir(cfg, seed)
    cached = _load_cached(cfg, corpus)
    hit = cached is not None
    tokenizer, streams, manifest = cached if cached is not None else _build(cfg, seed, corpus)

    train_parts, eval_blocks, per_domain = {}, {}, {}
    for d in domains:
        train, train_stats = pack_conversations(streams[d, "train"], cfg.block_size, tokenizer.eos_id, d, domains)
        held_out = _eval_prefix(streams[d, "eval"], cfg.block_size, cfg.max_eval_blocks)
        ev, eval_stats = pack_conversations(held_out, cfg.block_size, tokenizer.eos_id, d, domains,
                                            max_blocks=cfg.max_eval_blocks)
        if len(train) == 0 or len(ev) == 0:
            which, stats = ("training", train_stats) if len(train) == 0 else ("eval", eval_stats)
            raise UserError(f"{where(cfg, d)} leaves domain {d!r} no {which} conversation with an assistant token "
                            f"({stats['conversations']} held, {stats['dropped_no_assistant']} without one after "
                            f"cutting to data.block_size={cfg.block_size}); raise data.size_mb or data.block_size")
        train_parts[d] = train
        eval_blocks[d] = ev
        per_domain[d] = {"train": train_stats, "eval": eval_stats, **manifest["counts"][d],
                         "source": manifest["provenance"][d]}
    budget = min(len(p) for p in train_parts.values()) if cfg.balance_tokens else None
    if budget is not None:  # conversations are packed whole: balancing keeps equal numbers of (full) blocks
        train_parts = {d: p.head(budget) for d, p in train_parts.items()}
        for d in domains:
            per_domain[d]["train"]["blocks_after_balance"] = budget
    n_train = sum(len(p) for p in train_parts.values())
    real = sum(s["train"]["tokens"] for s in per_domain.values())
    summary = {
        "source": cfg.source,
        "chat": True,
        "chat_format": "chatml",
        "chat_markers_added": manifest["tokenizer"]["markers_added"],
        "domains": per_domain,
        "train_blocks": n_train,
        "block_size": cfg.block_size,
        "packing_efficiency": round(real / (sum(s["train"]["blocks"] for s in per_domain.values())
                                            * cfg.block_size), 4),
        "balanced": bool(cfg.balance_tokens),
        "balanced_train_blocks_per_domain": budget,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "fingerprint": tokenizer.fingerprint},
        "split_seed": seed,
        "eval_fraction": cfg.eval_fraction,
        "python": manifest["python"],
        "cache": {"dir": corpus, "hit": hit},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("chat data: %d train blocks (packing efficiency %.3f), eval %s, tokenizer %s (%s), %s in %.2fs",
             n_train, summary["packing_efficiency"], {d: len(b) for d, b in eval_blocks.items()}, tokenizer.name,
             tokenizer.fingerprint, "cache hit" if hit else "built", summary["build_seconds"])
    if mix is not None:
        summary["mix"] = mix.describe()
    return DataBundle(tokenizer=tokenizer, train=PackedBlocks.concat(list(train_parts.values())), eval=eval_blocks,
                      summary=summary, train_by_domain=train_parts, mix=mix)
