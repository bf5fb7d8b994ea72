"""Text documents from local files: JSON Lines, plain text / Markdown and Parquet, optionally gzipped.

Standard library only at import time; pyarrow is imported inside the Parquet reader, so configs that never
name a .parquet file do not need it. Every mistake a user can make in the paths or text_fields surfaces as a
one-line UserError naming the config key, the value and what would work.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping

from trainer.base.errors import UserError

SUPPORTED = (".jsonl", ".jsonl.gz", ".json", ".txt", ".txt.gz", ".md", ".parquet")
_JSONL = (".jsonl", ".jsonl.gz", ".json")
_TEXT = (".txt", ".txt.gz", ".md")


def _suffix(path: str) -> str | None:
    # Longest first, so "x.jsonl.gz" is .jsonl.gz rather than unsupported ".gz"; case-insensitive for *.JSONL.
    name = os.path.basename(path).lower()
    return next((s for s in sorted(SUPPORTED, key=len, reverse=True) if name.endswith(s)), None)


def _under(directory: str) -> list[str]:
    # Hidden entries (.git, .cache, editor swap files) are skipped, as glob's "*" skips them. Symlinked
    # directories are followed (corpora are often assembled from links) but each real directory is walked once,
    # so a link cycle cannot loop forever.
    found, walked = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and _suffix(f)]
    return found


def expand_paths(key: str, patterns: list[str]) -> list[str]:
    """Files named by `patterns`: plain files, glob patterns (recursive ** allowed, ~ expanded) or directories
    (every supported file under them, recursively). Sorted per pattern, duplicates dropped keeping the first,
    order of patterns kept. UserError (mentioning `key`, the pattern and the supported suffixes) when a pattern
    matches nothing or names a file with an unsupported suffix; UserError when `patterns` is empty."""
    if isinstance(patterns, str):  # a YAML scalar where a list was meant: one pattern, not one per character
        patterns = [patterns]
    patterns = list(patterns or [])
    supported = ", ".join(SUPPORTED)
    if not patterns:
        raise UserError(f"{key} is empty; list files, directories or glob patterns ({supported})")
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        # glob() of a plain path returns it if it exists, so one call covers files, directories and globs.
        files: list[str] = []
        for match in glob.glob(expanded, recursive=True):
            if os.path.isdir(match):
                files += _under(match)
            elif _suffix(match):
                files.append(match)
            else:
                named = "names" if match == expanded else f"matches {match!r}, which has"
                raise UserError(f"{key}: {pattern!r} {named} an unsupported suffix; name only {supported} files "
                                "(convert it, or narrow a glob to e.g. *.jsonl)")
        if not files:
            raise UserError(f"{key}: {pattern!r} matches no {supported} file (cwd {os.getcwd()}); "
                            "check the path, or use an absolute path or a glob such as dir/**/*.jsonl")
        for path in sorted(os.path.abspath(f) for f in files):
            # realpath: the same file reached through a symlink or two overlapping patterns is read once.
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                out.append(path)
    return out


def open_text(path: str):
    # utf-8-sig drops a leading BOM (which would break json.loads on line 1); errors="replace" keeps a stray
    # bad byte from stopping a long tokenization.
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _join(values: Iterable) -> str:
    return "\n".join(s for s in (None if v is None else str(v) for v in values) if s)


def kept(row: Mapping, row_filter: Mapping) -> bool:
    """A domain's `filter`: keep a row whose every named field equals the wanted value, compared as strings
    (a YAML 3 matches a column's 3). A row lacking the field compares as "None". The hub source uses this
    too, so data.source=local keeps exactly the rows the hub path would."""
    return all(str(row.get(k)) == str(v) for k, v in row_filter.items())


def _filter_key(key: str) -> str:
    return key.removesuffix(".paths") + ".filter"  # key is data.domains.<d>.paths


def _jsonl_documents(key: str, path: str, fields: list[str], row_filter: Mapping) -> Iterator[str]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row, why = None, f"invalid JSON ({err.msg} at column {err.colno})"
            else:
                why = f"a JSON {type(row).__name__}, not an object"
            if not isinstance(row, dict):
                raise UserError(f"{key}: {path} line {lineno} is {why}; {os.path.basename(path)} is read as "
                                "JSON Lines: one {...} object per line")
            if not any(k in row for k in fields):
                raise UserError(f"{key}: {path} line {lineno} has none of text_fields={fields}; "
                                f"its keys: {', '.join(sorted(map(str, row))) or '(none)'}")
            if kept(row, row_filter):
                yield _join(row.get(k) for k in fields)


def _parquet_documents(key: str, path: str, fields: list[str], row_filter: Mapping) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{key}: {path} is Parquet; reading parquet needs pyarrow: "
                        'pip install -e ".[hub]"') from None
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    missing = [c for c in fields if c not in columns]
    if missing:
        # Unlike a JSON line, every row shares the schema: a missing column is a config mistake, not a bad row.
        raise UserError(f"{key}: {path} has no column {missing[0]!r} (text_fields={fields}); "
                        f"its columns: {', '.join(columns)}")
    missing = [c for c in row_filter if c not in columns]
    if missing:  # the hub path would drop every row here; a shared schema makes it a config mistake
        raise UserError(f"{_filter_key(key)}: {path} has no column {missing[0]!r} (filter={dict(row_filter)}); "
                        f"its columns: {', '.join(columns)}")
    read = list(dict.fromkeys([*fields, *row_filter]))
    for batch in pf.iter_batches(columns=read, batch_size=1024):
        cols = {c: batch.column(c).to_pylist() for c in read}
        for i in range(batch.num_rows):
            if kept({c: cols[c][i] for c in row_filter}, row_filter):
                yield _join(cols[c][i] for c in fields)


def _text_document(path: str) -> Iterator[str]:
    with open_text(path) as f:
        yield f.read()


def local_documents(key: str, patterns: list[str], text_fields: list[str],
                    row_filter: Mapping | None = None) -> Iterator[str]:
    """Documents in a deterministic order (file order of expand_paths, then order inside each file):
    - .jsonl / .jsonl.gz / .json (JSON Lines: one object per line; blank lines skipped): one document per line,
      the `text_fields` values (skipping None/empty) joined with "\\n". A line that is not a JSON object, or lacks
      every one of text_fields -> UserError naming the file, the line number, and the keys it does have.
    - .txt / .txt.gz / .md: the whole file is one document (utf-8, errors="replace").
    - .parquet: one document per row, text_fields columns joined like jsonl (pyarrow imported lazily).
    Documents whose text is empty or whitespace-only are skipped. `row_filter` keeps only the JSON Lines /
    Parquet rows that kept() accepts; a filter over plain-text files, which have no fields, is a UserError."""
    paths = expand_paths(key, patterns)  # eager: a bad pattern fails before any tokenization starts
    fields = [str(f) for f in (text_fields or [])]
    row_filter = dict(row_filter or {})
    structured = [p for p in paths if _suffix(p) not in _TEXT]
    if structured and not fields:
        raise UserError(f"text_fields is empty but {key} names {structured[0]}; "
                        "name the JSON key(s) / Parquet column(s) holding the text, e.g. [text]")
    plain = [p for p in paths if _suffix(p) in _TEXT]
    if row_filter and plain:  # reading them unfiltered would mix in exactly the text the filter is there to drop
        raise UserError(f"{_filter_key(key)}={row_filter} keeps rows by their fields, but {key} names {plain[0]}, "
                        "which is plain text (one document per file, no fields); name only .jsonl / .parquet "
                        "files there, or remove the filter")
    for path in paths:
        suffix = _suffix(path)
        if suffix in _JSONL:
            docs = _jsonl_documents(key, path, fields, row_filter)
        elif suffix in _TEXT:
            docs = _text_document(path)
        else:
            docs = _parquet_documents(key, path, fields, row_filter)
        try:
            for doc in docs:
                if doc.strip():
                    yield doc
        # Truncated or corrupt .gz, unreadable file, not-really-Parquet (pyarrow's ArrowInvalid is a ValueError).
        except (OSError, EOFError, ValueError) as err:
            raise UserError(f"{key}: could not read {path}: {err}; re-create or remove the file") from None


def local_signature(key: str, patterns: list[str]) -> list:
    """[[absolute path, size in bytes], ...] for expand_paths(key, patterns): cheap identity of the inputs, so a
    resumed tokenization can refuse inputs that changed."""
    return [[os.path.abspath(p), os.path.getsize(p)] for p in expand_paths(key, patterns)]
