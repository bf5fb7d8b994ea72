"""MoE expert FFN through torch._grouped_mm: equal to the per-expert loop (outputs and every gradient), padding
that never leaks, determinism, no host sync, and the kernel chooser. Runs on CPU (grouped_mm's CPU fallback);
two `cuda` tests repeat the comparison at GPT-2-small sizes and check for syncs where there is a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from models.moe import dispatch
from models.moe.dispatch import ALIGN, expert_ffn, expert_kernel, grouped_mm_expert_ffn, per_expert_loop_ffn
from models.moe.layer import MoEFeedForward

pytestmark = pytest.mark.skipif(not dispatch.GROUPED_MM_AVAILABLE, reason="this torch has no torch._grouped_mm")

N, D, F, E = 50, 16, 32, 4
GELU = ACT2FN["gelu_new"]
NAMES = ["x", "gates", "w_fc", "b_fc", "w_proj", "b_proj"]


def _inputs(topk: int, n: int = N, d: int = D, f: int = F, e: int = E, seed: int = 0, device: str = "cpu"):
    """Expert 0 gets no tokens; the others get counts that are not multiples of ALIGN (checked by the tests)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, e - 1, generator=g)
    expert_index = scores.topk(topk, dim=-1).indices + 1
    gates = torch.rand(n, topk, generator=g) + 0.1
    gates = gates / gates.sum(-1, keepdim=True)
    tensors = [
        torch.randn(n, d, generator=g), gates,
        torch.randn(e, d, f, generator=g) * d ** -0.5, torch.randn(e, f, generator=g) * 0.3,
        torch.randn(e, f, d, generator=g) * f ** -0.5, torch.randn(e, d, generator=g) * 0.3,
    ]
    return expert_index.to(device), [t.to(device) for t in tensors]


def _run(fn, expert_index, tensors, upstream=None, dtype=None):
    ts = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]
    out = fn(ts[0], expert_index, ts[1], *ts[2:], GELU)
    # upstream=None: out.sum(), whose broadcast (stride-0) gradient _grouped_mm's backward must never see.
    loss = out.float().sum() if upstream is None else (out.float() * upstream).sum()
    loss.backward()
    return out.detach(), [t.grad for t in ts]


def _assert_matches(got, ref, atol, rtol):
    out, grads = got
    out_ref, grads_ref = ref
    torch.testing.assert_close(out.float(), out_ref.float(), atol=atol, rtol=rtol)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert grad is not None, name
        assert grad.dtype == grad_ref.dtype, name
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _assert_matches_bf16(got, ref, rel: float = 0.02):
    """bf16 tolerance: outputs elementwise; gradients, which sum many rounded products (a few elements of a
    weight gradient land ~10% off), by the error's norm relative to the reference's norm."""
    out, grads = got
    out_ref, grads_ref = ref
    torch.testing.assert_close(out.float(), out_ref.float(), atol=0.05, rtol=0.05)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        err = (grad.float() - grad_ref.float()).norm() / grad_ref.float().norm().clamp_min(1e-6)
        assert err < rel, f"{name}: relative error {err.item():.4f}"


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("broadcast_grad", [False, True])
def test_grouped_mm_matches_per_expert_loop_fp32(topk, broadcast_grad):
    expert_index, tensors = _inputs(topk)
    counts = torch.bincount(expert_index.reshape(-1), minlength=E)
    assert counts[0] == 0  # an expert without tokens
    assert any(c % ALIGN != 0 for c in counts[1:].tolist())  # groups that need padding
    upstream = None if broadcast_grad else torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    ref = _run(per_expert_loop_ffn, expert_index, tensors, upstream)
    got = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream)
    _assert_matches(got, ref, atol=1e-5, rtol=1e-5)
    grads = got[1]
    # The expert without tokens gets exactly zero gradient, padding rows and all.
    for grad in (grads[2], grads[3], grads[4], grads[5]):
        assert grad[0].abs().sum() == 0


def test_last_expert_takes_the_leftover_rows_even_when_it_has_no_tokens():
    # All tokens go to expert 0: the last expert's group is nothing but padding rows (the static buffer's
    # leftover), which must still add exactly zero to its gradients and nothing to the output.
    expert_index, tensors = _inputs(1)
    expert_index = torch.zeros_like(expert_index)
    ref = _run(per_expert_loop_ffn, expert_index, tensors)
    got = _run(grouped_mm_expert_ffn, expert_index, tensors)
    _assert_matches(got, ref, atol=1e-5, rtol=1e-5)
    for grad in got[1][2:]:
        assert grad[1:].abs().sum() == 0


@pytest.mark.parametrize("topk", [1, 2])
def test_grouped_mm_matches_per_expert_loop_bf16(topk):
    expert_index, tensors = _inputs(topk)
    upstream = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    got = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream, dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got[1])
    ref = _run(per_expert_loop_ffn, expert_index, tensors, upstream, dtype=torch.bfloat16)
    _assert_matches_bf16(got, ref)
    # And close to the fp32 truth.
    ref32 = _run(per_expert_loop_ffn, expert_index, tensors, upstream)
    _assert_matches_bf16((got[0], [g.float() for g in got[1]]), ref32)


@pytest.mark.parametrize("topk", [1, 2])
def test_grouped_mm_under_bf16_autocast_gives_fp32_grads_close_to_the_loop(topk):
    expert_index, tensors = _inputs(topk)
    upstream = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream)
    assert out.dtype == torch.bfloat16
    for name, grad in zip(NAMES, grads, strict=True):
        assert grad is not None and grad.dtype == torch.float32, name
    ref = _run(per_expert_loop_ffn, expert_index, tensors, upstream)
    _assert_matches_bf16((out, grads), ref)


def test_padding_never_makes_non_finite_values():
    # Uninitialised memory is often left over from earlier tensors: fill the allocator's free blocks with NaN
    # first, so a padding row the code forgot to zero would very likely show up as NaN in some gradient.
    junk = torch.full((8 * N * 2 + E * ALIGN, F), float("nan"))
    del junk
    expert_index, tensors = _inputs(2, seed=3)
    out, grads = _run(grouped_mm_expert_ffn, expert_index, tensors)
    assert torch.isfinite(out).all()
    for name, grad in zip(NAMES, grads, strict=True):
        assert torch.isfinite(grad).all(), name


def test_grouped_mm_is_deterministic():
    expert_index, tensors = _inputs(2, seed=5)
    upstream = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    out_a, grads_a = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream)
    out_b, grads_b = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream)
    assert torch.equal(out_a, out_b)
    for name, a, b in zip(NAMES, grads_a, grads_b, strict=True):
        assert torch.equal(a, b), name


def test_grouped_mm_never_asks_the_host_for_a_tensor_value(monkeypatch):
    # A Python-level sync (.item(), .tolist(), bool(t), int(t)) would stall the CPU on every CUDA step; none may
    # happen in forward or backward. (Syncs inside ops are checked on CUDA by the sync-debug-mode test.)
    expert_index, tensors = _inputs(2)
    ts = [t.detach().clone().requires_grad_() for t in tensors]

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = grouped_mm_expert_ffn(ts[0], expert_index, ts[1], *ts[2:], GELU)
    out.sum().backward()
    monkeypatch.undo()
    assert all(t.grad is not None for t in ts)


# --- chooser ------------------------------------------------------------------------------------------

def test_chooser_picks_sorted_on_cpu_in_any_dtype():
    w_fc = torch.zeros(E, D, F)
    assert expert_kernel(torch.zeros(2, D), w_fc) == "sorted"
    assert expert_kernel(torch.zeros(2, D, dtype=torch.bfloat16), w_fc.bfloat16()) == "sorted"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expert_kernel(torch.zeros(2, D), w_fc) == "sorted"


def test_bf16_on_hopper_or_newer_is_false_for_cpu_tensors():
    assert not dispatch._bf16_on_hopper_or_newer(torch.zeros(2, D, dtype=torch.bfloat16))
    assert not dispatch._bf16_on_hopper_or_newer(torch.zeros(2, D))


def test_chooser_picks_grouped_mm_for_bf16_on_hopper_or_newer_with_aligned_sizes(monkeypatch):
    monkeypatch.setattr(dispatch, "_bf16_on_hopper_or_newer", lambda x: True)
    x = torch.zeros(2, D)
    assert expert_kernel(x, torch.zeros(E, D, F)) == "grouped_mm"
    assert expert_kernel(torch.zeros(2, 12), torch.zeros(E, 12, F)) == "sorted"  # d_model not a multiple of 8
    assert expert_kernel(x, torch.zeros(E, D, 36)) == "sorted"  # d_ff not a multiple of 8
    monkeypatch.setattr(dispatch, "GROUPED_MM_AVAILABLE", False)
    assert expert_kernel(x, torch.zeros(E, D, F)) == "sorted"


@pytest.mark.parametrize("kernel", ["sorted", "grouped_mm"])
def test_entry_point_runs_the_chosen_kernel(monkeypatch, kernel):
    calls = []

    def spy(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)
        return wrapped

    monkeypatch.setattr(dispatch, "grouped_expert_ffn", spy("sorted", dispatch.grouped_expert_ffn))
    monkeypatch.setattr(dispatch, "grouped_mm_expert_ffn", spy("grouped_mm", dispatch.grouped_mm_expert_ffn))
    monkeypatch.setattr(dispatch, "_bf16_on_hopper_or_newer", lambda x: kernel == "grouped_mm")
    expert_index, tensors = _inputs(2)
    out = expert_ffn(tensors[0], expert_index, tensors[1], *tensors[2:], GELU)
    assert calls == [kernel]
    ref = per_expert_loop_ffn(tensors[0], expert_index, tensors[1], *tensors[2:], GELU)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- CUDA ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_on_cuda_bf16_at_gpt2_small_sizes_matches_the_loop(monkeypatch):
    # GPT-2 small: d 768, d_ff 3072; 8 experts, 4096 tokens, top-2.
    expert_index, tensors = _inputs(2, n=4096, d=768, f=3072, e=8, device="cuda")
    upstream = torch.randn(4096, 768, generator=torch.Generator().manual_seed(9)).cuda()
    got = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream, dtype=torch.bfloat16)
    ref = _run(per_expert_loop_ffn, expert_index, tensors, upstream, dtype=torch.bfloat16)
    out, grads = got
    assert out.dtype == torch.bfloat16
    _assert_matches_bf16(got, ref)
    # Twice the same: bit for bit.
    again = _run(grouped_mm_expert_ffn, expert_index, tensors, upstream, dtype=torch.bfloat16)
    assert torch.equal(again[0], out) and all(torch.equal(a, b) for a, b in zip(again[1], grads, strict=True))

    # The layer under bf16 autocast chooses grouped_mm.
    layer = MoEFeedForward(768, 3072, num_experts=8, topk=2).cuda()
    calls = []
    real = dispatch.grouped_mm_expert_ffn

    def spy(*args):
        calls.append("grouped_mm")
        return real(*args)

    monkeypatch.setattr(dispatch, "grouped_mm_expert_ffn", spy)
    hidden = torch.randn(2, 64, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert expert_kernel(hidden.reshape(-1, 768), layer.w_fc) == "grouped_mm"
        out = layer(hidden)
    out.float().sum().backward()
    assert calls == ["grouped_mm"]
    assert layer.w_fc.grad.dtype == torch.float32 and torch.isfinite(layer.w_fc.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_on_cuda_never_syncs_with_the_host():
    expert_index, tensors = _inputs(2, n=1024, d=768, f=3072, e=8, device="cuda")
    ts = [t.detach().bfloat16().requires_grad_() for t in tensors]
    upstream = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        out = grouped_mm_expert_ffn(ts[0], expert_index, ts[1], *ts[2:], GELU)
        (out * upstream).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(t.grad).all() for t in ts)
