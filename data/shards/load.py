"""data.format=shards: open each domain's token shards and check they were made with this run's tokenizer and
the data settings that decide their tokens (source, budget, eval split)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from trainer.base.errors import UserError

from .. import sources
from ..bundle import DataBundle
from ..config import DataConfig
from ..streams.schedule import MixSchedule
from ..tokenizer import TextTokenizer, load_named_tokenizer
from .store import ShardBlocks, ShardSet
from .tokenize import (
    LAYOUT_ONLY,
    domain_dir,
    settings_differences,
    shard_settings,
    shards_root,
    tokenize_command,
)

log = logging.getLogger(__name__)


def check_settings(cfg: DataConfig, domain: str, shard_set: ShardSet, tokenizer: TextTokenizer) -> None:
    """Refuse shards written from other data settings: the directory is keyed by data.name alone, so every
    data=local corpus shares one, and training must not read another corpus's tokens in silence."""
    recorded = shard_set.index["settings"]
    try:
        wanted = shard_settings(cfg, domain, tokenizer)
    except UserError as err:
        if cfg.source != "local":
            raise
        # Shards are often tokenized where the raw files live and copied to where training runs, which may not
        # have them: check every other setting, and say that the files could not be.
        log.warning("domain %r: the shards in %s cannot be checked against its source files here (%s); trusting "
                    "they were made from them", domain, shard_set.directory, err)
        wanted = shard_settings(cfg, domain, tokenizer, local_files_seen=recorded["source"].get("files"))
    changed = settings_differences(_portable(recorded), _portable(wanted), ignore=("tokenizer", *LAYOUT_ONLY))
    if changed:
        # A concrete directory to paste (a placeholder such as <new> would be a shell redirect), named by
        # these settings so the same command always suggests the same place.
        digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
        elsewhere = f"{shards_root(cfg)}-{digest}"
        raise UserError(f"the shards of domain {domain!r} in {shard_set.directory} were tokenized from other data "
                        f"settings than this run's: {'; '.join(changed)}; train with the data.* settings they were "
                        "made with, or tokenize this run's settings into another directory and train with the same "
                        f"data.shards_dir: {tokenize_command(cfg, elsewhere)}")


def _portable(settings: dict) -> dict:
    """Local source files compared by name and size, not directory: shards and their raw files may be copied
    together to another machine or path, and that is the same corpus."""
    source = settings.get("source") or {}
    if source.get("source") != "local" or not source.get("files"):
        return settings
    return {**settings, "source": {**source, "files": [[os.path.basename(path), size]
                                                       for path, size in source["files"]]}}


def build_shard_data(cfg: DataConfig, mix: MixSchedule | None) -> DataBundle:
    start = time.perf_counter()
    domains = sources.check_domains(cfg)
    if cfg.balance_tokens:
        # Set by the MoE presets for the in-memory corpus; with shards it would silently not happen.
        log.warning("data.balance_tokens=true applies to data.format=memory and is ignored with shards: cap each "
                    "domain with data.domains.<d>.max_tokens when tokenizing, or weigh domains with data.mix")
    hint = tokenize_command(cfg)
    # Shards first: a missing one says how to make it before a hub tokenizer can fail offline.
    shard_sets = {d: ShardSet(domain_dir(cfg, d), f"data.domains.{d}", hint) for d in domains}
    tokenizer = load_named_tokenizer(cfg.tokenizer)
    train, evals, per_domain = {}, {}, {}
    for d, shard_set in shard_sets.items():
        made_with = shard_set.tokenizer
        if made_with["fingerprint"] != tokenizer.fingerprint:
            raise UserError(f"the shards of domain {d!r} in {shard_set.directory} were tokenized with "
                            f"{made_with['name']!r} (fingerprint {made_with['fingerprint']}), but this run's "
                            f"data.tokenizer.name={cfg.tokenizer.name!r} is {tokenizer.fingerprint}; use the "
                            "tokenizer the shards were made with, or tokenize again into another data.shards_dir")
        check_settings(cfg, d, shard_set, tokenizer)
        blocks = ShardBlocks(shard_set, cfg.block_size, d, domains)
        if len(blocks) == 0:
            raise UserError(f"domain {d!r} has {shard_set.num_tokens} training tokens in {shard_set.directory}, "
                            f"less than one block of data.block_size={cfg.block_size}; tokenize more or lower "
                            "data.block_size")
        ev = shard_set.eval_blocks(cfg.block_size, cfg.max_eval_blocks, d, domains)
        if len(ev) == 0:
            raise UserError(f"domain {d!r} has no eval block of data.block_size={cfg.block_size} in "
                            f"{shard_set.directory} (data.eval_tokens was {shard_set.index['settings']['eval_tokens']}"
                            "); tokenize again with a larger data.eval_tokens into another data.shards_dir")
        train[d], evals[d] = blocks, ev
        per_domain[d] = {"directory": shard_set.directory, "shards": len(shard_set.shards),
                         "train_tokens": shard_set.num_tokens, "train_blocks": len(blocks),
                         "train_documents": len(shard_set.doc_starts), "eval_blocks": len(ev),
                         "source": shard_set.index["settings"]["source"]}
    if mix is None:
        # Without a schedule, every training block is equally likely: each domain in proportion to its size.
        mix = MixSchedule.constant({d: float(len(b)) for d, b in train.items()})
    summary = {
        "source": cfg.source, "format": "shards", "domains": per_domain, "block_size": cfg.block_size,
        "train_blocks": sum(len(b) for b in train.values()), "mix": mix.describe(),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "fingerprint": tokenizer.fingerprint},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("data: token shards, %s blocks per domain, tokenizer %s", {d: len(b) for d, b in train.items()},
             tokenizer.name)
    return DataBundle(tokenizer=tokenizer, train=None, eval=evals, summary=summary, train_by_domain=train, mix=mix)
