"""The MoE family in a sweep report (the contract: models/report.py): did the router balance, collapse, specialise?

Shares are the collapse stop's (stats.largest_share): the share of tokens that picked an expert among their k, so
1 is total collapse for any k and even routing is k/E.
"""

from __future__ import annotations

from models.moe import stats
from models.report import RunRecord
from trainer.base import metrics as keys

COLUMNS = {
    "lb_loss": "the last logged Switch load-balancing loss (1 = balanced, E = every token on one expert)",
    "max_expert_share": "the largest share of tokens any expert took in any MoE layer, at the last logged router "
                        "step (even routing: top-k / experts)",
    "collapse_step": "the step from which that share stayed above model.collapse_threshold to the end of the run "
                     "(blank: it never did)",
    "domain_mi_norm": "I(domain; expert) at the last eval over log(min(domains, experts)), mean over MoE layers "
                      "(0 = every domain routes alike, 1 = no two domains share an expert)",
}


def largest_share(record: RunRecord) -> list[tuple[int, float]]:
    """(step, the largest expert share in any MoE layer) at every step that logged the router's fractions."""
    layers, topk = record.model_config.get("moe_layers", []), int(record.model_config.get("topk", 1))
    series = []
    for row in record.rows:
        routing = keys.step_routing(row)
        if layers and all(stats.fraction(layer) in routing for layer in layers):
            series.append((int(row["step"]), stats.largest_share(routing, layers, topk)[0]))
    return series


def collapse_step(shares: list[tuple[int, float]], threshold: float) -> int | None:
    """The first step of the last stretch of logged steps whose largest share exceeds the threshold, if that
    stretch lasts to the end: a collapse that held, not a passing spike."""
    step = None
    for at, share in shares:
        step = (step if step is not None else at) if share > threshold else None
    return step


def columns(record: RunRecord) -> dict[str, float | int | None]:
    shares = largest_share(record)
    final = record.final_eval
    information = [final.routing.get(stats.domain_information_normalised(layer))
                   for layer in record.model_config.get("moe_layers", [])] if final is not None else []
    return {
        "lb_loss": record.last(keys.train_metric(stats.LB_LOSS)),
        "max_expert_share": shares[-1][1] if shares else None,
        "collapse_step": collapse_step(shares, float(record.model_config.get("collapse_threshold", 0.6))),
        "domain_mi_norm": (sum(information) / len(information)
                           if information and all(v is not None for v in information) else None),
    }


def curves(record: RunRecord) -> dict[str, list[tuple[int, float]]]:
    return {"MoE: load-balancing loss (1 = balanced)": record.series(keys.train_metric(stats.LB_LOSS)),
            "MoE: largest expert share of tokens": largest_share(record)}
