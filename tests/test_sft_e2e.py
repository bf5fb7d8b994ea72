"""Offline fine-tuning end to end, as a user runs it: pretrain, then `preset=sft run.init_from=<run>` on the
generated math conversations. The held-out assistant loss falls, PolyGLU's tau stays frozen, resume is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_GPT2, assert_ok, tiny_run
from trainer.base.metrics import EVAL_LOSS, SCORED_TOKENS, TRAIN_LOSS, eval_loss

pytestmark = pytest.mark.slow

CONTEXT = 256  # a generated conversation is about 100 tokens under the tiny BPE: whole ones fit, two or more a block
GPT2 = [*TINY_GPT2, f"model.n_positions={CONTEXT}"]
POLYGLU = ["model=polyglu", "model.d_model=32", "model.d_ff=64", "model.n_layers=2", "model.n_heads=4",
           "model.n_kv_heads=2", "model.head_dim=8", f"model.max_seq_len={CONTEXT}"]
PRETRAIN = ["train.max_steps=30", "train.eval_every=30", "checkpoint.save_every=30", "optim.learning_rate=3e-3"]
SFT = ["preset=sft", f"data.block_size={CONTEXT}", "data.size_mb=0.06", "optim.learning_rate=2e-3",
       "train.eval_every=1000"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("sft")
    assert_ok(tiny_run(out, data_cache, *PRETRAIN, name="pretrained", model_sizes=GPT2))
    return out / "pretrained"


@pytest.fixture(scope="module")
def fine_tuned(pretrained, data_cache):
    out = pretrained.parent
    assert_ok(tiny_run(out, data_cache, *SFT, "checkpoint.save_every=5", f"run.init_from={pretrained}",
                       name="tuned", model_sizes=GPT2))
    return out / "tuned"


def test_sft_after_pretraining_lowers_the_held_out_assistant_loss(pretrained, fine_tuned):
    rows = metrics(fine_tuned)
    evals = [r for r in rows if EVAL_LOSS in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == rows[-1]["step"]
    assert after[eval_loss("math")] < before[eval_loss("math")] - 0.1, (before, after)

    summary = json.loads((fine_tuned / "summary.json").read_text())
    data = json.loads((fine_tuned / "data_summary.json").read_text())
    # One epoch: the step count follows from the packed blocks, logged and recorded.
    blocks = data["domains"]["math"]["train"]["blocks"]
    assert summary["final_step"] == -(-blocks // 4) and summary["epochs"] == 1  # batch 2 x accumulation 2
    assert 0.7 < data["packing_efficiency"] <= 1  # about 2 conversations a block here; sft-math at 512: 0.98
    assert summary["init_from"]["path"] == str(pretrained / "final-model.safetensors")
    # The loss counts assistant tokens only: far fewer than the tokens trained on.
    trained = [r for r in rows if SCORED_TOKENS in r]
    assert trained and all(0 < r[SCORED_TOKENS] < 4 * CONTEXT for r in trained)
    # The pretrained run's tokenizer, carried into the fine-tuned run (the BPE reserves the chat markers).
    assert data["tokenizer"]["fingerprint"] == json.loads(
        (pretrained / "data_summary.json").read_text())["tokenizer"]["fingerprint"]


def test_resume_during_sft_equals_the_uninterrupted_run(fine_tuned, data_cache):
    """A run killed after its step-5 checkpoint and continued with run.resume=auto ends where the whole one did."""
    killed = fine_tuned.parent / "killed"
    shutil.copytree(fine_tuned, killed)
    for path in killed.iterdir():
        step = path.name.removeprefix("ckpt-step-").removesuffix(".pt")
        if (step.isdigit() and int(step) > 5) or path.name.startswith(("final-model", "summary")):
            path.unlink()
    first_args = json.loads((fine_tuned / "summary.json").read_text())["init_from"]["path"]
    result = tiny_run(fine_tuned.parent, data_cache, *SFT, "checkpoint.save_every=5", "run.resume=auto",
                      f"run.init_from={first_args.removesuffix('/final-model.safetensors')}", name="killed",
                      model_sizes=GPT2)
    assert_ok(result)
    whole, resumed = load_file(str(fine_tuned / "final-model.safetensors")), load_file(
        str(killed / "final-model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    losses = {r["step"]: r[TRAIN_LOSS] for r in metrics(fine_tuned) if TRAIN_LOSS in r}
    assert {r["step"]: r[TRAIN_LOSS] for r in metrics(killed) if TRAIN_LOSS in r} == losses


def test_polyglu_sft_keeps_tau_frozen_at_0_1(tmp_path, data_cache):
    assert_ok(tiny_run(tmp_path, data_cache, "train.max_steps=4", "train.eval_every=4", name="poly",
                       model_sizes=POLYGLU))
    assert_ok(tiny_run(tmp_path, data_cache, *SFT, "data.size_mb=0.02", f"run.init_from={tmp_path / 'poly'}",
                       name="poly-sft", model_sizes=POLYGLU))
    taus = [r["train/tau"] for r in metrics(tmp_path / "poly-sft") if "train/tau" in r]
    assert taus and all(t == pytest.approx(0.1) for t in taus)


def test_moe_sft_upcycled_from_the_dense_run_keeps_its_router_losses_and_monitors(pretrained, data_cache):
    out = pretrained.parent
    assert_ok(tiny_run(out, data_cache, *SFT, "data.size_mb=0.02", "model=moe", "model.moe_layers=[1]",
                       "model.num_experts=4", "train.log_router_every=1", f"run.init_from={pretrained}",
                       name="moe-sft", model_sizes=GPT2))
    run_dir = out / "moe-sft"
    rows = [r for r in metrics(run_dir) if TRAIN_LOSS in r]
    assert rows and all("train/lb_loss" in r and "router/layer1/fraction/3" in r for r in rows)
    assert list((run_dir / "figures").glob("*.png")), "the expert-usage figure is drawn at the end"
    assert json.loads((run_dir / "summary.json").read_text())["init_from"]["family"] == "dense"


def test_a_fine_tuned_model_answers_a_chat_prompt_and_stops_at_the_end_of_its_turn(fine_tuned, capsys):
    from data.chat.format import encode_prompt
    from data.tokenizer import IM_END, IM_START, load_saved_tokenizer
    from eval.generate import main

    tokenizer = load_saved_tokenizer(fine_tuned / "tokenizer")
    prompt = encode_prompt(tokenizer, "What is 2 + 2?")
    assert prompt[0] == tokenizer.token_id(IM_START) and tokenizer.decode(prompt).endswith(f"{IM_START}assistant\n")
    assert main([str(fine_tuned), "--chat", "--temperature", "0", "--prompt", "What is 2 + 2?",
                 "--max-new-tokens", "20"]) == 0
    answer = capsys.readouterr().out
    assert answer.strip() and IM_START not in answer and IM_END not in answer
