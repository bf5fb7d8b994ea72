"""From files to a trained model through the real entrypoint: task=tokenize, then data.format=shards with a
scheduled domain mix, exact resume, and the realised mix in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_GPT2, assert_ok, run_cli
from tests.test_shards import write_corpus

pytestmark = pytest.mark.slow


def shard_args(tmp_path: Path) -> list[str]:
    # A user's own data entry, outside the checkout, extending conf/data/local.yaml with a second domain.
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "two.yaml").write_text(
        f"defaults: [local, _self_]\nname: two\ndomains:\n  math:\n    paths: [{tmp_path / 'math'}]\n")
    return [
        "data=two", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"data.shards_dir={tmp_path / 'shards'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.domains.text.paths=[{tmp_path / 'text.jsonl'}]",
        "data.shard_tokens=4000", "data.eval_tokens=600", "data.block_size=48", "data.max_eval_blocks=3",
        "data.mix=[{at: 0.0, weights: {math: 0.2, text: 0.8}}, {at: 1.0, weights: {math: 0.8, text: 0.2}}]",
        f"run.output_dir={tmp_path}", "tracking.wandb_mode=disabled",
    ]


def test_tokenize_then_train_with_a_mix_schedule_and_resume_exactly(tmp_path):
    write_corpus(tmp_path / "text.jsonl", 400, seed=11)
    for i in range(3):  # a directory of files for the other domain
        write_corpus(tmp_path / "math" / f"part{i}.jsonl", 150, seed=20 + i)
    args = shard_args(tmp_path)
    train_args = [*args, *TINY_GPT2, "train.batch_size=4", "train.grad_accum_steps=2", "train.max_steps=8",
                  "train.eval_every=4", "checkpoint.save_every=4"]

    missing = run_cli([*train_args, "run.name=early"], cwd=tmp_path)
    assert missing.returncode == 2 and "task=tokenize data=two" in missing.stderr

    refused = run_cli(["task=tokenize", *args, f"data.domains.text.paths=[{tmp_path / 'absent.jsonl'}]"],
                      cwd=tmp_path)
    assert refused.returncode == 2 and "absent.jsonl" in refused.stderr
    assert not (tmp_path / "tokenize").exists(), "a refused tokenize leaves no empty outputs/tokenize/ behind"

    tokenized = run_cli(["task=tokenize", *args], cwd=tmp_path)
    assert_ok(tokenized)
    assert "math:" in tokenized.stdout and "tokens/s" in tokenized.stdout
    assert (tmp_path / "tokenize" / "two" / ".hydra" / "config.yaml").exists()  # not in a training run's dir

    assert_ok(run_cli([*train_args, "run.name=whole"], cwd=tmp_path))
    whole = tmp_path / "whole"
    assert_ok(run_cli([*train_args, "run.name=resumed", f"run.resume={whole / 'ckpt-step-4.pt'}"], cwd=tmp_path))
    a = load_file(str(whole / "final-model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final-model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "data/math/fraction" in r]
    assert len(train_rows) == 8
    # 8 samples per step; the target moves from 0.2 to 0.8 math and the realised share follows it.
    assert train_rows[0]["data/math/target"] == pytest.approx(0.2)
    assert train_rows[-1]["data/math/target"] == pytest.approx(0.2 + 0.6 * 7 / 8)
    realised = sum(r["data/math/fraction"] for r in train_rows) / 8
    scheduled = sum(r["data/math/target"] for r in train_rows) / 8
    assert abs(realised - scheduled) <= 1 / 64 + 1e-9  # within one sample of 64
    assert "eval/math/loss" in rows[-1] or any("eval/math/loss" in r for r in rows)

    summary = json.loads((whole / "data_summary.json").read_text())
    assert summary["format"] == "shards" and summary["tokenizer"]["name"] == "gpt2"
    vocab = summary["tokenizer"]["vocab_size"]
    assert load_file(str(whole / "final-model.safetensors"))["hf.transformer.wte.weight"].shape[0] == vocab
