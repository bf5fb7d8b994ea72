"""PolychromaticLM backbone: a Qwen3-style decoder (GQA, QK-norm, RoPE, RMSNorm pre-norm, tied head) whose
feed-forward block is supplied by a factory (PolyGLU for the paper model).

Parameter count of the paper shape (d_model 1024, d_ff 4096, 28 layers, 16 query / 8 KV heads of 64, PolyGLU
with alpha [d_ff, 4], beta [4], gate_net 1024->32->4 with biases, vocabulary 151,669 unpadded, tied head):

    per layer: attention 1024*(1024 + 512 + 512) + 1024*1024 = 3,145,728; q_norm + k_norm 128; two RMSNorms 2,048
               PolyGLU 3*1024*4096 = 12,582,912 + alpha 16,384 + beta 4 + gate_net 32,800 + 132 = 32,932
               -> 15,780,136;  x 28 = 441,843,808
    embedding (= head, tied) 151,669 * 1024 = 155,309,056; final norm 1,024
    total 597,153,888 -- exactly the published count, so the paper used the UNPADDED vocabulary.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.inference import token_positions
from models.layers.attention import AttentionContext, attention_context, cached_step_context
from models.layers.loss import IGNORE_INDEX, chunked_cross_entropy
from models.layers.norm import RMSNorm
from models.polyglu.attention import GroupedQueryAttention, KVCache

INIT_STD = 0.02


@dataclass
class TransformerShape:
    """Plain numbers, filled by the lead from the config."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 4096


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)) (pre-norm)."""

    def __init__(self, shape: TransformerShape, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.attn = GroupedQueryAttention(shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim,
                                          norm_eps=shape.norm_eps)
        self.ffn_norm = RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.ffn = ffn
        # The contract is forward(x, document_ids=None); an FFN that takes only x (a plain SwiGLU) still works.
        params = inspect.signature(ffn.forward).parameters
        self._ffn_takes_document_ids = "document_ids" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def forward(self, x: torch.Tensor, ctx: AttentionContext, document_ids: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, document_ids=document_ids) if self._ffn_takes_document_ids else self.ffn(h))

    def infer(self, x: torch.Tensor, ctx: AttentionContext, kv: KVCache, ffn_state, valid: torch.Tensor
              ) -> torch.Tensor:
        """forward for eval's padded rows: `ffn_state` is what the FFN's `infer` carries between calls (None for an
        FFN that mixes no positions, which runs as it is)."""
        x = x + self.attn(self.attn_norm(x), ctx, kv)
        h = self.ffn_norm(x)
        return x + (self.ffn(h) if ffn_state is None else self.ffn.infer(h, ffn_state, valid))


class InferenceCache:
    """Per layer, the attention's keys and values and the FFN's inference state (PolyGLU's causal pool): kept across
    the steps of cached generation, or built for one call and dropped."""

    def __init__(self, layers: nn.ModuleList):
        self.kv = [KVCache() for _ in layers]
        self.ffn_states = [block.ffn.new_inference_state() if hasattr(block.ffn, "new_inference_state") else None
                           for block in layers]

    @property
    def length(self) -> int:
        """Positions cached so far (padding included)."""
        return 0 if self.kv[0].k is None else self.kv[0].k.shape[1]


class PolychromaticTransformer(nn.Module):
    def __init__(self, shape: TransformerShape, ffn_factory: Callable[[int, int], nn.Module]):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.d_model)
        self.layers = nn.ModuleList(TransformerBlock(shape, ffn_factory(shape.d_model, shape.d_ff))
                                    for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding with the head (again: `to_empty()` after meta construction unties them)."""
        if self.shape.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) for the embedding and every projection; attention out-projections and the FFN's W_down
        N(0, 0.02 / sqrt(2 * n_layers)); RMSNorm weights 1.

        Inside the FFN only W_gate / W_up / W_down are touched (nn.Linear or a 2-D parameter); anything else
        (PolyGLU's alpha, beta, gate_net) keeps the FFN module's own initialisation.
        Safe to call again after building on the meta device and `to_empty()` (it re-ties the head).
        """
        self.tie_weights()
        resid_std = INIT_STD / math.sqrt(2 * self.shape.n_layers)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=INIT_STD)
        if not self.shape.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=INIT_STD)
        self.norm.reset_parameters()
        for block in self.layers:
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.attn.q_norm.reset_parameters()
            block.attn.k_norm.reset_parameters()
            for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=INIT_STD)
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=resid_std)
            for name, std in (("W_gate", INIT_STD), ("W_up", INIT_STD), ("W_down", resid_std)):
                w = _weight_of(getattr(block.ffn, name, None))
                if w is not None:
                    nn.init.normal_(w, mean=0.0, std=std)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model] (what the head multiplies)."""
        x = self.embed_tokens(input_ids)
        ctx = attention_context(x, document_ids, self.shape.head_dim, self.shape.rope_theta, self.shape.max_seq_len)
        use_ckpt = self.shape.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if use_ckpt:
                x = checkpoint(block, x, ctx, document_ids, use_reentrant=False)
            else:
                x = block(x, ctx, document_ids)
        return self.norm(x)

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """hidden_states for eval's padded rows (models/inference.py): the prompts first, padding kept apart as its
        own document, then, when the cache is kept, the new tokens of each step against it."""
        n = input_ids.shape[1]
        if attention_mask.shape[1] > self.shape.max_seq_len:
            raise ValueError(f"sequence length {attention_mask.shape[1]} exceeds max_seq_len {self.shape.max_seq_len}")
        positions = token_positions(attention_mask)[:, -n:]
        x = self.embed_tokens(input_ids)
        if cache.length == 0:
            ctx = attention_context(x, attention_mask, self.shape.head_dim, self.shape.rope_theta,
                                    self.shape.max_seq_len, positions)
        else:
            ctx = cached_step_context(attention_mask, positions, self.shape.head_dim, self.shape.rope_theta)
        valid = attention_mask[:, -n:]
        for block, kv, state in zip(self.layers, cache.kv, cache.ffn_states, strict=True):
            x = block.infer(x, ctx, kv, state, valid)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """With labels: (mean next-token cross-entropy, None); without: (None, logits [B, T, V]).

        Position t is scored on labels[t + 1] (the shift happens here; labels == input_ids for plain LM
        training; IGNORE_INDEX = -100 marks targets without loss). Standard packing: the last token of a
        document IS scored on the first token of the next document in the block (it cannot see that
        document, so it learns the unconditional document-start distribution); only the last position of each
        row, which has no next token, is dropped. The loss is computed `loss_chunk_tokens` rows at a time, so
        the [tokens, vocab] logits never exist at once, in the forward or the backward.
        """
        h = self.hidden_states(input_ids, document_ids)
        if labels is None:
            return None, self.lm_head(h)
        b, t, d = h.shape
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        loss = chunked_cross_entropy(h.reshape(b * t, d), self.lm_head.weight, targets.reshape(b * t),
                                     self.shape.loss_chunk_tokens)
        return loss, None


def _weight_of(obj) -> torch.Tensor | None:
    if isinstance(obj, nn.Linear):
        return obj.weight
    if isinstance(obj, torch.Tensor) and obj.dim() == 2:
        return obj
    return None


def count_parameters_without_allocating(shape: TransformerShape,
                                        ffn_factory: Callable[[int, int], nn.Module]) -> int:
    """Build the model on the meta device (no storage) and count unique parameters (a tied head counts once)."""
    with torch.device("meta"):
        model = PolychromaticTransformer(shape, ffn_factory)
    return sum(p.numel() for p in model.parameters())
