"""ChatML, Qwen3's chat format: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`.

The markers (named once, in data.tokenizer) are inserted by id, never by encoding text, and the tokenizer encodes
special-token text in content as plain text (TextTokenizer sets encode_special_tokens): a user who writes
"<|im_start|>" cannot forge a turn. Only the assistant's content and its <|im_end|> carry loss, so the model
learns to answer and to stop; the markers' <|im_start|>, the role header and the trailing newline do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from trainer.base.errors import UserError

from ..tokenizer import CHAT_MARKERS, IM_END, IM_START, TextTokenizer

ASSISTANT = "assistant"
Turn = tuple[str, str]  # (role, content)


def ensure_chat_markers(tokenizer: TextTokenizer) -> list[str]:
    """Add the ChatML markers the tokenizer lacks as special tokens; returns those added (gpt2: both; the project's
    BPE and Qwen3's tokenizer have them already: none). Each marker then has exactly one id."""
    added = tokenizer.add_special_tokens(CHAT_MARKERS)
    for marker in CHAT_MARKERS:
        tid = tokenizer.token_id(marker)
        if tid is None or tokenizer.decode([tid]) != marker:
            raise UserError(f"data.tokenizer.name={tokenizer.name!r} cannot hold the chat marker {marker!r} as one "
                            "token; use data.tokenizer.name=bpe, gpt2 or a tokenizer with ChatML markers (Qwen3)")
    return added


def marker_ids(tokenizer: TextTokenizer) -> tuple[int, int]:
    start, end = tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)
    if start is None or end is None:
        raise ValueError(f"{tokenizer!r} lacks the chat markers; call ensure_chat_markers(tokenizer) first")
    return start, end


def _content(value: object) -> str:
    """A message's content as text: None is empty; a list of parts (OpenAI style) joins its text parts."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in value)
    return str(value)


def is_tool_turn(message: Mapping) -> bool:
    """A tool call (an assistant turn with `tool_calls`) or a tool's answer (role `tool`)."""
    return bool(message.get("tool_calls")) or message.get("role") == "tool"


def read_messages(messages: object, where: str) -> tuple[list[Turn], int]:
    """A conversation's turns [(role, content)] from a list of {role, content} objects, and how many tool turns
    were skipped (as the seed did: this trainer has no tool-call format). UserError naming `where` on a row
    that is not such a list."""
    if not isinstance(messages, list):
        raise UserError(f"{where} is a JSON {type(messages).__name__}, not a list of {{role, content}} turns")
    turns, skipped = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise UserError(f"{where}[{i}] is not a {{role, content}} object with a text role: {str(m)[:80]!r}")
        if is_tool_turn(m):
            skipped += 1
            continue
        turns.append((m["role"], _content(m.get("content"))))
    return turns, skipped


def render(turns: Iterable[Turn]) -> str:
    """The conversation as ChatML text (what a BPE is trained on and data.size_mb counts)."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)


def has_assistant(turns: Sequence[Turn]) -> bool:
    return any(role == ASSISTANT for role, _ in turns)


def _normalise(messages: Sequence[Mapping] | Sequence[Turn]) -> list[Turn]:
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            if is_tool_turn(m):
                continue
            out.append((str(m["role"]), _content(m.get("content"))))
        else:
            role, content = m
            out.append((str(role), _content(content)))
    return out


def encode_prompt(tokenizer: TextTokenizer, user_text: str) -> list[int]:
    """A user turn and the opening of the assistant's, as a fine-tuned model is asked at generation: it answers
    and ends its turn with <|im_end|>."""
    start, _ = marker_ids(tokenizer)
    ids, _ = encode_conversation(tokenizer, [("user", user_text)])
    return [*ids, start, *tokenizer.encode(f"{ASSISTANT}\n")]


def encode_conversation(tokenizer: TextTokenizer,
                        messages: Sequence[Mapping] | Sequence[Turn]) -> tuple[list[int], list[bool]]:
    """One conversation's ids and assistant mask (True exactly on each assistant turn's content and its <|im_end|>).
    `messages`: {role, content} objects (tool turns skipped) or (role, content) pairs. Labels = ids where mask,
    else IGNORE_INDEX. The markers must be in the vocabulary (ensure_chat_markers)."""
    return encode_conversations(tokenizer, [_normalise(messages)])[0]


def encode_conversations(tokenizer: TextTokenizer, conversations: Sequence[Sequence[Turn]]
                         ) -> list[tuple[list[int], list[bool]]]:
    """encode_conversation for many: every content is encoded in one batched pass, headers once per role."""
    start, end = marker_ids(tokenizer)
    newline = tokenizer.encode("\n")
    headers: dict[str, list[int]] = {}
    contents = [content for turns in conversations for _, content in turns]
    encoded = tokenizer.iter_encoded(contents)
    out = []
    for turns in conversations:
        ids: list[int] = []
        mask: list[bool] = []
        for role, _ in turns:
            if role not in headers:
                headers[role] = tokenizer.encode(f"{role}\n")
            body = next(encoded)
            scored = role == ASSISTANT
            ids += [start, *headers[role]]
            mask += [False] * (1 + len(headers[role]))
            ids += [*body, end]
            mask += [scored] * (len(body) + 1)
            ids += newline
            mask += [False] * len(newline)
        out.append((ids, mask))
    return out
