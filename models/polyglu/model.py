"""PolychromaticLM (the PolyGLU family): the transformer backbone with a PolyGLU FFN in every block."""

from __future__ import annotations

import torch
from torch import nn

from models.output import ModelOutput, lm_output
from models.polyglu import stats
from models.polyglu.callbacks import RoutingEntropyWarning, TauSchedule
from models.polyglu.ffn import PolyGLU
from models.polyglu.transformer import InferenceCache, PolychromaticTransformer, TransformerShape


def transformer_shape(cfg, vocab_size: int) -> TransformerShape:
    return TransformerShape(
        vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff, max_seq_len=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, activation_checkpointing=cfg.activation_checkpointing,
        loss_chunk_tokens=cfg.loss_chunk_tokens,
    )


def ffn_factory(cfg):
    return lambda d_model, d_ff: PolyGLU(d_model, d_ff, routing_pool=cfg.routing_pool)


class PolyGLULM(nn.Module):
    family = "polyglu"

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.net = PolychromaticTransformer(transformer_shape(cfg, vocab_size), ffn_factory(cfg))
        self.vocab_size = vocab_size
        self.set_tau(cfg.tau_frozen if cfg.tau_frozen is not None else cfg.tau_start)
        for ffn in self.ffns():
            ffn.entropy_graph = cfg.entropy_reg > 0

    def ffns(self) -> list[PolyGLU]:
        return [block.ffn for block in self.net.layers]

    def set_tau(self, tau: float) -> None:
        for ffn in self.ffns():
            ffn.tau = tau

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        loss, _ = self.net(input_ids, document_ids=document_ids, labels=input_ids if labels is None else labels)
        ffns = self.ffns()
        dynamic = [f.last_routing["entropy"] for f in ffns]
        routing = {stats.dynamic_entropy(i): e for i, e in enumerate(dynamic)}
        routing[stats.DYNAMIC_ENTROPY_MEAN] = torch.stack(dynamic).mean()
        with torch.no_grad():
            static = [f.static_entropy() for f in ffns]
        routing.update({stats.static_entropy(i): e for i, e in enumerate(static)})
        routing[stats.STATIC_ENTROPY_MEAN] = torch.stack(static).mean()
        metrics = {stats.TAU: torch.tensor(ffns[0].tau, device=loss.device),
                   stats.ROUTING_ENTROPY: routing[stats.DYNAMIC_ENTROPY_MEAN]}
        aux = {}
        if self.cfg.entropy_reg > 0:
            differentiable = torch.stack([f.last_entropy for f in ffns]).mean()
            aux["entropy_reg"] = -self.cfg.entropy_reg * differentiable
        return lm_output(loss, aux_losses=aux, metrics=metrics, routing=routing)

    def architecture(self) -> dict:
        c = self.cfg
        return {"family": self.family, "vocab_size": self.vocab_size, "d_model": c.d_model, "d_ff": c.d_ff,
                "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
                "max_seq_len": c.max_seq_len, "routing_pool": c.routing_pool}

    def no_weight_decay(self) -> set[str]:
        # alpha is [d_ff, 4], a matrix by shape but a per-neuron routing preference, not a weight to shrink
        # (the paper decayed it for half its run because it is 2-D). beta and the norms are 1-D anyway.
        return {name for name, _ in self.named_parameters() if name.endswith((".alpha", ".beta"))}

    def callbacks(self, cfg) -> list:
        c = self.cfg
        return [TauSchedule(self, c.tau_start, c.tau_end, cfg.train.max_steps, c.tau_frozen),
                RoutingEntropyWarning(c.entropy_warning, c.entropy_reg)]

    # ------------------------------------------------------------------ inference (models/inference.py)
    @property
    def context_window(self) -> int:
        return self.cfg.max_seq_len

    def new_cache(self) -> InferenceCache | None:
        """A KV cache with routing_pool=causal. The whole-sequence mean pool has none: each new token changes the
        pooled input, so the routing, of every earlier token, and generation recomputes the whole sequence."""
        return InferenceCache(self.net.layers) if self.cfg.routing_pool == "causal" else None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: int | None = None,
               cache: InferenceCache | None = None) -> tuple[torch.Tensor, InferenceCache | None]:
        # Padding is a document of its own in attention and stays out of the routing pool; without a cache to keep,
        # one is built for this call (the mean pool then routes each row once, not once per position).
        h = self.net.infer(input_ids, attention_mask, InferenceCache(self.net.layers) if cache is None else cache)
        if last is not None:
            h = h[:, -last:]
        return self.net.lm_head(h), cache


def build(model_cfg, vocab_size: int, eos_id: int) -> PolyGLULM:
    return PolyGLULM(model_cfg, vocab_size)
