"""Metric keys, defined once, and the structured metrics callbacks receive.

A run's record is flat: metrics.jsonl lines and W&B keys such as train/loss, router/layer8/fraction/3,
eval/code/loss, eval/code/router/layer8/fraction/3, eval/router/layer8/domain_mi (a statistic across an eval's
domains) and data/code/fraction. Every key is built by a function
here, and the readers of such records, `EvalMetrics.from_flat` and `step_routing`, are here too, so renaming a key
cannot leave a reader silently finding nothing.

Monitors do not parse keys. Callbacks get `StepMetrics` and `EvalMetrics`, whose routing statistics are keyed
by the names a model family itself emits in ModelOutput.routing (its `models/<family>/stats.py`). A statistic
is a number or a vector (one value per expert, say); in flat keys a vector's elements get a trailing
`/<index>`, so a statistic's own name never ends in a number component.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Stat = float | list[float]

TRAIN_LOSS = "train/loss"  # what is backpropagated: the LM loss plus the weighted auxiliary losses
TRAIN_LM_LOSS = "train/lm_loss"
GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/lr"
TOKENS = "train/tokens"
TOKENS_PER_SEC = "train/tokens_per_sec"
SCORED_TOKENS = "train/scored_tokens"  # targets that carried loss in the update (with labels: SFT's assistant tokens)
BLOCKS_WITHOUT_TARGETS = "train/blocks_without_targets"  # blocks in the update whose labels were all masked
EVAL_LOSS = "eval/loss"  # token-weighted over every domain
EVAL_PPL = "eval/ppl"
_ROUTER = "router/"
# eval/router/<stat> holds statistics across an eval's domains, so no domain may take this name.
ACROSS_DOMAINS = "router"


def train_metric(name: str) -> str:
    """A family's own per-step scalar (ModelOutput.metrics), e.g. train/lb_loss."""
    return f"train/{name}"


def aux_loss(name: str) -> str:
    """A weighted auxiliary loss (ModelOutput.aux_losses), e.g. train/aux/lb."""
    return f"train/aux/{name}"


def router(stat: str) -> str:
    """A routing statistic of training (ModelOutput.routing), logged every train.log_router_every steps."""
    return f"{_ROUTER}{stat}"


def is_router(key: str) -> bool:
    return key.startswith(_ROUTER)


def eval_loss(domain: str) -> str:
    return f"eval/{domain}/loss"


def eval_ppl(domain: str) -> str:
    return f"eval/{domain}/ppl"


def eval_router(domain: str, stat: str) -> str:
    return f"eval/{domain}/{_ROUTER}{stat}"


def eval_router_across_domains(stat: str) -> str:
    """A statistic a family derives from all of an eval's domains at once (MoE: domain-expert information)."""
    return f"eval/{ACROSS_DOMAINS}/{stat}"


def data_fraction(domain: str) -> str:
    """The share of the training samples a domain had since the last logged step."""
    return f"data/{domain}/fraction"


def data_target(domain: str) -> str:
    """The share data.mix scheduled for that domain."""
    return f"data/{domain}/target"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def flatten(key: str, value: Stat) -> dict[str, float]:
    """{key: value} for a number, {key/0: v0, key/1: v1, ...} for a vector."""
    if isinstance(value, Sequence):
        return {f"{key}/{i}": float(v) for i, v in enumerate(value)}
    return {key: float(value)}


@dataclass
class StepMetrics:
    """One optimizer update, as every process sees it (means over micro-batches and processes)."""

    logged: dict[str, float]  # the flat keys above, as metrics.jsonl records them
    routing: dict[str, Stat] = field(default_factory=dict)  # the family's routing statistics, by its names

    @property
    def loss(self) -> float:
        return self.logged[TRAIN_LOSS]


@dataclass
class DomainEval:
    loss: float | None = None
    ppl: float | None = None
    routing: dict[str, Stat] = field(default_factory=dict)


@dataclass
class EvalMetrics:
    """One eval pass: per domain, the token-weighted aggregate, and the routing statistics that compare the
    domains (`routing`, from the families' callbacks: trainer.base.callbacks.Callback.eval_statistics)."""

    domains: dict[str, DomainEval] = field(default_factory=dict)
    loss: float | None = None
    ppl: float | None = None
    routing: dict[str, Stat] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for domain, result in self.domains.items():
            if result.loss is not None:
                out[eval_loss(domain)] = result.loss
            if result.ppl is not None:
                out[eval_ppl(domain)] = result.ppl
            for stat, value in result.routing.items():
                out.update(flatten(eval_router(domain, stat), value))
        for stat, value in self.routing.items():
            out.update(flatten(eval_router_across_domains(stat), value))
        if self.loss is not None:
            out[EVAL_LOSS] = self.loss
        if self.ppl is not None:
            out[EVAL_PPL] = self.ppl
        return out

    def losses(self) -> dict[str, float]:
        """Every loss of this eval by its flat key (the aggregate and each domain's)."""
        found = {eval_loss(d): r.loss for d, r in self.domains.items() if r.loss is not None}
        return {**found, **({EVAL_LOSS: self.loss} if self.loss is not None else {})}

    @classmethod
    def from_flat(cls, flat: Mapping[str, float]) -> EvalMetrics:
        """Read back what flat() wrote: a metrics.jsonl eval line, or the last eval a checkpoint carries. Keys that
        are not eval keys (step, time) are ignored."""
        result = cls(loss=flat.get(EVAL_LOSS), ppl=flat.get(EVAL_PPL))
        # Each routing statistic's flat pieces, by owner: a domain, or None for across domains.
        pieces: dict[str | None, list[tuple[str, float]]] = {}
        for key, value in flat.items():
            parts = key.split("/")
            if parts[0] != "eval" or len(parts) < 3:
                continue
            if parts[1] == ACROSS_DOMAINS:
                pieces.setdefault(None, []).append(("/".join(parts[2:]), value))
                continue
            domain = result.domains.setdefault(parts[1], DomainEval())
            if len(parts) == 3 and parts[2] in ("loss", "ppl"):
                setattr(domain, parts[2], value)
            elif parts[2] == _ROUTER.rstrip("/") and len(parts) > 3:
                pieces.setdefault(parts[1], []).append(("/".join(parts[3:]), value))
        for owner, named in pieces.items():
            (result.routing if owner is None else result.domains[owner].routing).update(unflatten(named))
        return result


def unflatten(pieces: Iterable[tuple[str, float]]) -> dict[str, Stat]:
    """Read back what flatten() wrote for several statistics: a name ending in an element index is a vector's
    element ({"a/0": x, "a/1": y, "b": z} -> {"a": [x, y], "b": z})."""
    stats: dict[str, Stat] = {}
    elements: dict[str, dict[int, float]] = {}
    for name, value in pieces:
        stat, _, last = name.rpartition("/")
        if stat and last.isdigit():
            elements.setdefault(stat, {})[int(last)] = value
        else:
            stats[name] = value
    for stat, values in elements.items():
        stats[stat] = [values[i] for i in sorted(values)]
    return stats


def step_routing(row: Mapping[str, float]) -> dict[str, Stat]:
    """The routing statistics a metrics.jsonl training line logged (router/<stat>), by the family's own names, as
    StepMetrics.routing holds them; empty for a line that logged none."""
    return unflatten((key.removeprefix(_ROUTER), value) for key, value in row.items() if is_router(key))


def eval_history(rows: Iterable[Mapping[str, float]]) -> list[tuple[int, EvalMetrics]]:
    """(step, eval) for every eval line of a run's record (metrics.jsonl rows, in order)."""
    return [(int(row["step"]), EvalMetrics.from_flat(row)) for row in rows if EVAL_LOSS in row and "step" in row]
