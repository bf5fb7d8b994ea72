"""The lm-eval adapter against direct computation, for every family: log-likelihoods, rolling windows, greedy
generation with stop strings, padding, batching, request order and the KV cache (eval/harness/adapter.py,
eval/decoding.py, models/inference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from torch import nn

from data.chat.format import encode_prompt, ensure_chat_markers
from data.tokenizer import IM_END, load_gpt2
from eval.decoding import generate
from eval.harness.adapter import RoutedLM
from eval.harness.cli import check_tasks
from models.gpt2.config import GPT2Config
from models.moe.config import MoEGPT2Config
from models.polyglu.config import PolyGLUConfig
from models.registry import build_model
from trainer.base.errors import UserError

CONTEXT = 48
CONFIGS = {
    "dense": GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT),
    "moe": MoEGPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT, moe_layers=[1], num_experts=4, topk=2),
    "polyglu-mean": PolyGLUConfig(d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                  max_seq_len=CONTEXT),
    "polyglu-causal": PolyGLUConfig(d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                    max_seq_len=CONTEXT, routing_pool="causal"),
}
CACHED = ["dense", "moe", "polyglu-causal"]
TOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_gpt2()


def tiny_model(name: str, tokenizer):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id).eval()
    if name.startswith("polyglu"):  # sharper routing than the initial uniform one, so pooling matters
        for ffn in model.ffns():
            nn.init.normal_(ffn.alpha, std=1.0)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request, tokenizer):
    return RoutedLM(model=tiny_model(request.param, tokenizer), tokenizer=tokenizer, batch_size=4, device="cpu")


def loglikelihood_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits over one unpadded sequence, [T, V]."""
    with torch.no_grad():
        logits, _ = model.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return F.log_softmax(logits[0].float(), dim=-1)


def direct_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """Encoded together and split where the context's own encoding ends (lm-eval's _encode_pair, which first moves
    the context's trailing whitespace to the continuation), cut from the left to the context window, summed over the
    continuation."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = lm.tok_encode(context + continuation)
    cont = whole[len(lm.tok_encode(context)):]
    whole = whole[-(lm.max_length + 1):]
    logprobs = direct_logprobs(lm.model, whole[:-1])[-len(cont):]
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


PAIRS = [("The cat sat", " on the mat"), ("x = 3\ny = ", "x + 4"), ("Question: 2 + 2?\nAnswer:", " 4"),
         ("Paris is the capital of", " France"), ("def f(a, b):\n    return", " a * b + 1")]


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(lm):
    got = lm.loglikelihood(loglikelihood_requests(PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        want, want_greedy = direct_loglikelihood(lm, context, continuation)
        assert logprob == pytest.approx(want, abs=TOL)
        assert greedy == want_greedy


def test_a_context_longer_than_the_model_is_cut_from_the_left(lm):
    context = " ".join(f"word{i}" for i in range(40))  # well over 48 tokens
    assert len(lm.tok_encode(context)) > lm.max_length
    (logprob, _), = lm.loglikelihood(loglikelihood_requests([(context, " end")]), disable_tqdm=True)
    assert logprob == pytest.approx(direct_loglikelihood(lm, context, " end")[0], abs=TOL)


def test_rolling_loglikelihood_equals_the_models_own_eval_loss(lm):
    short = "A short text that fits in one window."
    long = " ".join(f"token{i}" for i in range(60))  # several windows
    texts = [short, long]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)
    eot = lm.eot_token_id

    # In one window: the text after EOT, scored by the model's own loss (the mean next-token cross-entropy that
    # training and eval report) times the tokens it scores.
    ids = lm.tok_encode(short)
    with torch.no_grad():
        loss = lm.model(torch.tensor([[eot, *ids]])).lm_loss.item()
    assert got[0] == pytest.approx(-loss * len(ids), abs=1e-4)

    # Longer: every token is scored exactly once, each window with as much context as the model takes.
    ids = lm.tok_encode(long)
    window = lm.max_length
    assert len(ids) > 2 * window
    want = 0.0
    for start in range(0, len(ids), window):
        new = ids[start:start + window]
        seq = ([eot] + ids)[:start + len(new) + 1][-(window + 1):]
        logprobs = direct_logprobs(lm.model, seq[:-1])[-len(new):]
        want += logprobs.gather(-1, torch.tensor(new)[:, None]).sum().item()
    assert got[1] == pytest.approx(want, abs=1e-4)


def test_padding_never_changes_a_result(lm):
    alone = RoutedLM(model=lm.model, tokenizer=lm.tok, batch_size=1, device="cpu")
    target = [("Hi", " there")]
    batch = [("A much longer context than the other, so it pads", " it"), ("Hi", " there"), ("x", " y"),
             ("Medium length context here", " ok")]
    (single, _), = alone.loglikelihood(loglikelihood_requests(target), disable_tqdm=True)
    padded = lm.loglikelihood(loglikelihood_requests(batch), disable_tqdm=True)
    assert padded[1][0] == pytest.approx(single, abs=TOL)

    prompts = [lm.tok_encode("The quick brown fox"), lm.tok_encode("A"), lm.tok_encode("Once upon a time there")]
    together = generate(lm.model, prompts, 8)
    for prompt, out in zip(prompts, together, strict=True):
        assert generate(lm.model, [prompt], 8)[0].tokens == out.tokens


def test_results_come_back_in_request_order_and_requests_are_batched(lm, monkeypatch):
    one_by_one = RoutedLM(model=lm.model, tokenizer=lm.tok, batch_size=1, device="cpu")
    want = one_by_one.loglikelihood(loglikelihood_requests(PAIRS * 2), disable_tqdm=True)
    calls = []
    real = type(lm.model).logits

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(lm.model), "logits", counting)
    got = lm.loglikelihood(loglikelihood_requests(PAIRS * 2), disable_tqdm=True)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=TOL)
    # Ten requests, five distinct inputs (each pair twice), batches of four: two forwards.
    assert calls == [4, 1]


def test_choices_of_a_multiple_choice_question_share_one_forward(lm, monkeypatch):
    calls = []
    real = type(lm.model).logits
    monkeypatch.setattr(type(lm.model), "logits", lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
    question = "Which is a colour?\nA. red\nB. dog\nC. run\nD. blue\nAnswer:"
    got = lm.loglikelihood(loglikelihood_requests([(question, f" {c}") for c in "ABCD"]), disable_tqdm=True)
    assert len(calls) == 1 and calls[0][0] == 1
    for choice, (logprob, _) in zip("ABCD", got, strict=True):
        assert logprob == pytest.approx(direct_loglikelihood(lm, question, f" {choice}")[0], abs=TOL)


class Scripted(nn.Module):
    """A 'model' that always predicts the next token of a script (by how many tokens its rows hold), for testing
    the decoding loop's stopping without depending on what a random model says."""

    def __init__(self, script: list[int], vocab: int, prompt_len: int):
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, prompt_len
        self.weight = nn.Parameter(torch.zeros(1))
        self.context_window = 64

    def new_cache(self):
        return None

    def logits(self, input_ids, attention_mask, last=None, cache=None):
        nxt = self.script[min(input_ids.shape[1] - self.prompt_len, len(self.script) - 1)]
        out = torch.zeros(input_ids.shape[0], last or input_ids.shape[1], self.vocab)
        out[:, -1, nxt] = 1.0
        return out, None


def test_generation_stops_at_stop_strings_found_in_the_decoded_text(tokenizer):
    prompt = tokenizer.encode("Question: 6 x 7?\nAnswer:")
    script = tokenizer.encode(" 42. Question: next one\n\nmore")
    model = Scripted(script, tokenizer.vocab_size, len(prompt))
    # "Question:" alone starts with a token the script never holds (after text it is " Question"), so matching
    # its first token id, as the seed's wrapper did, would never stop; the decoded text holds it.
    assert tokenizer.encode("Question:")[0] not in script
    out, = generate(model, [prompt], 20, stop_strings=["Question:"], decode=tokenizer.decode)
    assert out.text == " 42. "
    # A stop string spanning two tokens; the earliest of several wins.
    out, = generate(model, [prompt], 20, stop_strings=["\n\n"], decode=tokenizer.decode)
    assert out.text == " 42. Question: next one"
    out, = generate(model, [prompt], 20, stop_strings=["\n\n", "next"], decode=tokenizer.decode)
    assert out.text == " 42. Question: "
    # Stop ids end a row without appearing in it; a row with no stop runs to its budget.
    out, = generate(model, [prompt], 20, stop_ids=[script[2]], decode=tokenizer.decode)
    assert out.tokens == script[:2]
    out, = generate(model, [prompt], 3, decode=tokenizer.decode)
    assert out.tokens == script[:3]


def test_generate_until_follows_the_requests_settings_in_request_order(lm):
    contexts = ["The", "Once upon a time, in a land far away,", "x ="]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6}), i)
                for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    for context, text in zip(contexts, got, strict=True):
        out, = generate(lm.model, [lm.tok_encode(context)], 6, stop_ids=[lm.eot_token_id], stop_strings=["\n"],
                        decode=lm.tok_decode)
        assert text == out.text and "\n" not in text


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generation_uses_a_kv_cache_where_the_family_can(name, tokenizer):
    model = tiny_model(name, tokenizer)
    if name not in CACHED:  # PolyGLU's whole-sequence mean: every new token reroutes every earlier one
        assert model.new_cache() is None
        return
    prompts = [tokenizer.encode("Hello world, this is"), tokenizer.encode("x")]
    ids = torch.full((2, 6), tokenizer.eos_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 6 - len(p):], mask[i, 6 - len(p):] = torch.tensor(p), 1
    full = torch.cat([ids, torch.randint(0, 1000, (2, 5))], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        whole, _ = model.logits(full, full_mask)
        cache = model.new_cache()
        first, cache = model.logits(full[:, :6], full_mask[:, :6], last=1, cache=cache)
        step, cache = model.logits(full[:, 6:7], full_mask[:, :7], last=1, cache=cache)
        rest, cache = model.logits(full[:, 7:], full_mask, last=4, cache=cache)
    cached = torch.cat([first, step, rest], dim=1)
    torch.testing.assert_close(cached, whole[:, 5:], atol=TOL, rtol=0)

    calls = []

    class Recompute(nn.Module):  # the same model, made to recompute: generation must agree token for token
        def __init__(self):
            super().__init__()
            self.inner, self.context_window = model, model.context_window

        def new_cache(self):
            return None

        def logits(self, *args, **kwargs):
            calls.append(1)
            return model.logits(*args, **kwargs)

    assert [o.tokens for o in generate(model, prompts, 8)] == [o.tokens for o in generate(Recompute(), prompts, 8)]
    assert len(calls) == 8


def test_a_fine_tuned_model_is_prompted_through_its_chat_template():
    tokenizer = load_gpt2()
    ensure_chat_markers(tokenizer)
    model = build_model(CONFIGS["dense"], vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    lm = RoutedLM(model=model, tokenizer=tokenizer, device="cpu")
    prompt = lm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    # The markers are single tokens, exactly what fine-tuning trained on and eval.generate --chat sends.
    assert lm.tok_encode(prompt) == encode_prompt(tokenizer, "What is 2 + 2?")
    assert tokenizer.token_id(IM_END) in lm._stop_ids

    plain = RoutedLM(model=model, tokenizer=load_gpt2(), device="cpu")
    with pytest.raises(UserError, match="--apply-chat-template needs a fine-tuned model"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_an_unknown_task_is_refused_with_the_closest_names():
    class Manager:
        all_tasks = ["gsm8k", "gsm8k_cot", "embedded_math", "mmlu_stem"]

    with pytest.raises(UserError, match="--tasks gsm8: no such task.*did you mean gsm8k"):
        check_tasks(Manager(), ["embedded_math", "gsm8"], [])


def test_embedded_math_keeps_lm_evals_gsm8k_config_but_for_its_data_and_answer_budget():
    """tasks/embedded_math.yaml is a copy (a YAML cannot `include:` lm-eval's file by a portable path): it must not
    drift from lm-eval's gsm8k in prompt, few-shot, stop strings, filters or metric."""
    from pathlib import Path

    import lm_eval.tasks
    import yaml
    from lm_eval.tasks import TaskManager

    from eval.harness.cli import TASKS_DIR

    gsm8k = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    ours = TaskManager(include_defaults=False, include_path=str(TASKS_DIR)).task_index["embedded_math"].cfg
    for key in ("output_type", "training_split", "fewshot_split", "test_split", "doc_to_text", "doc_to_target",
                "metric_list", "filter_list", "num_fewshot", "repeats"):
        assert ours[key] == gsm8k[key], key
    assert ours["generation_kwargs"] == {**gsm8k["generation_kwargs"], "max_gen_toks": 128}
    assert "dataset_path" not in ours and "custom_dataset" in ours


def test_math500_is_scored_by_math_verify_without_antlr_4_11():
    from importlib.metadata import version

    from eval.harness import math500

    assert version("antlr4-python3-runtime").startswith("4.9")  # what Hydra needs; lm-eval[math] would pin 4.11
    doc = {"problem": "What is 1/2 + 0?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}
    assert math500.process_results(doc, ["So the answer is $\\boxed{0.5}$."]) == {"math_verify": 1}
    assert math500.process_results(doc, ["So the answer is $\\boxed{2}$."]) == {"math_verify": 0}
    # The prompt and few-shot examples are lm-eval's own.
    assert math500.doc_to_text(doc) == "Problem:\nWhat is 1/2 + 0?\n\nSolution:"
    assert len(math500.list_fewshot_samples()) == 4
    import hydra  # noqa: F401  (still importable next to it)
