"""MoE feed-forward layer: router gates, aux losses, dispatch equivalence, GPT-2 warm start, noise."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from models.moe.dispatch import grouped_expert_ffn, per_expert_loop_ffn
from models.moe.layer import MoEFeedForward
from models.moe.losses import load_balancing_loss, z_loss
from models.moe.router import NoisyTopKRouter

D, F, E, N = 16, 32, 6, 64
GELU = ACT2FN["gelu_new"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gpt2_mlp(seed: int = 0) -> GPT2MLP:
    torch.manual_seed(seed)
    mlp = GPT2MLP(4 * D, GPT2Config(n_embd=D, resid_pdrop=0.0))
    with torch.no_grad():  # Conv1D biases start at zero; make them matter
        for p in mlp.parameters():
            p.normal_(std=0.3)
    return mlp.eval()


# --- router -------------------------------------------------------------------------------------------

def test_top1_gates_are_exactly_one_and_gradient_reaches_router():
    layer = MoEFeedForward(D, F, num_experts=E, topk=1)
    x = torch.randn(2, N // 2, D, generator=gen())
    route = layer.router(x.reshape(-1, D))
    assert route.gates.shape == (N, 1)
    assert torch.equal(route.gates.detach(), torch.ones(N, 1))
    layer(x).square().sum().backward()  # LM-like loss only: no aux terms
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_top2_gates_sum_to_one_over_distinct_experts():
    router = NoisyTopKRouter(D, E, topk=2)
    out = router(torch.randn(N, D, generator=gen()))
    assert out.expert_index.shape == (N, 2) and out.gates.shape == (N, 2)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(N))
    assert (out.expert_index[:, 0] != out.expert_index[:, 1]).all()
    assert (out.gates > 0).all()


def test_routing_math_is_fp32_under_bf16_autocast():
    router = NoisyTopKRouter(D, E, topk=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(torch.randn(N, D, generator=gen()).bfloat16())
    assert out.logits.dtype == out.probs.dtype == out.routing_probs.dtype == torch.float32


# --- losses -------------------------------------------------------------------------------------------

def test_load_balancing_loss_is_one_at_perfect_balance_and_e_at_collapse():
    probs = torch.full((N, 8), 1 / 8)
    balanced = torch.arange(N).remainder(8)[:, None]
    assert abs(load_balancing_loss(probs, balanced, 8).item() - 1.0) < 1e-6
    balanced_top2 = torch.stack([torch.arange(N) % 8, (torch.arange(N) + 1) % 8], dim=-1)
    assert abs(load_balancing_loss(probs, balanced_top2, 8).item() - 1.0) < 1e-6

    collapsed_probs = torch.zeros(N, 8)
    collapsed_probs[:, 3] = 1.0
    collapsed = torch.full((N, 1), 3)
    assert load_balancing_loss(collapsed_probs, collapsed, 8).item() == pytest.approx(8.0, abs=1e-6)


def test_load_balancing_loss_gradient_flows_through_probs_only():
    logits = torch.randn(N, E, generator=gen(), requires_grad=True)
    probs = logits.softmax(-1)
    load_balancing_loss(probs, probs.argmax(-1, keepdim=True), E).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, -2.0], [3.0, 3.0]])
    lse = [math.log(2.0), math.log(math.e + math.exp(-2.0)), 3.0 + math.log(2.0)]
    expected = sum(v * v for v in lse) / 3
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


# --- dispatch -----------------------------------------------------------------------------------------

def _dispatch_inputs(topk: int, skip_experts: tuple[int, ...] = ()):
    g = gen(topk + 10 * len(skip_experts))
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    scores = torch.rand(N, len(allowed), generator=g)
    expert_index = allowed[scores.topk(topk, dim=-1).indices]
    gates = torch.rand(N, topk, generator=g) + 0.1
    if topk > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    tensors = [
        torch.randn(N, D, generator=g), gates,
        torch.randn(E, D, F, generator=g) * 0.3, torch.randn(E, F, generator=g) * 0.3,
        torch.randn(E, F, D, generator=g) * 0.3, torch.randn(E, D, generator=g) * 0.3,
    ]
    return expert_index, [t.requires_grad_() for t in tensors]


def _run(fn, expert_index, tensors, upstream):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    x, gates, w_fc, b_fc, w_proj, b_proj = ts
    out = fn(x, expert_index, gates, w_fc, b_fc, w_proj, b_proj, GELU)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in ts]


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("skip_experts", [(), (0, 4)])
def test_grouped_dispatch_matches_per_expert_loop(topk, skip_experts):
    expert_index, tensors = _dispatch_inputs(topk, skip_experts)
    counts = torch.bincount(expert_index.reshape(-1), minlength=E)
    assert all(counts[e] == 0 for e in skip_experts)
    upstream = torch.randn(N, D, generator=gen(99))
    out_ref, grads_ref = _run(per_expert_loop_ffn, expert_index, tensors, upstream)
    out, grads = _run(grouped_expert_ffn, expert_index, tensors, upstream)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    names = ["x", "gates", "w_fc", "b_fc", "w_proj", "b_proj"]
    for name, grad, ref in zip(names, grads, grads_ref, strict=True):
        assert grad is not None, name
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for e in skip_experts:  # experts without tokens get exactly zero gradient, not garbage
        assert grads[2][e].abs().sum() == 0 and grads[4][e].abs().sum() == 0


def test_grouped_dispatch_under_bf16_autocast_returns_bf16_and_fp32_grads():
    expert_index, tensors = _dispatch_inputs(2)
    x, gates, w_fc, b_fc, w_proj, b_proj = tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_expert_ffn(x, expert_index, gates, w_fc, b_fc, w_proj, b_proj, GELU)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w_fc.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = per_expert_loop_ffn(x.detach(), expert_index, *[t.detach() for t in tensors[1:]], GELU)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


# --- layer --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("topk", [1, 2])
def test_warm_start_reproduces_the_dense_mlp(topk):
    mlp = gpt2_mlp()
    x = torch.randn(2, N // 2, D, generator=gen(1))
    layer = MoEFeedForward.from_gpt2_mlp(mlp, num_experts=8, topk=topk, noise_std=0.0, perturbation=0.0).eval()
    with torch.no_grad():
        dense = mlp(x)
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
        nudged = MoEFeedForward.from_gpt2_mlp(mlp, 8, topk, 0.0, perturbation=1e-3, generator=gen(2)).eval()
        out = nudged(x)
    assert not torch.equal(nudged.w_fc[0], nudged.w_fc[1])  # experts differ, so they can specialise
    assert (out - dense).abs().max() < 1e-2 * dense.abs().max()
    assert layer.router.weight.std() < 0.05 and not hasattr(layer.router, "bias")


def test_warm_start_is_reproducible_from_a_generator():
    mlp = gpt2_mlp()
    a = MoEFeedForward.from_gpt2_mlp(mlp, 4, 1, 0.0, perturbation=1e-2, generator=gen(5))
    b = MoEFeedForward.from_gpt2_mlp(mlp, 4, 1, 0.0, perturbation=1e-2, generator=gen(5))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a.dropout.p == mlp.dropout.p


def test_noise_only_in_training_and_logits_stay_clean():
    router = NoisyTopKRouter(D, E, topk=1, noise_std=5.0)
    x = torch.randn(N, D, generator=gen())
    router.eval()
    clean = router(x)
    assert torch.equal(router(x).expert_index, clean.expert_index)  # eval never adds noise
    router.train()
    noisy = router(x)
    assert not torch.equal(noisy.expert_index, clean.expert_index)
    assert torch.equal(noisy.logits, clean.logits) and torch.equal(noisy.probs, clean.probs)
    assert not torch.equal(noisy.routing_probs, clean.probs)
    router.noise_std = 0.0  # a schedule annealed it away: training routing is deterministic again
    assert torch.equal(router(x).expert_index, clean.expert_index)
    assert torch.equal(router(x).routing_probs, clean.probs)


@pytest.mark.parametrize("topk", [1, 2])
def test_last_aux_reports_losses_and_metrics(topk):
    layer = MoEFeedForward(D, F, num_experts=E, topk=topk, noise_std=0.1).train()
    x = torch.randn(2, N // 2, D, generator=gen(), requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    aux = layer.last_aux
    assert set(aux) == {"lb_loss", "z_loss", "fraction", "entropy", "prob_mean"}
    assert aux["lb_loss"].requires_grad and aux["z_loss"].requires_grad
    for key in ("fraction", "entropy", "prob_mean"):
        assert not aux[key].requires_grad, key
    assert aux["fraction"].shape == aux["prob_mean"].shape == (E,)
    assert aux["fraction"].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert aux["prob_mean"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= aux["entropy"].item() <= math.log(E) + 1e-5
    (out.sum() + aux["lb_loss"] + aux["z_loss"]).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_layer_dropout_only_in_training():
    layer = MoEFeedForward(D, F, num_experts=E, topk=1, dropout=0.5)
    x = torch.randn(1, N, D, generator=gen())
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert (layer(x) == 0).float().mean() > 0.2
