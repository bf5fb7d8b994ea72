"""Typed schema behind conf/: every key the trainer reads, its type, its default and its allowed range.

Standard library only: `trainer/run.py --cfg job` and config checks must not import torch.
Hydra composes the YAML; `validate()` merges the result onto these dataclasses, so a misspelt key,
a wrong type or an impossible value stops the run with one line naming the key, the value and what
would work. Model families register their own schema in MODEL_SCHEMAS (keyed by `model.family`).
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from data.config import DataConfig, check_data, own_domains
from trainer.base.atomic_files import atomic_write_bytes
from trainer.base.errors import UserError


@dataclass
class RunConfig:
    task: str = "train"  # train | tokenize (chosen with task=<name>, conf/task/)
    name: str = "run"  # run directory key: <output_dir>/<name>
    output_dir: str = "outputs"
    seed: int = 42
    resume: Optional[str] = None  # null (fresh), "auto" (newest valid checkpoint of this run) or a path
    preset: str = "none"  # recorded in checkpoints and sidecars; set by conf/preset/*


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
    "run.task": ("train", "tokenize"),
}

# (key, test, what would work). Keys are dotted paths into the validated config.
RULES = [
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
    if "data" in raw:
        raw["data"] = own_domains(raw["data"])  # a data entry's domains are its own, not local.yaml's placeholder
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
    check_data(cfg.data, tokenizing=cfg.run.task == "tokenize")
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    if cfg.run.task == "train" and warmup is not None and warmup >= steps:
        # A preset's warmup (polyglu-pretrain: 2000) kept in a shortened run would train it all at a sliver of the
        # learning rate, without a word.
        raise UserError(f"optim.warmup_steps={warmup} is not below train.max_steps={steps}: the run would end "
                        f"before the learning rate warms up to optim.learning_rate={cfg.optim.learning_rate:g}; "
                        f"lower optim.warmup_steps (such as {steps // 10}), or set optim.warmup_steps=null to use "
                        f"optim.warmup_fraction={cfg.optim.warmup_fraction:g}")
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
