"""What only a GPU can check: the CUDA kernels against their CPU-tested references, and the trainer end to end on
CUDA. `pytest -m cuda` runs them (benchmarks/gpu/run.sh does); without a GPU they are skipped.

* document-masked attention through the varlen kernel equals masked SDPA, forward and backward, in bf16
* one bf16 training step per family through trainer/run.py, on the CUDA kernels (varlen attention, grouped_mm
  experts), named in the run's log
* exact resume in fp32 with hardware.deterministic=true: the resumed run's losses and weights are the
  uninterrupted run's, bit for bit
The MoE experts' grouped_mm path against the per-expert loop is in tests/test_moe_grouped_mm.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.layers.attention import (
    AttentionContext,
    attend,
    document_causal_mask,
    document_context,
)
from tests.conftest import assert_ok, tiny_run
from tests.test_train_e2e import assert_same_weights, train_losses

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Widths that are multiples of 8 (bf16 grouped_mm and the varlen kernels want 16-byte rows) and heads of 32.
FAMILIES = {
    "dense": ["model=dense", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_positions=128",
              "model.document_masking=true"],
    "moe": ["model=moe", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_positions=128",
            "model.document_masking=true", "model.moe_layers=[1]", "model.num_experts=4", "model.topk=2"],
    "polyglu": ["model=polyglu", "model.d_model=64", "model.d_ff=128", "model.n_layers=2", "model.n_heads=4",
                "model.n_kv_heads=2", "model.head_dim=16", "model.max_seq_len=128"],
}
# What each family's bf16 step must have run on, as its log says.
KERNELS = {"dense": ["varlen"], "moe": ["varlen", "grouped_mm"], "polyglu": ["varlen"]}


def document_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """Rows of documents of random lengths (8..t/2), numbered 0, 1, ... left to right as the data pipeline does."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        ids, doc = [], 0
        while len(ids) < t:
            ids += [doc] * int(torch.randint(8, t // 2, (1,), generator=g))
            doc += 1
        rows.append(ids[:t])
    return torch.tensor(rows, device="cuda")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 4, 64), (12, 12, 64), (16, 8, 128)])
def test_varlen_attention_equals_masked_sdpa_forward_and_backward_in_bf16(heads, kv_heads, head_dim):
    b, t = 2, 1024
    docs = document_ids(b, t)
    probe = torch.empty(b, t, 1, device="cuda", dtype=torch.bfloat16)
    ctx = document_context(probe, docs)
    assert ctx.varlen is not None, "no varlen kernel on this GPU: torch < 2.9 without flash-attn, or pre-Ampere"
    masked = AttentionContext(attn_mask=document_causal_mask(docs))

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, t, n, head_dim, device="cuda", dtype=torch.bfloat16)
               for n in (heads, kv_heads, kv_heads))
    upstream = torch.randn(b, t, heads, head_dim, device="cuda", dtype=torch.bfloat16)

    def run(context, dtype):
        leaves = [z.detach().to(dtype).requires_grad_() for z in (q, k, v)]
        out = attend(*leaves, context)
        out.backward(upstream.to(dtype))
        return out.detach(), [z.grad for z in leaves]

    out_v, grads_v = run(ctx, torch.bfloat16)
    out_m, grads_m = run(masked, torch.bfloat16)
    out_ref, grads_ref = run(masked, torch.float32)  # the fp32 truth both bf16 paths approximate
    # The varlen kernel is as close to fp32 as bf16 masked SDPA is (a small margin for rounding order).
    for name, got, bf16, ref in [("out", out_v, out_m, out_ref), *zip("qkv", grads_v, grads_m, grads_ref, strict=True)]:
        assert relative_error(got, ref) <= 1.5 * relative_error(bf16, ref) + 2e-3, name
        assert relative_error(got, bf16) < 2e-2, name


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_bf16_training_step_per_family_through_the_trainer(tmp_path, data_cache, family):
    result = tiny_run(tmp_path, data_cache, *FAMILIES[family], "hardware=cuda", "train.max_steps=2",
                      "train.eval_every=2", "checkpoint.save_every=2", "data.block_size=128", name=family,
                      model_sizes=[])
    assert_ok(result)
    run = tmp_path / family
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 2
    losses = train_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    log = result.stdout + result.stderr
    assert "falls back to SDPA" not in log
    for kernel in KERNELS[family]:
        assert kernel in log, f"the {family} step did not say it ran on {kernel}"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["moe", "polyglu"])
def test_exact_resume_on_cuda_in_fp32(tmp_path, data_cache, family):
    common = [*FAMILIES[family], "hardware=cuda", "hardware.precision=fp32", "hardware.deterministic=true",
              "train.max_steps=6", "train.eval_every=3", "checkpoint.save_every=3", "data.block_size=128"]
    assert_ok(tiny_run(tmp_path, data_cache, *common, name="whole", model_sizes=[]))
    whole = tmp_path / "whole"
    assert_ok(tiny_run(tmp_path, data_cache, *common, f"run.resume={whole / 'ckpt-step-3.pt'}", name="resumed",
                       model_sizes=[]))
    resumed = tmp_path / "resumed"
    assert {s: v for s, v in train_losses(whole).items() if s > 3} == train_losses(resumed)
    assert_same_weights(whole / "final-model.safetensors", resumed / "final-model.safetensors")
