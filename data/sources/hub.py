"""Hugging Face dataset domains (`data.source=hub`), streamed so only the first size_mb are fetched."""

from __future__ import annotations

from collections.abc import Iterator

from trainer.base.errors import UserError
from trainer.base.hub import require_hub

from ..config import DomainConfig
from .local_files import kept


def check_reachable(domain: str, dcfg: DomainConfig) -> None:
    """Fail in seconds, naming the dataset and what works offline, instead of `datasets` retrying for a minute."""
    # A generic loader (`parquet`, `json`) names nothing by itself: the hub files it reads are the news.
    detail = f" reading data_files={list(dcfg.data_files)}" if dcfg.data_files else ""
    require_hub(f"data.domains.{domain}.dataset", dcfg.dataset, f"offline, use local files instead "
                f"(data.source=local data.domains.{domain}.paths=[...], jsonl, txt or parquet) or data=embedded",
                detail)


def _load_stream(domain: str, dcfg: DomainConfig):
    key = f"data.domains.{domain}.dataset"
    check_reachable(domain, dcfg)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{key}={dcfg.dataset!r} needs the optional `datasets` package; "
                        'pip install -e ".[hub]" (or train offline with data=embedded)') from None
    try:
        files = {"data_files": list(dcfg.data_files)} if dcfg.data_files else {}
        return datasets.load_dataset(dcfg.dataset, dcfg.config, split=dcfg.split, streaming=True, **files)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{key}={dcfg.dataset!r} (config={dcfg.config!r}, split={dcfg.split!r}) could not be "
                        f"opened: {first}") from None


def hub_documents(domain: str, dcfg: DomainConfig) -> Iterator[str]:
    """Rows in the dataset's own order, `text_fields` joined with newlines; empty rows and rows whose
    `filter` columns differ from the wanted values (github-code: language=Python) skipped."""
    fields = list(dcfg.text_fields)
    if not fields:
        raise UserError(f"data.domains.{domain}.text_fields is empty; name the column(s) holding the text")
    for row in _load_stream(domain, dcfg):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UserError(f"data.domains.{domain}.text_fields={fields} names {missing[0]!r}, which "
                            f"{dcfg.dataset!r} rows lack; available columns: {', '.join(sorted(row))}")
        if not kept(row, dcfg.filter):
            continue
        text = "\n".join(str(row[f]) for f in fields if row[f] is not None and str(row[f]).strip())
        if text.strip():
            yield text


def provenance(domain: str, dcfg: DomainConfig) -> dict:
    return {"origin": f"Hugging Face dataset {dcfg.dataset}", "config": dcfg.config, "split": dcfg.split,
            "data_files": list(dcfg.data_files), "text_fields": list(dcfg.text_fields), "filter": dict(dcfg.filter),
            "licence": "see the dataset card on huggingface.co (not checked by this trainer)"}
