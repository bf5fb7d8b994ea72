"""The embedded prose domain: stdlib documentation first, then the installed dependencies' docstrings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data import sources
from data.build import build_data
from data.config import DataConfig, DomainConfig, TokenizerConfig
from data.sources import embedded, take_until

# The stdlib's prose is ~0.77 MB; this cap reaches numpy (two seconds to parse), not torch or transformers.
PAST_STDLIB = 1_000_000


def _stdlib_prose_bytes(cache_dir) -> int:
    used: dict = {}
    total = 0
    for doc in embedded.prose_documents(str(cache_dir), used):
        if set(used) != {embedded.STDLIB_SOURCE}:
            break
        total += len(doc.encode("utf-8", "surrogatepass"))
    return total


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


def test_dependency_paragraphs_keep_sentences_and_drop_markup():
    doc = '''Applies a :class:`~torch.nn.Linear` projection to the ``input`` tensor, then normalises it. The weights
are created lazily on the first call, see [`~PreTrainedModel.from_pretrained`] and the
[guide](https://example.org/guide) for how the **initial** values are chosen and why *that* matters.

Args:
    input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Indices of input sequence tokens in the vocabulary. Indices can be obtained with the tokenizer and are
        padded to the longest sequence of the batch, so that every row of the batch has the same length as the others.
    dim (int): Size of the last dimension.

Parameters
----------
out : ndarray, optional
    Short.

Example::

    model = Linear(3, 4)
    model(torch.ones(3))

```python
>>> model = AutoModel.from_pretrained("x")
```

>>> print(model)
Linear(in_features=3, out_features=4, bias=True) and a long line of output that goes on and on and on and on

x = torch.ones(3); y = model(x); z = torch.cat([x, y], dim=0); w = z.sum() + y.mean() * x.max() - 1
'''
    paras = embedded.dependency_paragraphs(doc)
    assert paras[0].startswith("Applies a Linear projection to the input tensor")
    assert "from_pretrained and the guide for how the initial values are chosen and why that matters." in paras[0]
    assert paras[1].startswith("Indices of input sequence tokens")
    text = "\n".join(paras)
    for junk in (">>>", "```", ":class:", "`", "input_ids (", "Args", "model = Linear", "out_features",
                 "torch.cat", "ndarray", "--"):
        assert junk not in text, junk
    assert len(paras) == 2


def test_prose_is_deterministic_and_extends_the_stdlib_prose(text_cache, tmp_path, monkeypatch):
    used: dict = {}
    first = take_until(embedded.prose_documents(str(text_cache), used), PAST_STDLIB)
    stdlib_bytes = _stdlib_prose_bytes(text_cache)
    assert 300_000 < stdlib_bytes < PAST_STDLIB
    assert used[embedded.STDLIB_SOURCE] > 100 and used.get("numpy", 0) > 10  # dependency text past the stdlib
    # A second build from scratch (no per-process memo, another text cache) gives the same documents.
    # The stdlib's scan is copied over (its own tests cover it): only the dependencies are parsed again.
    monkeypatch.setattr(embedded, "_scanned", {})
    (tmp_path / "text").mkdir()
    for cached in (text_cache / "text").glob("stdlib-*.json"):
        shutil.copy(cached, tmp_path / "text")
    second = take_until(embedded.prose_documents(str(tmp_path)), PAST_STDLIB)
    assert first == second
    assert list((tmp_path / "text").glob("numpy-*.json"))  # the dependency scan is cached on disk
    # A small cap stays stdlib-only: it is a prefix of the larger corpus.
    small_used: dict = {}
    small = take_until(embedded.prose_documents(str(text_cache), small_used), 200_000)
    assert set(small_used) == {embedded.STDLIB_SOURCE}
    assert small[:-1] == first[: len(small) - 1]
    dependency_text = "\n\n".join(first[used[embedded.STDLIB_SOURCE]:])
    assert len(dependency_text) > 100_000
    for junk in (">>>", "```", ":class:`", ":func:`", "Parameters\n---"):
        assert junk not in dependency_text, junk
    # Deduplicated across documents, so no paragraph can sit on both sides of the train/eval split.
    owner: dict[str, int] = {}
    for i, doc in enumerate(first):
        for para in doc.split("\n\n"):
            assert owner.setdefault(para, i) == i, para[:80]


def test_prose_provenance_records_each_source_and_licence(text_cache):
    used: dict = {}
    take_until(embedded.prose_documents(str(text_cache), used), PAST_STDLIB)
    prov = embedded.provenance("prose", used)
    by_name = {s["name"]: s for s in prov["sources"]}
    assert by_name[embedded.STDLIB_SOURCE]["licence"].startswith("PSF")
    assert by_name["numpy"]["licence"] == "BSD-3-Clause" and by_name["numpy"]["files"] > 50
    assert by_name["numpy"]["version"] == np.__version__ and by_name["numpy"]["documents"] == used["numpy"]
    assert "numpy: BSD-3-Clause" in prov["licence"] and "numpy" in prov["origin"]
    stdlib_only = embedded.provenance("prose", {embedded.STDLIB_SOURCE: 3})
    assert stdlib_only["licence"].startswith("PSF") and len(stdlib_only["sources"]) == 1


def test_corpus_key_follows_dependency_versions(monkeypatch, tmp_path):
    cfg = DataConfig(domains={"prose": DomainConfig()}, size_mb=0.1, cache_dir=str(tmp_path))
    before = sources.signature(cfg)
    real = embedded.package_version
    monkeypatch.setattr(embedded, "package_version", lambda dist: "0.0-test" if dist == "numpy" else real(dist))
    assert sources.signature(cfg) != before
    code_only = DataConfig(domains={"code": DomainConfig()}, size_mb=0.1, cache_dir=str(tmp_path))
    assert sources.signature(code_only) == sources.signature(code_only)


def test_prose_build_past_stdlib_has_no_eval_leak(text_cache):
    cfg = DataConfig(domains={"prose": DomainConfig()}, size_mb=PAST_STDLIB / 1e6, block_size=128,
                     eval_fraction=0.1, max_eval_blocks=64, tokenizer=TokenizerConfig("bpe", 512),
                     cache_dir=str(text_cache))
    bundle = build_data(cfg, seed=3)
    s = bundle.summary["domains"]["prose"]
    names = [src["name"] for src in s["source"]["sources"]]
    assert names[0] == embedded.STDLIB_SOURCE and "numpy" in names
    assert "numpy: BSD-3-Clause" in s["source"]["licence"]
    tok = bundle.tokenizer
    eos = tok.decode([tok.eos_id])
    train_text = "".join(tok.decode(row) for row in bundle.train.input_ids)
    eval_text = "".join(tok.decode(row) for row in bundle.eval["prose"].input_ids)
    pieces = [p for p in eval_text.split(eos) if len(p) > 300]
    assert pieces
    for piece in pieces:
        assert piece not in train_text, piece[:80]
