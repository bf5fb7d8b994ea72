"""The toy model: next-token logits from the token's embedding through two linear maps mixed by a gate."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.output import ModelOutput, lm_output
from trainer.base.batch import IGNORE_INDEX
from trainer.base.callbacks import Callback

GATE_SHARE = "gate_share"  # routing statistic: [2], the mean gate weight of each map


class GateReport(Callback):
    """Writes the last eval's gate shares per domain at the end of a run: a family's artifact."""

    name = "toy_gate_report"

    def on_train_end(self, run_dir, last_eval) -> None:
        report = {domain: result.routing[GATE_SHARE] for domain, result in last_eval.domains.items()}
        (Path(run_dir) / "toy_gate_report.json").write_text(json.dumps(report))


class ToyLM(nn.Module):
    family = "toy"

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.maps = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, 2)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def _mixed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(input_ids)
        gate = self.gate(x).softmax(dim=-1)  # [B, T, 2]
        a, b = self.maps(x).chunk(2, dim=-1)
        return torch.tanh(gate[..., :1] * a + gate[..., 1:] * b), gate

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        h, gate = self._mixed(input_ids)
        logits = self.head(h)[:, :-1]
        targets = (input_ids if labels is None else labels)[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1), reduction="sum")
        loss = loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return lm_output(loss, routing={GATE_SHARE: gate.detach().reshape(-1, 2).mean(dim=0)})

    # models/inference.py, for eval's tools. Each token's logits depend on that token alone: any length fits, padding
    # cannot reach another token, and there is nothing to cache.
    context_window = 1 << 16

    def new_cache(self) -> None:
        return None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: int | None = None,
               cache: None = None) -> tuple[torch.Tensor, None]:
        h, _ = self._mixed(input_ids if last is None else input_ids[:, -last:])
        return self.head(h), None

    def architecture(self) -> dict:
        return {"family": self.family, "vocab_size": self.vocab_size, "d_model": self.cfg.d_model}

    def no_weight_decay(self) -> set[str]:
        return set()

    def callbacks(self, cfg) -> list:
        return [GateReport()]


def build(model_cfg, vocab_size: int, eos_id: int) -> ToyLM:
    return ToyLM(model_cfg, vocab_size)
