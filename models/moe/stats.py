"""The routing statistics the MoE family reports in ModelOutput.routing, by name: one definition shared by the
model that emits them and the callbacks and figures that read them. The loop logs them as router/<name>
(per-expert vectors element-wise), the evaluator per domain as eval/<domain>/router/<name>."""

from __future__ import annotations

ENTROPY_MEAN = "entropy_mean"  # router entropy (nats) of the clean probabilities, mean over MoE layers
LB_LOSS = "lb_loss"  # metrics: the Switch load-balancing loss, mean over MoE layers (1 = balanced, E = collapsed)
Z_LOSS = "z_loss"  # metrics: the router z-loss, mean over MoE layers
ROUTER_NOISE_STD = "router_noise_std"  # metrics: the router's logit noise at this update


def fraction(layer: int) -> str:
    """[num_experts]: the share of the layer's token->expert assignments each expert received."""
    return f"layer{layer}/fraction"


def entropy(layer: int) -> str:
    """The layer's router entropy (nats), mean over tokens."""
    return f"layer{layer}/entropy"


def expert_shares(routing: dict, layer: int) -> list[float]:
    """The layer's per-expert fractions from a step's or an eval's routing statistics. Missing is a bug, not a
    quiet "no collapse": the stop would never fire."""
    name = fraction(layer)
    if name not in routing:
        raise RuntimeError(f"MoE layer {layer} reported no routing statistic {name!r} (reported: "
                           f"{', '.join(sorted(routing)) or 'none'}); the model's forward and models/moe/stats.py "
                           "disagree")
    return list(routing[name])


def largest_share(routing: dict, layers: list[int], topk: int) -> tuple[float, int, int]:
    """(share, layer, expert): the largest share of tokens any expert took in any of the layers. A logged fraction
    is a share of the N*k token->expert assignments, at most 1/k; times k it is the share of tokens that picked the
    expert among their k, which reaches 1 at collapse for any k (for top-1 the two are the same number)."""
    return max((share * topk, layer, expert) for layer in layers
               for expert, share in enumerate(expert_shares(routing, layer)))


def domain_information(layer: int) -> str:
    """Across an eval's domains: I(domain; expert) of the layer (nats), models/moe/specialisation.py."""
    return f"layer{layer}/domain_mi"


def domain_information_normalised(layer: int) -> str:
    """domain_information / its ceiling log(min(domains, experts)): 0 alike, 1 fully specialised."""
    return f"layer{layer}/domain_mi_norm"
