"""Sources: each domain's documents from the configured source, capped at `data.size_mb` of UTF-8 text each.

The sources themselves: embedded (text installed with Python and the project's dependencies), math_problems
(the generated math domain), local_files (the user's files) and hub (Hugging Face datasets, streamed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from trainer.base.errors import UserError

from ..config import DataConfig
from . import embedded, hub, local_files, math_problems

EMBEDDED_DOMAINS = ("code", "math", "prose")
# Modules whose code decides the documents' text (with this one); their source is part of the cache key.
_TEXT_MODULES = (embedded, math_problems, hub, local_files)
SOURCES = ("embedded", "hub", "local")


def take_until(docs: Iterable[str], max_bytes: int) -> list[str]:
    """Distinct documents in order until `max_bytes`; the one that crosses the cap is cut at a line break.

    Exact duplicates are skipped: a copy on each side of the train/eval split would leak eval text.
    """
    out, size, seen = [], 0, set()
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        fingerprint = hashlib.sha1(data).digest()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        if size + len(data) <= max_bytes:
            out.append(doc)
            size += len(data)
            continue
        head = data[: max_bytes - size].decode("utf-8", "ignore")
        head = head[: head.rfind("\n")] if "\n" in head else ""
        if head.strip():
            out.append(head)
        break
    return out


def check_domains(cfg: DataConfig) -> list[str]:
    names = sorted(cfg.domains)
    if not names:
        raise UserError("data.domains is empty; name at least one domain (for example code, math, prose)")
    if cfg.source == "embedded":
        for name in names:
            if name not in EMBEDDED_DOMAINS:
                raise UserError(f"data.domains.{name} is not an embedded domain; data.source=embedded offers "
                                f"{', '.join(EMBEDDED_DOMAINS)} (or use data.source=hub with a dataset, or "
                                "data.source=local with paths)")
    elif cfg.source not in SOURCES:
        raise UserError(f"data.source={cfg.source!r} is not allowed; choose one of: {', '.join(SOURCES)}")
    return names


def paths_key(domain: str) -> str:
    return f"data.domains.{domain}.paths"


def signature(cfg: DataConfig) -> list:
    """Cheap stand-in for the documents' content, so a cached corpus is found without re-reading the text."""
    code = hashlib.sha256()
    for path in (*(module.__file__ for module in _TEXT_MODULES), __file__):
        with open(path, "rb") as f:
            code.update(f.read())
    sig: list = [cfg.source, cfg.size_mb, code.hexdigest()[:16]]
    if cfg.source == "embedded":
        if any(d in cfg.domains for d in ("code", "prose")):
            sig.append(embedded.source_signature())
        if "prose" in cfg.domains:  # prose reaches into the dependencies' docstrings past the stdlib's
            sig.append(embedded.dependency_signature())
    else:
        sig.append({n: domain_signature(cfg, n) for n in sorted(cfg.domains)})
    return sig


def domain_signature(cfg: DataConfig, domain: str, local_files_seen: list | None = None) -> dict:
    """What identifies one domain's documents: the recipe for hub and embedded text, the files for local.
    `local_files_seen` stands in for a local source's files where they are not on this machine."""
    d = cfg.domains[domain]
    if cfg.source == "local":
        files = local_files_seen if local_files_seen is not None else \
            local_files.local_signature(paths_key(domain), list(d.paths))
        sig = {"source": "local", "files": files, "text_fields": list(d.text_fields)}
        if d.filter:  # only when set, so shards and caches made before local filters applied stay valid
            sig["filter"] = dict(sorted(d.filter.items()))
        return sig
    if cfg.source == "hub":
        # Hub datasets are keyed by name only: delete the cache or shards to pick up upstream changes.
        return {"source": "hub", "dataset": d.dataset, "config": d.config, "split": d.split,
                "data_files": list(d.data_files),
                "text_fields": list(d.text_fields), "filter": dict(sorted(d.filter.items()))}
    return {"source": "embedded", "domain": domain, "size_mb": cfg.size_mb}


def domain_documents(cfg: DataConfig, domain: str) -> Iterator[str]:
    """One domain's documents in their deterministic order, uncapped for hub and local sources (the
    tokenizer's token budget stops reading); embedded text is capped at data.size_mb as in training."""
    d = cfg.domains[domain]
    if cfg.source == "hub":
        return hub.hub_documents(domain, d)
    if cfg.source == "local":
        return local_files.local_documents(paths_key(domain), list(d.paths), list(d.text_fields), dict(d.filter))
    docs, _ = load_documents(cfg, only=domain)
    return iter(docs[domain])


def load_documents(cfg: DataConfig, only: str | None = None) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Return ({domain: documents}, {domain: provenance}), for every domain or just `only`."""
    max_bytes = int(cfg.size_mb * 1_000_000)
    docs: dict[str, list[str]] = {}
    prov: dict[str, dict] = {}
    for name in check_domains(cfg):
        if only is not None and name != only:
            continue
        if cfg.source == "hub":
            docs[name] = take_until(domain_documents(cfg, name), max_bytes)
            prov[name] = hub.provenance(name, cfg.domains[name])
        elif cfg.source == "local":
            d = cfg.domains[name]
            docs[name] = take_until(domain_documents(cfg, name), max_bytes)
            prov[name] = {"origin": "local files", "files": local_files.expand_paths(paths_key(name), list(d.paths)),
                          "text_fields": list(d.text_fields), "licence": "the files' own (not checked by this trainer)"}
            if d.filter:
                prov[name]["filter"] = dict(d.filter)
        elif name == "math":
            docs[name] = take_until(math_problems.math_documents(max_bytes), max_bytes)
            prov[name] = math_problems.provenance()
        elif name == "code":
            docs[name] = take_until(embedded.code_documents(cfg.cache_dir), max_bytes)
            prov[name] = embedded.provenance(name)
        else:
            used: dict[str, int] = {}  # source -> documents yielded, for the provenance record
            docs[name] = take_until(embedded.prose_documents(cfg.cache_dir, used), max_bytes)
            prov[name] = embedded.provenance(name, used)
        prov[name]["documents"] = len(docs[name])
        prov[name]["text_bytes"] = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs[name])
        if prov[name]["text_bytes"] < 0.9 * max_bytes:
            prov[name]["note"] = f"source exhausted below data.size_mb={cfg.size_mb}"
    return docs, prov
