"""Local text files: every supported format read in a deterministic order, every user mistake one actionable line."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from data import sources
from data.config import DataConfig, DomainConfig
from data.sources import hub
from data.sources.local_files import SUPPORTED, expand_paths, local_documents, local_signature
from trainer.base.errors import UserError

KEY = "data.domains.math.paths"


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def docs(patterns, fields=("text",)):
    return list(local_documents(KEY, [str(p) for p in patterns], list(fields)))


def test_jsonl_fields_joined_blank_lines_and_empty_documents_skipped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "1+1?", "answer": "2"},
        "",
        "   ",
        {"question": "only a question", "answer": None},
        {"question": "", "answer": "only an answer"},
        {"question": "  ", "answer": ""},  # whitespace-only document: skipped
        {"answer": "3", "other": 1},  # one of the fields present is enough
    ])
    assert docs([path], ["question", "answer"]) == ["1+1?\n2", "only a question", "only an answer", "3"]


def test_gz_variants_and_txt_md_are_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "zipped line"}], opener=gzip.open)
    write_jsonl(tmp_path / "b.json", [{"text": "json lines"}])
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped\ntext file\n")
    (tmp_path / "d.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    (tmp_path / "e.txt").write_bytes(b"line one\nline two \xff\n")  # a bad byte is replaced, not fatal
    (tmp_path / "f.txt").write_text(" \n\t\n", encoding="utf-8")  # whitespace-only: skipped
    assert docs([tmp_path]) == ["zipped line", "json lines", "zipped\ntext file\n", "# Title\n\nbody\n",
                                "line one\nline two \ufffd\n"]


def test_directory_and_glob_expansion_is_sorted_recursive_and_keeps_pattern_order(tmp_path):
    for rel in ["b/2.jsonl", "b/1.txt", "a/z/3.md", "a/0.jsonl", "b/notes.csv", "b/.hidden.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x", encoding="utf-8")
    got = [os.path.relpath(p, tmp_path) for p in expand_paths(KEY, [str(tmp_path / "b"), str(tmp_path / "a")])]
    # Unsupported and hidden files under a directory are skipped; each pattern sorted, pattern order kept.
    assert got == ["b/1.txt", "b/2.jsonl", "a/0.jsonl", "a/z/3.md"]
    rec = expand_paths(KEY, [str(tmp_path / "**" / "*.jsonl")])
    assert [os.path.relpath(p, tmp_path) for p in rec] == ["a/0.jsonl", "b/2.jsonl"]
    assert all(os.path.isabs(p) for p in rec)
    assert expand_paths(KEY, [str(tmp_path / "**" / "*.jsonl")]) == rec  # deterministic


def test_overlapping_patterns_read_each_file_once(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "A"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "B"}])
    assert docs([a, tmp_path / "*.jsonl", tmp_path, a]) == ["A", "B"]


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "home.jsonl", [{"text": "from home"}])
    assert docs(["~/home.jsonl"]) == ["from home"]


def test_unsupported_suffix_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.csv.*\.jsonl") as err:
        expand_paths(KEY, [str(tmp_path / "data.csv")])
    assert KEY in str(err.value)
    with pytest.raises(UserError, match="unsupported suffix"):
        expand_paths(KEY, [str(tmp_path / "*")])  # a glob that catches an unsupported file is an error too


def test_nothing_matched_and_empty_patterns_are_errors(tmp_path):
    pattern = str(tmp_path / "missing" / "*.jsonl")
    with pytest.raises(UserError) as err:
        expand_paths(KEY, [pattern])
    msg = str(err.value)
    assert KEY in msg and pattern in msg and all(s in msg for s in SUPPORTED)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="matches no"):
        expand_paths(KEY, [str(tmp_path / "empty")])
    with pytest.raises(UserError, match=rf"{KEY} is empty"):
        expand_paths(KEY, [])
    with pytest.raises(UserError, match="matches no"):
        next(local_documents(KEY, [pattern], ["text"]))  # before any file is read


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", "{not json", {"text": "never reached"}])
    with pytest.raises(UserError, match=r"bad\.jsonl line 3 is invalid JSON") as err:
        docs([path])
    assert KEY in str(err.value)
    path = write_jsonl(tmp_path / "list.json", [["a", "b"]])
    with pytest.raises(UserError, match=r"line 1 is a JSON list, not an object"):
        docs([path])


def test_missing_field_lists_available_keys(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(UserError, match=r"a\.jsonl line 2 has none of text_fields=\['text'\]; its keys: body, title"):
        docs([path])
    with pytest.raises(UserError, match="text_fields is empty"):
        docs([path], [])


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 2500  # more than one 1024-row batch
    table = pa.table({"title": [f"t{i}" for i in range(n)],
                      "body": [None if i == 1 else ("" if i == 2 else f"b{i}") for i in range(n)],
                      "id": list(range(n))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=700)
    got = docs([tmp_path / "a.parquet"], ["title", "body"])
    assert len(got) == n and got[:4] == ["t0\nb0", "t1", "t2", "t3\nb3"] and got[-1] == f"t{n - 1}\nb{n - 1}"
    with pytest.raises(UserError, match=r"has no column 'text'.*its columns: title, body, id"):
        docs([tmp_path / "a.parquet"], ["text"])


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UserError, match=r'reading parquet needs pyarrow: pip install -e "\.\[hub\]"'):
        docs([tmp_path / "a.parquet"])


def test_corrupt_gzip_is_a_user_error(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"could not read .*a\.jsonl\.gz"):
        docs([tmp_path])


def test_signature_tracks_paths_and_sizes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "A"}])
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    sig = local_signature(KEY, [str(tmp_path)])
    assert sig == [[os.path.abspath(a), os.path.getsize(a)], [str(tmp_path / "b.txt"), 3]]
    assert json.loads(json.dumps(sig)) == sig  # stored in a JSON sidecar as-is
    assert local_signature(KEY, [str(tmp_path)]) == sig
    write_jsonl(tmp_path / "a.jsonl", [{"text": "A"}, {"text": "more"}])
    assert local_signature(KEY, [str(tmp_path)]) != sig


# github-code-like rows, as polyglu-mix's code domain reads them with filter {language: Python}.
CODE_ROWS = [{"code": "print(1)", "language": "Python", "stars": 3}, {"code": "int x;", "language": "C", "stars": 3},
             {"code": "no language", "stars": 3}, {"code": "x = 2", "language": "Python", "stars": 4},
             {"code": "   ", "language": "Python", "stars": 3}]


def code_cfg(path, row_filter) -> DataConfig:
    return DataConfig(name="local", source="local", domains={
        "code": DomainConfig(paths=[str(path)], text_fields=["code"], filter=dict(row_filter))})


@pytest.mark.parametrize("row_filter", [{"language": "Python"}, {"language": "Python", "stars": "3"}, {}])
def test_filter_keeps_the_rows_the_hub_source_keeps_from_jsonl_and_parquet(tmp_path, monkeypatch, row_filter):
    """data.source=local is polyglu-mix's offline way: its code domain must stay Python-only there too."""
    monkeypatch.setattr(hub, "_load_stream", lambda domain, dcfg: iter(CODE_ROWS))
    wanted = list(hub.hub_documents("code", DomainConfig(dataset="x", text_fields=["code"], filter=row_filter)))
    assert len(wanted) == {0: 4, 1: 2, 2: 1}[len(row_filter)]  # stars=3 is matched as the string "3"

    jsonl = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    assert list(sources.domain_documents(code_cfg(jsonl, row_filter), "code")) == wanted
    docs_by_domain, prov = sources.load_documents(code_cfg(jsonl, row_filter))  # the memory format
    assert docs_by_domain["code"] == wanted and prov["code"].get("filter", {}) == row_filter
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(CODE_ROWS), tmp_path / "code.parquet")
    assert list(sources.domain_documents(code_cfg(tmp_path / "code.parquet", row_filter), "code")) == wanted


def test_filter_on_files_without_the_field_is_refused(tmp_path):
    (tmp_path / "a.py.txt").write_text("print(1)\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.domains\.code\.filter=.*a\.py\.txt, which is plain text.*no fields"):
        list(sources.domain_documents(code_cfg(tmp_path, {"language": "Python"}), "code"))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"code": ["x = 1"]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet has no column 'language' \(filter=.*its columns: code"):
        list(sources.domain_documents(code_cfg(tmp_path / "b.parquet", {"language": "Python"}), "code"))


def test_filter_is_part_of_the_local_source_signature(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    plain = sources.domain_signature(code_cfg(path, {}), "code")
    python = sources.domain_signature(code_cfg(path, {"language": "Python"}), "code")
    assert python != plain and python["filter"] == {"language": "Python"}
    assert "filter" not in plain  # shards and caches written before filters applied stay valid without one
    assert sources.signature(code_cfg(path, {"language": "C"})) != sources.signature(code_cfg(path, {}))


def test_the_corpus_key_reads_the_code_of_every_source_module(tmp_path, monkeypatch):
    """A change to any source's code (data/sources/*.py) must rebuild cached corpora: the key hashes them all."""
    import builtins

    path = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    read, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: read.append(str(file)) or real_open(file, *a, **k))
    sources.signature(code_cfg(path, {}))
    here = os.path.dirname(sources.__file__)
    assert {p for p in read if p.endswith(".py")} == {os.path.join(here, f) for f in os.listdir(here)
                                                       if f.endswith(".py")}
