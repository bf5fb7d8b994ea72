"""lm-evaluation-harness's model interface over any family's snapshot: lm-eval owns the tasks, prompts, filters and
metrics; this class turns its three request types into batched forwards through models/inference.py.

* loglikelihood: context and continuation are encoded together and split (lm-eval's `_encode_pair`), cut from the
  left to the model's context, and scored as the sum of the continuation's token log-probs. Requests whose model
  input is identical (the choices of a multiple-choice question whose answers are one token) share one forward.
* loglikelihood_rolling: lm-eval's disjoint rolling windows, each scored as above.
* generate_until: greedy (or sampled, when a task asks) through eval/decoding.py, stopping at EOS, <|im_end|> for a
  fine-tuned model, or a stop string found in the decoded text.

Results come back in request order. Batches are sorted by length so padding is small, and padding never changes a
result (models/inference.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from data.chat.format import render
from data.tokenizer import CHAT_MARKERS, IM_END, IM_START, TextTokenizer
from eval.decoding import generate, left_padded
from eval.generate import load_snapshot_model, snapshot_in
from trainer.base.errors import UserError

MODEL_NAME = "routed-lm"  # its name in lm-eval's model registry (once this module is imported)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


@register_model(MODEL_NAME)
class RoutedLM(TemplateLM):
    """A model of this project as an lm-eval LM. Build it from a snapshot (`snapshot=`, what `--model_args` gives)
    or from a loaded model and its tokenizer."""

    def __init__(self, snapshot: str | None = None, *, model=None, tokenizer: TextTokenizer | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, **_ignored) -> None:
        super().__init__()
        if (snapshot is None) == (model is None):
            raise ValueError("pass snapshot=<path> or model= and tokenizer=")
        if snapshot is not None:
            model, tokenizer, _ = load_snapshot_model(snapshot_in(Path(snapshot)))
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self._device, dtype=_dtype(dtype, self._device)).eval()
        self.tok = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        # A fine-tuned model's markers are single tokens; its tokenizer encodes their text as plain text (so data
        # cannot forge a turn), so prompts written with them (apply_chat_template) are split here.
        self._markers = {m: tokenizer.token_id(m) for m in CHAT_MARKERS if tokenizer.token_id(m) is not None}
        self._marker_pattern = (re.compile("(" + "|".join(map(re.escape, self._markers)) + ")")
                                if self._markers else None)
        self._stop_ids = [tokenizer.eos_id] + ([self._markers[IM_END]] if IM_END in self._markers else [])

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.context_window

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self._marker_pattern is None:
            return self.tok.encode(string)
        ids: list[int] = []
        for piece in self._marker_pattern.split(string):
            if piece in self._markers:
                ids.append(self._markers[piece])
            elif piece:
                ids += self.tok.encode(piece)
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records with the results: ChatML, the one preset=sft trains."""
        return f"{IM_START}{{role}}\\n{{content}}{IM_END}\\n" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if IM_END not in self._markers:
            raise UserError(f"--apply-chat-template needs a fine-tuned model: tokenizer {self.tok.name!r} has no "
                            "chat markers; fine-tune with preset=sft run.init_from=<run>, or leave the flag out")
        text = render((m["role"], m["content"]) for m in chat_history)
        return text + f"{IM_START}assistant\n" if add_generation_prompt else text

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM.loglikelihood makes."""
        window = self.max_length
        inputs: dict[tuple[int, ...], list[int]] = defaultdict(list)  # model input -> indices of its requests
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > window:
                raise ValueError(f"request {i} has a {len(continuation)}-token continuation; the model scores 1 to "
                                 f"{window} (its context)")
            whole = (list(context) + list(continuation))[-(window + 1):]
            inputs[tuple(whole[:-1])].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(inputs, key=len, reverse=True)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            conts = [[list(requests[i][2]) for i in inputs[key]] for key in batch]
            last = max(len(c) for row in conts for c in row)
            logprobs = self._last_logprobs(batch, last)  # [B, last, V]
            for row, key in enumerate(batch):
                for i, cont in zip(inputs[key], conts[row], strict=True):
                    scores = logprobs[row, last - len(cont):]
                    target = torch.tensor(cont, device=scores.device)
                    total = scores.gather(-1, target[:, None]).sum().item()
                    greedy = bool((scores.argmax(dim=-1) == target).all())
                    results[i] = (total, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
                    bar.update(1)
        bar.close()
        return results

    def _last_logprobs(self, rows: Sequence[Sequence[int]], last: int) -> torch.Tensor:
        """fp32 log-softmax of the logits at the last `last` positions of each row; rows are left-padded, so every
        row ends at the same column."""
        ids, mask = left_padded(rows, self.tok.eos_id, self._device)
        with torch.no_grad():
            logits, _ = self.model.logits(ids, mask, last=min(last, ids.shape[1]))
        return F.log_softmax(logits.float(), dim=-1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((text, ""), context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm),
                                       strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same generation settings batch together
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until, new_tokens, temperature = self._generation_settings(settings)
            keep = self.max_length - new_tokens  # the prompt is cut from the left to leave room for the answer
            prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] or [self.eot_token_id] for i in indices}
            ordered = sorted(indices, key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start:start + self.batch_size]
                outs = generate(self.model, [prompts[i] for i in batch], new_tokens, stop_ids=self._stop_ids,
                                stop_strings=until, decode=self.tok_decode, temperature=temperature,
                                top_k=settings.get("top_k"), pad_id=self.eot_token_id, generator=generator)
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out.text)
                    bar.update(1)
        bar.close()
        return results

    def _generation_settings(self, settings: dict) -> tuple[list[str], int, float]:
        """(stop strings, new-token budget, temperature) from a request's gen_kwargs, as lm-eval's HFLM reads them."""
        until = settings.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(settings.pop("max_gen_toks", self.max_gen_toks))
        if new_tokens >= self.max_length:
            raise UserError(f"max_gen_toks={new_tokens} leaves no room for a prompt in the model's "
                            f"{self.max_length}-position context; pass a smaller --max-gen-toks")
        sample = bool(settings.pop("do_sample", False))
        temperature = float(settings.pop("temperature", 1.0 if sample else 0.0) or 0.0)
        return until, new_tokens, temperature if sample else 0.0


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, by default bfloat16 on CUDA (what training runs in there) and float32 elsewhere."""
    name = name or ("bfloat16" if device.type == "cuda" else "float32")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


def _batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise UserError(f"--batch-size {value!r} must be a whole number >= 1 (automatic sizing is not supported)")
    return size
