"""Document masking for transformers' GPT-2, through the same backends as PolyGLU (models/layers/attention.py).

`DOCUMENT_ATTENTION` names an attention implementation registered with transformers' AttentionInterface; a
GPT2LMHeadModel switched to it (`use_document_attention`) calls `document_attention` in every block:

* with a `document_context` keyword (an AttentionContext; `document_kwargs` builds it for a packed batch and
  the model's forward hands it down to every block), attention stays inside each document: a varlen kernel
  on CUDA in fp16/bf16, a block-diagonal causal mask for SDPA otherwise. GPT-2's attention dropout and
  scaling are passed on, so training behaves as with transformers' own SDPA.
* without one (generation, or a forward without document_ids), transformers' SDPA function runs unchanged on
  the mask transformers built: the mask builder registered under the same name is transformers' own SDPA one,
  so KV-cache decoding and padding masks work exactly as with attn_implementation="sdpa".
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.layers.attention import AttentionContext, attend, document_context, document_positions

DOCUMENT_ATTENTION = "document_masked_sdpa"


def document_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       document_context: AttentionContext | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q, k, v [B, H, T, hd] in, ([B, T, H, hd], weights) out."""
    if document_context is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # The document context replaces transformers' mask (which document_kwargs keeps to plain causal / None).
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), document_context,
                 dropout_p=dropout, scale=scaling)
    return out, None


AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
AttentionMaskInterface.register(DOCUMENT_ATTENTION, sdpa_mask)


def use_document_attention(hf: GPT2LMHeadModel) -> None:
    hf.set_attn_implementation(DOCUMENT_ATTENTION)


def document_kwargs(hf: GPT2LMHeadModel, input_ids: torch.Tensor, document_ids: torch.Tensor) -> dict:
    """Keyword arguments for `hf(input_ids=..., ...)` that keep every token inside its document.

    position_ids restart at 0 with every document: each document is then exactly the sequence it would be
    alone, which is also how it is seen at generation (a prompt starts at position 0), so SFT and pretraining
    learn the positions inference uses and a packed document's logits equal its logits run by itself.
    The all-ones attention_mask only stops transformers inferring packing from those position_ids and
    materialising its own [B, 1, T, T] mask (with no 2D mask it would); document_attention ignores the mask.
    """
    if document_ids.shape != input_ids.shape:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    # The dtype the attention projections will run in: the embedding's, or autocast's (varlen_backend checks).
    probe = input_ids.new_empty(input_ids.shape, dtype=hf.transformer.wte.weight.dtype)
    dropout = hf.config.attn_pdrop if hf.training else 0.0
    return {"position_ids": document_positions(document_ids), "attention_mask": torch.ones_like(input_ids),
            "document_context": document_context(probe, document_ids, dropout_p=dropout)}
