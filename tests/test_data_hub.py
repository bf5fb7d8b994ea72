"""Hub datasets and hub tokenizers fail fast, with one actionable line, when the Hub is unreachable."""

from __future__ import annotations

import importlib.util
import time

import pytest

import trainer.base.hub
from data.build import build_data
from data.config import DataConfig, DomainConfig, TokenizerConfig
from data.tokenizer import load_pretrained
from tests.conftest import tiny_run
from trainer.base.errors import UserError


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read on every call: no cache to clear


def test_offline_env_is_read_on_every_call_and_the_probe_is_cached(monkeypatch):
    calls = []

    def connect(address, timeout):
        calls.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(trainer.base.hub.socket, "create_connection", connect)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid:8443/mirror")
    probe = trainer.base.hub._probe
    probe.cache_clear()
    try:
        assert trainer.base.hub.hub_reachable() is False and calls == []  # the environment answers, no probe
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        assert trainer.base.hub.hub_reachable() is False and calls == [("hub.invalid", 443)]
        assert trainer.base.hub.hub_reachable() is False and len(calls) == 1  # the probe's answer is cached per host
        monkeypatch.setenv("HF_ENDPOINT", "https://other.invalid")
        assert trainer.base.hub.hub_reachable() is False and calls[-1] == ("other.invalid", 443)
        monkeypatch.setattr(trainer.base.hub, "_probe", lambda host, timeout_s: True)
        assert trainer.base.hub.hub_reachable() is True
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")  # set later in the same process: still honoured
        assert trainer.base.hub.hub_reachable() is False
        with pytest.raises(UserError, match="data.x='y'"):
            trainer.base.hub.require_hub("data.x", "y", "use data=embedded")
    finally:
        probe.cache_clear()


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


def test_offline_generic_loader_names_its_hub_files(tmp_path, offline):
    """polyglu-mix reads github-code through the generic `parquet` loader: the message names the files."""
    cfg = hub_cfg(tmp_path)
    cfg.domains["code"] = DomainConfig(dataset="parquet", data_files=["hf://datasets/org/set/train-*.parquet"])
    with pytest.raises(UserError) as err:
        build_data(cfg, seed=0)
    msg = str(err.value)
    assert msg.startswith("data.domains.code.dataset='parquet' reading data_files=['hf://datasets/org/set/train-")
    assert "needs the Hugging Face Hub" in msg and "\n" not in msg


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
    monkeypatch.setattr(trainer.base.hub, "hub_reachable", lambda *a, **k: True)
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


def test_offline_hub_model_fails_before_the_data_is_prepared(tmp_path):
    cache = tmp_path / "cache"
    result = tiny_run(tmp_path, cache, "model.pretrained=gpt2", "data.tokenizer.name=gpt2")  # HF_HUB_OFFLINE=1
    assert result.returncode == 2 and "model.pretrained='gpt2' needs the Hugging Face Hub" in result.stderr
    assert not cache.exists() or not any(cache.iterdir()), "nothing tokenized or cached before the refusal"
    assert not (tmp_path / "run").exists(), "a refused launch leaves no run directory"
