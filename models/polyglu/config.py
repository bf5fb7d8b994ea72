"""model=polyglu: PolychromaticLM's keys and rules. The defaults are a CPU-sized model; the paper's 597M
configuration is preset=polyglu-pretrain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from models.family import ModelConfig
from trainer.base.checks import Rule
from trainer.base.errors import UserError

# mean: the paper's whole-sequence mean (future tokens steer earlier tokens' routing; for reproduction)
# causal: prefix mean, so a token's routing depends only on itself and earlier tokens of its document
ROUTING_POOLS = ("mean", "causal")


@dataclass
class PolyGLUConfig(ModelConfig):
    """PolychromaticLM: GQA, RoPE, RMSNorm pre-norm + QK-norm, tied head; every FFN is PolyGLU (each neuron a
    Gumbel-softmax mixture of ReLU / Tanh / SiLU / GELU, tau annealed 1.0 -> 0.1)."""

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
    routing_pool: str = "mean"  # one of ROUTING_POOLS
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed linearly over max_steps
    tau_end: float = 0.1
    tau_frozen: Optional[float] = None  # a fixed tau (SFT freezes it at 0.1); null = anneal
    entropy_reg: float = 0.0  # lambda of the optional regulariser: loss - lambda * mean routing entropy
    entropy_warning: float = 0.3  # warn when mean dynamic routing entropy at eval falls below this (nats)
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 4096  # cross-entropy in chunks: [tokens x vocab] fp32 logits never exist at once

    RULES: ClassVar[list[Rule]] = [
        ("d_model", lambda v: v >= 1, "an integer >= 1"),
        ("d_ff", lambda v: v >= 1, "an integer >= 1"),
        ("n_layers", lambda v: v >= 1, "an integer >= 1"),
        ("n_heads", lambda v: v >= 1, "an integer >= 1"),
        ("n_kv_heads", lambda v: v >= 1, "an integer >= 1"),
        ("head_dim", lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (RoPE rotates pairs)"),
        ("max_seq_len", lambda v: v >= 8, "an integer >= 8"),
        ("routing_pool", lambda v: v in ROUTING_POOLS, "mean (the paper's) or causal"),
        ("tau_start", lambda v: v > 0, "a positive temperature"),
        ("tau_end", lambda v: v > 0, "a positive temperature"),
        ("entropy_reg", lambda v: v >= 0, "a number >= 0"),
        ("loss_chunk_tokens", lambda v: v >= 1, "an integer >= 1"),
    ]

    def check(self, block_size: int) -> None:
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                            "grouped-query attention shares each KV head among n_heads / n_kv_heads query heads")
        if self.tau_frozen is not None and self.tau_frozen <= 0:
            raise UserError(f"model.tau_frozen={self.tau_frozen} must be a positive temperature (or null to anneal)")
        if block_size > self.max_seq_len:
            raise UserError(f"data.block_size={block_size} exceeds model.max_seq_len={self.max_seq_len}; "
                            "lower data.block_size or raise model.max_seq_len")


SCHEMA = PolyGLUConfig
