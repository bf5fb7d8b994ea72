"""The routing statistics PolyGLU reports in ModelOutput.routing (and per-step scalars in ModelOutput.metrics),
by name: one definition shared by the model that emits them and the callbacks that read them."""

from __future__ import annotations

DYNAMIC_ENTROPY_MEAN = "dynamic_entropy/mean"  # entropy of the routing that was used, mean over layers (nats)
STATIC_ENTROPY_MEAN = "static_entropy/mean"  # entropy of softmax(alpha) alone, mean over layers
TAU = "tau"  # metrics: the Gumbel-softmax temperature of this update
ROUTING_ENTROPY = "routing_entropy"  # metrics: DYNAMIC_ENTROPY_MEAN, logged every step


def dynamic_entropy(layer: int) -> str:
    return f"dynamic_entropy/layer{layer}"


def static_entropy(layer: int) -> str:
    return f"static_entropy/layer{layer}"
