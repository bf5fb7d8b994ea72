"""The assistant-only loss: labels reach every family, and an update's loss is the mean over all its scored
tokens, however they fall into micro-batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.registry import build_model
from trainer.base import metrics as keys
from trainer.base.batch import IGNORE_INDEX
from trainer.config.schema import HardwareConfig
from trainer.engines.base import Engine
from trainer.loop import TrainingLoop
from trainer.optim import build_optimizer, build_scheduler

VOCAB, T = 64, 16
TINY = {
    "dense": dict(family="dense", n_layer=2, n_embd=32, n_head=2, n_positions=T),
    "moe": dict(family="moe", n_layer=2, n_embd=32, n_head=2, n_positions=T, moe_layers=[1], num_experts=2,
                noise_std=0.0),
    "polyglu": dict(family="polyglu", d_model=32, d_ff=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                    max_seq_len=T),
}


def tiny_model(family: str):
    from models.registry import config_schema

    torch.manual_seed(0)
    return build_model(config_schema(family)(**TINY[family]), vocab_size=VOCAB, eos_id=0)


def labelled_rows(n: int) -> dict[str, torch.Tensor]:
    """n rows with a different number of scored targets each (1, 5, 9, ...), the first row's all masked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row in range(1, n):
        start = T - 1 - 4 * row % (T - 2)
        labels[row, start:] = ids[row, start:]
    return {"input_ids": ids, "document_ids": torch.zeros_like(ids), "domain_ids": torch.zeros(n, dtype=torch.long),
            "labels": labels}


@pytest.mark.parametrize("family", sorted(TINY))
def test_labels_score_only_their_tokens_and_an_all_masked_batch_is_zero_not_nan(family):
    model = tiny_model(family).eval()
    batch = labelled_rows(4)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    # The same loss by hand from the plain-LM path's logits would need each family's internals; instead:
    # scoring only row 1 equals that row alone, and rows with nothing to score change nothing.
    only_row1 = model(input_ids=batch["input_ids"][1:2], labels=batch["labels"][1:2])
    rows_0_1 = model(input_ids=batch["input_ids"][:2], labels=batch["labels"][:2])
    torch.testing.assert_close(rows_0_1.lm_loss, only_row1.lm_loss, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.lm_loss)
    empty = model(input_ids=batch["input_ids"][:1], labels=batch["labels"][:1])
    assert empty.lm_loss.item() == 0.0 and torch.isfinite(empty.loss)
    unlabelled = model(input_ids=batch["input_ids"])
    full = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    torch.testing.assert_close(unlabelled.lm_loss, full.lm_loss)


class FixedStream:
    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)

    def pop_metrics(self):
        return {}


def gradients_of_one_update(model, batches, accum: int) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum_steps=accum, batch_size=len(batches[0]["input_ids"]),
                                                max_grad_norm=0.0),
                          data=SimpleNamespace(block_size=T))
    engine = Engine(HardwareConfig())
    optim_cfg = SimpleNamespace(learning_rate=1e-3, weight_decay=0.0, beta1=0.9, beta2=0.99, eps=1e-8,
                                warmup_fraction=0.0, min_lr_ratio=0.0, warmup_steps=None)
    optimizer = build_optimizer(model, optim_cfg)
    engine.setup(model, optimizer, build_scheduler(optimizer, optim_cfg, 10), cfg.train)
    grads = {}

    def capture():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    engine.optimizer_step = capture
    loop = TrainingLoop(cfg, engine, FixedStream(batches), {}, tracker=None, callbacks=None, run_dir=None,
                        checkpointer=None)
    metrics, _ = loop.train_step()
    return grads, metrics.logged


@pytest.mark.parametrize("family", ["dense", "polyglu"])
def test_loss_accumulated_over_micro_batches_equals_one_large_batch(family):
    rows = labelled_rows(4)
    halves = [{k: v[:2] for k, v in rows.items()}, {k: v[2:] for k, v in rows.items()}]
    model = tiny_model(family).eval()  # no Gumbel noise or dropout: both updates see the same function
    big, big_logged = gradients_of_one_update(model, [rows], accum=1)
    split, split_logged = gradients_of_one_update(model, halves, accum=2)
    assert big.keys() == split.keys() and big
    for name in big:
        torch.testing.assert_close(split[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    assert split_logged[keys.TRAIN_LM_LOSS] == pytest.approx(big_logged[keys.TRAIN_LM_LOSS], rel=1e-5)
    # The first micro-batch scores 1 token, the second many: a mean of the two means would weigh them alike.
    with torch.no_grad():
        first, second = (model(input_ids=h["input_ids"], labels=h["labels"]).lm_loss.item() for h in halves)
    assert split_logged[keys.TRAIN_LM_LOSS] != pytest.approx((first + second) / 2, rel=1e-3)
    assert split_logged[keys.BLOCKS_WITHOUT_TARGETS] == 1
    assert split_logged[keys.SCORED_TOKENS] == int((rows["labels"][:, 1:] != IGNORE_INDEX).sum())
