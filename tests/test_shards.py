"""Token shards: the on-disk round trip, resumable tokenization, the memory-mapped block reader, refusals."""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig, DomainConfig, TokenizerConfig
from data.shards import store, tokenize
from data.shards.load import build_shard_data
from data.shards.store import ShardBlocks, ShardSet
from data.streams.mixed import MixedStream
from data.streams.schedule import MixSchedule
from data.tokenizer import load_gpt2
from trainer.base.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def write_corpus(path: Path, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n_docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def local_cfg(tmp_path: Path, shards_dir: Path, workers: int = 1, **domains: Path) -> DataConfig:
    return DataConfig(
        name="local", source="local", format="shards", block_size=32, max_eval_blocks=4,
        domains={d: DomainConfig(paths=[str(p)]) for d, p in domains.items()},
        tokenizer=TokenizerConfig(name="gpt2"), cache_dir=str(tmp_path / "cache"), shards_dir=str(shards_dir),
        shard_tokens=3000, eval_tokens=500, tokenize_workers=workers, tokenize_batch_docs=16,
    )


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2()


def test_write_and_open_round_trip_tokens_and_document_starts(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 40, size=n) for n in (7, 1, 12)]
    parts = [rng.integers(0, 2**32 - 1, size=int(ln.sum()), dtype=np.uint64).astype(np.uint32) for ln in lengths]
    index = {"format_version": store.FORMAT_VERSION, "settings": {"tokenizer": {}}, "eval": None, "train": [],
             "complete": True}
    for i, (tokens, ln) in enumerate(zip(parts, lengths, strict=True)):
        index["train"].append(store.write_shard(str(tmp_path), f"train-{i:05d}", tokens, ln))
    store.write_index(str(tmp_path), index)
    shard_set = ShardSet(str(tmp_path), "data.domains.x", "tokenize")
    whole = np.concatenate(parts).astype(np.int64)
    assert shard_set.num_tokens == len(whole)
    assert np.array_equal(shard_set.read(0, len(whole)), whole)  # uint32 values survive, even near 2**32
    assert np.array_equal(shard_set.read(5, 300), whole[5:305])  # across both shard edges
    starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths))[:-1]])
    assert np.array_equal(shard_set.doc_starts, starts)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_blocks_share_one_token_and_carry_document_ids(tmp_path):
    lengths = np.array([5, 9, 3, 20, 4, 11, 6])
    tokens = np.arange(lengths.sum(), dtype=np.uint32)
    index = {"format_version": store.FORMAT_VERSION, "settings": {}, "eval": None, "complete": True,
             "train": [store.write_shard(str(tmp_path), "train-00000", tokens[:30], np.array([5, 9, 3, 13])),
                       store.write_shard(str(tmp_path), "train-00001", tokens[30:], np.array([7, 4, 11, 6]))]}
    store.write_index(str(tmp_path), index)
    blocks = ShardBlocks(ShardSet(str(tmp_path), "k", "hint"), block_size=8, domain="b", domains=["a", "b"])
    assert len(blocks) == (len(tokens) - 8) // 7 + 1
    starts = np.concatenate([[0], np.cumsum([5, 9, 3, 13, 7, 4, 11])])  # the split document is two documents
    for i in range(len(blocks)):
        ids, doc = blocks.block(i)
        assert ids.tolist() == list(range(7 * i, 7 * i + 8))  # label of block i's last = first of block i+1
        expected = np.searchsorted(starts, np.arange(7 * i, 7 * i + 8), side="right") - 1
        assert doc.tolist() == (expected - expected[0]).tolist()
    batch = blocks.batch(np.array([3, 0]))
    assert batch["input_ids"][1].tolist() == list(range(8)) and batch["domain_ids"].tolist() == [1, 1]
    with pytest.raises(IndexError):
        blocks.block(len(blocks))


def test_tokenize_writes_documents_with_eos_and_an_eval_shard_first(tmp_path, gpt2):
    docs = write_corpus(tmp_path / "a.jsonl", 200, seed=1)
    cfg = local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "a.jsonl")
    [summary] = tokenize.tokenize_data(cfg)
    directory = tmp_path / "shards" / "text"
    index = json.loads((directory / "index.json").read_text())
    assert index["complete"] and index["settings"]["tokenizer"]["fingerprint"] == gpt2.fingerprint
    assert index["settings"]["source"]["files"][0][0] == str(tmp_path / "a.jsonl")
    expected = [np.array([*gpt2.encode(d), gpt2.eos_id]) for d in docs]
    eval_shard = store.open_shard(str(directory), index["eval"])
    n_eval = index["eval"]["documents"]
    assert np.array_equal(eval_shard.tokens, np.concatenate(expected[:n_eval]))
    assert sum(len(e) for e in expected[:n_eval - 1]) < 500 <= len(eval_shard.tokens)  # ends with the filler
    shard_set = ShardSet(str(directory), "k", "hint")
    assert np.array_equal(shard_set.read(0, shard_set.num_tokens), np.concatenate(expected[n_eval:]))
    assert len(shard_set.doc_starts) == len(docs) - n_eval == summary["train_documents"]
    for entry in index["train"][:-1]:  # every shard but the last ends with the document that filled it
        assert entry["tokens"] >= 3000
    assert gpt2.decode(shard_set.read(0, int(shard_set.doc_starts[1]) - 1)) == docs[n_eval]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_tokenization_resumes_to_the_same_bytes(tmp_path, monkeypatch, workers):
    write_corpus(tmp_path / "in" / "a.jsonl", 300, seed=2)
    write_corpus(tmp_path / "in" / "b.jsonl", 100, seed=3)
    corpus = tmp_path / "in"
    reference = local_cfg(tmp_path, tmp_path / "whole", workers=1, text=corpus)
    tokenize.tokenize_data(reference)

    cfg = local_cfg(tmp_path, tmp_path / "cut", workers=workers, text=corpus)
    real_write, calls = store.write_shard, []

    def dying_write(directory, name, tokens, lengths):
        calls.append(name)
        if len(calls) == 4:  # eval + 2 training shards done; die while writing the third
            # what atomic_path leaves when the process is killed mid-write
            with open(os.path.join(directory, f".{name}.bin.k1ll3d.tmp"), "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(directory, name, tokens, lengths)

    monkeypatch.setattr(store, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        tokenize.tokenize_data(cfg)
    monkeypatch.setattr(store, "write_shard", real_write)
    cut = tmp_path / "cut" / "text"
    index = json.loads((cut / "index.json").read_text())
    assert not index["complete"] and len(index["train"]) == 2 and not (cut / "train-00002.bin").exists()
    with pytest.raises(UserError, match="did not finish"):
        ShardSet(str(cut), "data.domains.text", "the command")
    (cut / "train-00007.bin").write_bytes(b"renamed into place but never indexed")

    [summary] = tokenize.tokenize_data(cfg)
    assert summary["tokenized_now"] < summary["train_tokens"]  # the finished shards were not redone
    assert files_of(cut) == files_of(tmp_path / "whole" / "text")
    again = tokenize.tokenize_data(cfg)[0]  # a finished directory is left alone
    assert again["tokenized_now"] == 0 and files_of(cut) == files_of(tmp_path / "whole" / "text")


def test_an_interrupted_tokenization_closes_its_progress_bar_before_the_message(tmp_path, monkeypatch):
    """Otherwise the error (or the Ctrl-C line) is printed after the bar's last partial line."""
    write_corpus(tmp_path / "in" / "a.jsonl", 300, seed=2)
    events = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append("closed")

        def update(self, n):
            events.append("update")

        def close(self):
            events.append("closed")

    def interrupted_write(directory, name, tokens, lengths):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize, "tqdm", RecordingBar)
    monkeypatch.setattr(store, "write_shard", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        tokenize.tokenize_data(local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "in"))
    assert events and events[-1] == "closed" and "update" in events


POISON = "this document makes its batch fail"
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="the stand-in tokenizer reaches workers by fork only")


class CharTokenizer:
    """Stand-in tokenizer, one id per character (EOS 0); the POISON document fails its batch in the worker."""

    eos_id = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if POISON in texts:
            raise ValueError("poisoned batch")
        return [[ord(c) for c in t] for t in texts]


@needs_fork
@pytest.mark.timeout(120)
def test_encoding_stopped_early_shuts_its_workers_down():
    docs = (f"document {i} " * 20 for i in range(400))
    batches = tokenize.encoded_batches(docs, CharTokenizer(), workers=2, batch_docs=5)
    flat, lengths = next(batches)
    assert len(lengths) == 5 and flat[lengths[0] - 1] == 0
    # What an interrupt or an error in the consumer does to the generator: it must return, with every worker
    # gone. (multiprocessing.Pool's terminate() here once deadlocked on a worker killed holding a queue lock.)
    batches.close()
    assert multiprocessing.active_children() == []


@needs_fork
@pytest.mark.timeout(120)
def test_a_batch_failing_in_a_worker_fails_the_run_instead_of_hanging():
    docs = [f"doc {i}" for i in range(100)]
    docs[37] = POISON
    with pytest.raises(ValueError, match="poisoned batch"):
        for _ in tokenize.encoded_batches(iter(docs), CharTokenizer(), workers=2, batch_docs=5):
            pass
    assert multiprocessing.active_children() == []


def test_token_budget_and_changed_settings(tmp_path):
    write_corpus(tmp_path / "a.jsonl", 300, seed=4)
    cfg = local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "a.jsonl")
    cfg.domains["text"].max_tokens = 4000
    [summary] = tokenize.tokenize_data(cfg)
    index = json.loads((tmp_path / "shards" / "text" / "index.json").read_text())
    assert summary["shards"] == 2 and 3000 <= index["train"][0]["tokens"] < 3000 + 200
    assert 4000 <= summary["train_tokens"] < 4000 + 200  # stops after the document that reaches the budget
    cfg.shard_tokens = 2000
    with pytest.raises(UserError, match="shard_tokens"):
        tokenize.tokenize_data(cfg)


def test_training_refuses_shards_of_another_tokenizer_and_missing_shards(tmp_path, gpt2):
    write_corpus(tmp_path / "a.jsonl", 200, seed=5)
    cfg = local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "a.jsonl")
    with pytest.raises(UserError, match="task=tokenize data=local"):
        build_shard_data(cfg, None)
    tokenize.tokenize_data(cfg)
    bundle = build_shard_data(cfg, None)
    assert bundle.tokenizer.vocab_size == gpt2.vocab_size and bundle.mix is not None
    assert len(bundle.eval["text"]) >= 1 and bundle.summary["domains"]["text"]["train_documents"] > 0

    other = tmp_path / "other-tokenizer"  # GPT-2's files with one merge fewer: another vocabulary
    gpt2.save(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    cfg.tokenizer.name = str(other)
    with pytest.raises(UserError, match="tokenized with 'gpt2'"):
        build_shard_data(cfg, None)


def test_training_refuses_shards_written_from_other_data_settings(tmp_path):
    """data=local corpora share <cache_dir>/shards/local: other paths, a budget or eval split that the shards
    were not made with must not train on them silently, while layout-only or train-time settings still may."""
    write_corpus(tmp_path / "a.jsonl", 200, seed=8)
    write_corpus(tmp_path / "b.jsonl", 200, seed=9)
    cfg = local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "a.jsonl")
    cfg.domains["text"].max_tokens = 6000
    tokenize.tokenize_data(cfg)
    cfg.shard_tokens, cfg.block_size, cfg.tokenize_workers = 999, 16, 3  # decide nothing a run reads
    build_shard_data(cfg, None)

    changes = {"source.files": ("paths", [str(tmp_path / "b.jsonl")]), "max_tokens": ("max_tokens", None),
               "source.text_fields": ("text_fields", ["text", "title"])}
    for shown, (key, value) in changes.items():
        changed = copy.deepcopy(cfg)
        setattr(changed.domains["text"], key, value)
        with pytest.raises(UserError, match=rf"{re.escape(shown)}.*task=tokenize data=local") as err:
            build_shard_data(changed, None)
        assert "data.shards_dir" in str(err.value) and "\n" not in str(err.value)
    changed = copy.deepcopy(cfg)
    changed.eval_tokens = 800
    with pytest.raises(UserError, match=r"eval_tokens \(500 in the shards, 800 in this run\)"):
        build_shard_data(changed, None)


def test_shards_train_where_their_source_files_moved_or_are_absent(tmp_path, caplog):
    """Shards are tokenized where the raw files live and often copied, with or without them, to where training
    runs: the same files under another directory are the same corpus, and absent ones cannot be checked."""
    write_corpus(tmp_path / "raw" / "a.jsonl", 200, seed=8)
    cfg = local_cfg(tmp_path, tmp_path / "shards", text=tmp_path / "raw" / "a.jsonl")
    tokenize.tokenize_data(cfg)

    moved = tmp_path / "elsewhere" / "a.jsonl"
    moved.parent.mkdir()
    shutil.copy(tmp_path / "raw" / "a.jsonl", moved)
    (tmp_path / "raw" / "a.jsonl").unlink()
    cfg.domains["text"].paths = [str(moved)]
    build_shard_data(cfg, None)  # same name and size: accepted without a word

    moved.write_text(moved.read_text() + '{"text": "one more document"}\n')
    with pytest.raises(UserError, match="source.files"):
        build_shard_data(cfg, None)  # the file changed: another corpus

    moved.unlink()
    cfg.balance_tokens = True  # as the MoE presets set it for the in-memory corpus
    with caplog.at_level(logging.WARNING):
        bundle = build_shard_data(cfg, None)
    assert "cannot be checked against its source files" in caplog.text and len(bundle.eval["text"]) >= 1
    assert "data.balance_tokens=true applies to data.format=memory and is ignored with shards" in caplog.text
    cfg.domains["text"].max_tokens = 6000  # what can still be checked still is
    with pytest.raises(UserError, match="max_tokens"):
        build_shard_data(cfg, None)


def test_offline_hub_source_fails_fast_naming_dataset_and_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(name="hubby", source="hub", format="shards", tokenizer=TokenizerConfig(name="Qwen/Qwen3-0.6B"),
                     domains={"math": DomainConfig(dataset="nvidia/Nemotron-CC-Math-v1", config="4plus")},
                     cache_dir=str(tmp_path))
    with pytest.raises(UserError) as err:
        tokenize.tokenize_data(cfg)
    assert "nvidia/Nemotron-CC-Math-v1" in str(err.value) and "data.domains.math.paths" in str(err.value)


def test_mixed_stream_over_shards_is_deterministic_and_resumes_exactly(tmp_path):
    write_corpus(tmp_path / "a.jsonl", 200, seed=6)
    write_corpus(tmp_path / "b.jsonl", 120, seed=7)
    cfg = local_cfg(tmp_path, tmp_path / "shards", math=tmp_path / "a.jsonl", code=tmp_path / "b.jsonl")
    tokenize.tokenize_data(cfg)
    bundle = build_shard_data(cfg, MixSchedule([(0.0, {"math": 0.5, "code": 0.5}), (1.0, {"math": 0.9, "code": 0.1})],
                                               ["code", "math"]))

    def stream() -> MixedStream:
        return bundle.train_stream(batch_size=4, seed=3, rank=0, world_size=1, micro_steps_per_update=2, max_steps=10)

    a, b = stream(), stream()
    first = [a.next_batch() for _ in range(6)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, [b.next_batch() for _ in range(6)],
                                                                             strict=True))
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(8)]
    resumed = stream()
    resumed.load_state_dict(state)
    for want in rest:
        got = resumed.next_batch()
        for key in want:
            assert torch.equal(want[key], got[key]), key
    assert {"data/math/fraction", "data/code/target"} <= set(a.pop_metrics())


def test_a_tokenizer_rebuilt_from_its_spec_encodes_alike(gpt2):
    """Spawned tokenize workers (macOS, Windows) rebuild the tokenizer from spec(); forked ones inherit it."""
    from data.tokenizer import TextTokenizer

    clone = TextTokenizer.from_spec(gpt2.spec())
    text = "def f(x):\n    return x ** 2  # <|endoftext|> stays text"
    assert clone.encode(text) == gpt2.encode(text) and clone.fingerprint == gpt2.fingerprint
    assert clone.eos_id == gpt2.eos_id and gpt2.eos_id not in clone.encode(text)


FILES = "hf://datasets/codeparrot/github-code/data/train-*.parquet"  # polyglu-mix's code domain


def test_hub_source_is_streamed_filtered_and_tokenized(tmp_path, monkeypatch, gpt2):
    """The hub path up to `datasets.load_dataset`, which is replaced by rows in memory (no network here)."""
    datasets = pytest.importorskip("datasets")
    import trainer.base.hub

    rows = [{"code": f"def f{i}():\n    return {i}\n", "language": "Python" if i % 3 else "Java"} for i in range(300)]
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming, kwargs))
        return iter(rows)

    monkeypatch.setattr(trainer.base.hub, "hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(name="hubby", source="hub", format="shards", tokenizer=TokenizerConfig(name="gpt2"),
                     domains={"code": DomainConfig(dataset="parquet", data_files=[FILES], filter={"language": "Python"},
                                                   text_fields=["code"], max_tokens=1500)},
                     cache_dir=str(tmp_path), shard_tokens=1000, eval_tokens=100, tokenize_workers=1)
    [summary] = tokenize.tokenize_data(cfg)
    assert calls[0] == ("parquet", None, "train", True, {"data_files": [FILES]})  # streamed, never downloaded whole
    assert summary["shards"] == 2 and 1500 <= summary["train_tokens"] < 1600  # stopped at the budget
    shard_set = ShardSet(str(tmp_path / "shards" / "hubby" / "code"), "k", "hint")
    python = [r["code"] for r in rows if r["language"] == "Python"]
    n_eval = shard_set.index["eval"]["documents"]
    trained = python[n_eval:n_eval + len(shard_set.doc_starts)]
    assert gpt2.decode(shard_set.read(0, shard_set.num_tokens)) == "".join(t + "<|endoftext|>" for t in trained)
