"""Text generation for every family through models/inference.py: prompts batched and left-padded, the KV cache
where the family keeps one (the GPT-2 families; PolyGLU with routing_pool=causal), the whole sequence recomputed
each step where it cannot (PolyGLU's whole-sequence mean pool: every new token changes every earlier token's
routing).

A row stops at one of `stop_ids` (EOS, or <|im_end|> for a fine-tuned model), which is left out of its result,
or once its decoded text contains one of `stop_strings`: strings are matched in the text, not as token ids,
because a stop string such as "Question:" is rarely one token and is tokenized differently after other text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    tokens: list[int]  # the new tokens, without the stop id that ended the row
    text: str | None = None  # decoded and cut before the first stop string (when `decode` was given)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             temperature: float = 0.0, top_k: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None) -> list[Generated]:
    """Continue every prompt (lists of ids, each non-empty) by at most `max_new_tokens`, greedily at temperature
    0, else sampled from the top_k tokens (all when None or 0). Results come back in the prompts' order."""
    if stop_strings and decode is None:
        raise ValueError("stop_strings are matched in decoded text: pass decode")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    window = model.context_window
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > window:
        raise ValueError(f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds the model's "
                         f"{window}-position context")
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)

    new: list[list[int]] = [[] for _ in prompts]
    texts: list[str | None] = [None] * len(prompts)
    running = [True] * len(prompts)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    cache = model.new_cache()
    step_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if cache is None:  # recompute: the whole sequence every step
                logits, _ = model.logits(ids, mask, last=1)
            else:
                logits, cache = model.logits(step_ids, mask, last=1, cache=cache)
            nxt = _next_token(logits[:, -1].float(), temperature, top_k, generator)
            ended = torch.isin(nxt, stops) if len(stops) else torch.zeros_like(nxt, dtype=torch.bool)
            for row, (token, at_stop) in enumerate(zip(nxt.tolist(), ended.tolist(), strict=True)):
                if not running[row]:
                    continue
                if at_stop:
                    running[row] = False
                    continue
                new[row].append(token)
                if stop_strings:
                    cut = _cut_at_stop(decode(new[row]), stop_strings)
                    if cut is not None:
                        texts[row], running[row] = cut, False
            if not any(running):
                break
            # Finished rows keep decoding (their tokens are discarded) so the batch keeps its shape.
            step_ids = nxt[:, None]
            ids = torch.cat([ids, step_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    out = []
    for row, tokens in enumerate(new):
        text = texts[row]
        if text is None and decode is not None:
            text = decode(tokens)
        out.append(Generated(tokens, text))
    return out


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, longest row] on `device`: each row's tokens at the right end, `pad_id` before them
    with mask 0 (models/inference.py's layout for scoring and generation alike)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row))
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str | None:
    """`text` up to its first stop string, or None when it holds none."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[:min(hits)] if hits else None
