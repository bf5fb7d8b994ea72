"""Conversations per domain for data.chat=true: the generated math problems (embedded), local JSON Lines with a
list of {role, content} turns per row (data.domains.<d>.messages_field), or a hub dataset with such a column."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from trainer.base.errors import UserError
from trainer.base.hub import require_hub

from .. import sources
from ..config import DataConfig
from ..sources import hub, local_files, math_problems
from .format import ASSISTANT, Turn, read_messages, render

_JSONL = (".jsonl", ".jsonl.gz", ".json")
OFFLINE_ALTERNATIVE = ("offline, use data=sft-local data.domains.chat.paths=[conversations.jsonl] (JSON Lines, a "
                       "messages list of {role, content} turns per line) or data=sft-math (generated, offline)")


class Conversation:
    """A conversation's turns, how many tool turns were skipped from it, and its ChatML text."""

    __slots__ = ("turns", "tool_turns", "text")

    def __init__(self, turns: list[Turn], tool_turns: int = 0) -> None:
        self.turns = turns
        self.tool_turns = tool_turns
        self.text = render(turns)


def _math(max_bytes: int) -> Iterator[Conversation]:
    for question, solution, _ in math_problems.math_conversations(2 * max_bytes + 10_000):
        yield Conversation([("user", question), (ASSISTANT, solution)])


def _rows_conversations(rows: Iterator[tuple[str, object]], field: str, key: str) -> Iterator[Conversation]:
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{key}: {where} is a JSON {type(row).__name__}, not an object with a {field!r} list")
        if field not in row:
            raise UserError(f"{key}: {where} has no {field!r} (messages_field={field!r}); its keys: "
                            f"{', '.join(sorted(map(str, row))) or '(none)'}")
        turns, skipped = read_messages(row[field], f"{key}: {where} {field}")
        yield Conversation(turns, skipped)


def _jsonl_rows(key: str, path: str, row_filter: dict) -> Iterator[tuple[str, object]]:
    try:
        with local_files.open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{key}: {path} line {lineno} is invalid JSON ({err.msg} at column {err.colno}); "
                                    "conversations are read as JSON Lines: one {...} object per line") from None
                if not isinstance(row, dict) or local_files.kept(row, row_filter):
                    yield f"{path} line {lineno}", row
    except (OSError, EOFError) as err:
        raise UserError(f"{key}: could not read {path}: {err}; re-create or remove the file") from None


def _local(cfg: DataConfig, domain: str) -> Iterator[Conversation]:
    d = cfg.domains[domain]
    key = sources.paths_key(domain)
    paths = local_files.expand_paths(key, list(d.paths))
    other = [p for p in paths if not p.lower().endswith(_JSONL)]
    if other:
        raise UserError(f"{key}: {other[0]} is not JSON Lines; data.chat=true reads {', '.join(_JSONL)} files with "
                        f"a {d.messages_field!r} list of {{role, content}} turns per line")
    for path in paths:
        yield from _rows_conversations(_jsonl_rows(key, path, dict(d.filter)), d.messages_field, key)


def _hub(cfg: DataConfig, domain: str) -> Iterator[Conversation]:
    d = cfg.domains[domain]
    key = f"data.domains.{domain}.dataset"
    require_hub(key, d.dataset, OFFLINE_ALTERNATIVE)  # before `datasets`' own minute of retries
    stream = hub._load_stream(domain, d)  # the hub source's loader, shared
    rows = ((f"{d.dataset} row {i}", row) for i, row in enumerate(stream) if local_files.kept(row, d.filter))
    yield from _rows_conversations(rows, d.messages_field, key)


def where(cfg: DataConfig, domain: str) -> str:
    """What a domain's conversations are read from, for messages."""
    d = cfg.domains[domain]
    if cfg.source == "local":
        return f"{sources.paths_key(domain)}={list(d.paths)}"
    if cfg.source == "hub":
        return f"data.domains.{domain}.dataset={d.dataset!r} (split {d.split!r})"
    return f"the embedded {domain} problems"


def load_conversations(cfg: DataConfig, domain: str) -> tuple[list[Conversation], dict]:
    """Distinct conversations in the source's order until data.size_mb of ChatML text, and their provenance.
    Exact duplicates are skipped (a copy each side of the train/eval split would leak). UserError when none has
    an assistant turn."""
    max_bytes = int(cfg.size_mb * 1_000_000)
    if cfg.source == "embedded":
        stream, prov = _math(max_bytes), {**math_problems.provenance(), "chat_seed": math_problems.CHAT_SEED}
    elif cfg.source == "local":
        d = cfg.domains[domain]
        stream = _local(cfg, domain)
        prov = {"origin": "local files", "files": local_files.expand_paths(sources.paths_key(domain), list(d.paths)),
                "licence": "the files' own (not checked by this trainer)"}
    else:
        stream, prov = _hub(cfg, domain), hub.provenance(domain, cfg.domains[domain])
        prov.pop("text_fields", None)
    prov["messages_field"] = cfg.domains[domain].messages_field
    out, size, seen = [], 0, set()
    for conv in stream:
        data = conv.text.encode("utf-8", "surrogatepass")
        fingerprint = hashlib.sha1(data).digest()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        out.append(conv)
        size += len(data)
        if size >= max_bytes:
            break
    if not any(role == ASSISTANT for c in out for role, _ in c.turns):
        raise UserError(f"{where(cfg, domain)} holds no usable conversation ({len(out)} read, none with an "
                        f"assistant turn outside tool calls); data.chat=true needs rows whose "
                        f"{cfg.domains[domain].messages_field!r} list has role user/assistant turns")
    prov["conversations"] = len(out)
    prov["text_bytes"] = size
    if size < 0.9 * max_bytes:
        prov["note"] = f"source exhausted below data.size_mb={cfg.size_mb}"
    return out, prov


def code_signature() -> str:
    """The chat code that decides the conversations' text and tokens, for the cache key."""
    h = hashlib.sha256()
    here = os.path.dirname(__file__)
    for name in ("format.py", "sources.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]
