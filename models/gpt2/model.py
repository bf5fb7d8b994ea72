"""Dense GPT-2: transformers' GPT2LMHeadModel, pretrained (hub or local directory) or randomly initialised."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache, GPT2LMHeadModel, GPT2Model
from transformers import GPT2Config as HFGPT2Config

from models.gpt2.attention import document_kwargs, use_document_attention
from models.inference import token_positions
from models.output import ModelOutput, lm_output
from trainer.base.batch import IGNORE_INDEX
from trainer.base.errors import UserError

# transformers 5.2x renamed GPT2Model.forward's past_key_values to cache (the old name warns, then goes).
_CACHE_KEYWORD = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def load_gpt2(model_cfg, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    if model_cfg.pretrained:
        source = model_cfg.pretrained
        model_cfg.check_sources()
        hf = GPT2LMHeadModel.from_pretrained(source)
        if hf.config.vocab_size != vocab_size:
            raise UserError(f"model.pretrained={source!r} has a {hf.config.vocab_size}-token vocabulary but the "
                            f"tokenizer has {vocab_size}; use data.tokenizer.name=gpt2 with pretrained GPT-2")
        return hf
    config = HFGPT2Config(
        vocab_size=vocab_size, n_positions=model_cfg.n_positions, n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout, bos_token_id=eos_id, eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def lm_targets(input_ids: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """transformers' loss arguments (it shifts labels itself). Without labels every next token is scored, its
    mean as before; with labels (IGNORE_INDEX where no loss) the sum is divided by the scored count, clamped to
    1: a batch with nothing to score gives a 0 that still has a graph, where transformers' mean gives NaN."""
    if labels is None:
        return {"labels": input_ids}
    return {"labels": labels, "num_items_in_batch": (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)}


def gpt2_architecture(hf: GPT2LMHeadModel) -> dict:
    c = hf.config
    return {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
            "n_positions": c.n_positions, "vocab_size": c.vocab_size}


class DenseGPT2(nn.Module):
    family = "dense"

    def __init__(self, hf: GPT2LMHeadModel, document_masking: bool = False):
        super().__init__()
        self.hf = hf
        self.document_masking = document_masking
        if document_masking:
            use_document_attention(hf)

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        return lm_output(self.scored_forward(input_ids, document_ids, labels).loss)

    def scored_forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None,
                       labels: torch.Tensor | None):
        """transformers' forward with the loss, for training and eval. No KV cache: transformers builds one by
        default, and only generation reads it."""
        return self.hf(input_ids=input_ids, use_cache=False, **lm_targets(input_ids, labels),
                       **self.hf_kwargs(input_ids, document_ids))

    def hf_kwargs(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> dict:
        """What `self.hf(input_ids=...)` needs besides the ids (and labels) for this batch. With
        model.document_masking and document_ids: per-document positions and attention (models/gpt2/attention.py);
        otherwise nothing, and packed blocks attend across their documents as the MoE-emergence seed did."""
        if not self.document_masking or document_ids is None:
            return {}
        return document_kwargs(self.hf, input_ids, document_ids)

    def architecture(self) -> dict:
        return {"family": self.family, **gpt2_architecture(self.hf)}

    # ------------------------------------------------------------------ inference (models/inference.py)
    @property
    def context_window(self) -> int:
        return self.hf.config.n_positions

    def new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.hf.config)
        except TypeError:  # older transformers build it without the config
            return DynamicCache()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: int | None = None,
               cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache | None]:
        # Explicit positions: transformers' GPT-2 counts them from the row's first slot, padding included.
        positions = token_positions(attention_mask)[:, -input_ids.shape[1]:]
        out = self.hf.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=cache is not None, **{_CACHE_KEYWORD: cache})
        h = out.last_hidden_state if last is None else out.last_hidden_state[:, -last:]
        return self.hf.lm_head(h), cache

    def no_weight_decay(self) -> set[str]:
        return set()

    def callbacks(self, cfg) -> list:
        return []


def build(model_cfg, vocab_size: int, eos_id: int) -> DenseGPT2:
    hf = load_gpt2(model_cfg, vocab_size, eos_id)
    hf.loss_type = "ForCausalLM"  # named, or transformers warns on every run that it had to guess
    return DenseGPT2(hf, document_masking=model_cfg.document_masking)
