"""Hub datasets and hub tokenizers fail fast, with one actionable line, when the Hub is unreachable."""

from __future__ import annotations

import importlib.util
import time

import pytest

import trainer.hub
from data import build_data
from data.tokenizer import load_pretrained
from trainer.schema import DataConfig, DomainConfig, TokenizerConfig, UserError


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer.hub.hub_reachable.cache_clear()  # the answer is cached per process
    yield
    trainer.hub.hub_reachable.cache_clear()


def hub_cfg(tmp_path, tokenizer: str = "gpt2") -> DataConfig:
    return DataConfig(source="hub", size_mb=0.05, cache_dir=str(tmp_path), tokenizer=TokenizerConfig(tokenizer),
                      domains={"code": DomainConfig(dataset="codeparrot/codeparrot-clean", text_fields=["content"])})


def test_offline_hub_dataset_fails_fast(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        build_data(hub_cfg(tmp_path), seed=0)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "data.domains.code.dataset='codeparrot/codeparrot-clean'" in msg
    assert "data=embedded" in msg and "\n" not in msg


def test_offline_hub_tokenizer_fails_fast(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_pretrained("no-such-org/no-such-tokenizer-xyz")
    assert time.perf_counter() - start < 10  # includes importing transformers
    msg = str(err.value)
    assert "data.tokenizer.name='no-such-org/no-such-tokenizer-xyz'" in msg
    assert "bpe" in msg and "gpt2" in msg and "\n" not in msg


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    monkeypatch.setattr(trainer.hub, "hub_reachable", lambda *a, **k: True)
    with pytest.raises(UserError, match=r'pip install -e "\.\[hub\]"'):
        build_data(hub_cfg(tmp_path), seed=0)


def test_local_tokenizer_directory_works_offline(tmp_path, offline):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import load_gpt2

    folder = tmp_path / "tok"
    fast = PreTrainedTokenizerFast(tokenizer_object=load_gpt2()._backend, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    tok = load_pretrained(str(folder))
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode("offline works")) == "offline works"
