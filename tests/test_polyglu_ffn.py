"""PolyGLU FFN: the fused mixing and the document-aware pooling against the stacked reference."""

from __future__ import annotations

import math

import pytest
import torch

from models.polyglu.ffn import K, PolyGLU, SwiGLU, _PolyMix, stacked_reference

D, F_, B, T = 16, 32, 2, 12
POOLS = ("mean", "causal")
# Row 0: three documents of 4 tokens; row 1: two documents interleaved, to exercise non-contiguous ids.
DOCS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
                     [5, 5, 7, 7, 7, 5, 5, 5, 7, 7, 5, 5]])


def make(pool: str, dtype=torch.float64, seed: int = 0) -> PolyGLU:
    torch.manual_seed(seed)
    m = PolyGLU(D, F_, routing_pool=pool).to(dtype)
    with torch.no_grad():  # move off the init point so alpha/beta actually shape the routing
        m.alpha.normal_(0.0, 0.5)
        m.beta.uniform_(0.5, 1.5)
    return m


def noise_shape(pool: str, docs) -> tuple[int, ...]:
    return (B, F_, K) if pool == "mean" and docs is None else (B, T, F_, K)


def gumbel(shape, dtype=torch.float64) -> torch.Tensor:
    return -torch.empty(shape, dtype=dtype).exponential_().log()


def run_with_grads(fn, module: PolyGLU, x: torch.Tensor, grad_out: torch.Tensor):
    module.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = fn(xx)
    y.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    grads["x"] = xx.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_matches_stacked_reference(pool, with_docs, train):
    m = make(pool)
    m.train(train)
    m.tau = 0.7
    docs = DOCS if with_docs else None
    x = torch.randn(B, T, D, dtype=torch.float64)
    noise = gumbel(noise_shape(pool, docs))
    grad_out = torch.randn(B, T, D, dtype=torch.float64)
    y, grads = run_with_grads(lambda xx: m(xx, document_ids=docs, gumbel_noise=noise), m, x, grad_out)
    y_ref, grads_ref = run_with_grads(lambda xx: stacked_reference(m, xx, docs, noise), m, x, grad_out)
    assert y.shape == (B, T, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(grads_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)
        if name != "gate_net.1.bias":
            assert grads[name].abs().sum() > 0, name


def test_fp32_matches_reference_too():
    m = make("mean", dtype=torch.float32)
    x = torch.randn(B, T, D)
    noise = gumbel((B, F_, K), torch.float32)
    grad_out = torch.randn(B, T, D)
    y, grads = run_with_grads(lambda xx: m(xx, gumbel_noise=noise), m, x, grad_out)
    y_ref, grads_ref = run_with_grads(lambda xx: stacked_reference(m, xx, gumbel_noise=noise), m, x, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_polymix_gradcheck_both_g_layouts():
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    for t in (1, 5):
        g = torch.rand(2, t, 6, K, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_PolyMix.apply, (h, g))


def test_shapes_and_last_routing():
    for pool in POOLS:
        m = make(pool, dtype=torch.float32)
        for docs in (None, DOCS):
            y = m(torch.randn(B, T, D), document_ids=docs)
            assert y.shape == (B, T, D)
            logits = m.last_routing["logits"]
            assert logits.dtype == torch.float32 and not logits.requires_grad
            assert logits.shape == (noise_shape(pool, docs))
            ent = m.last_routing["entropy"]
            assert ent.ndim == 0 and 0 <= ent.item() <= math.log(K) + 1e-6
            assert not m.last_entropy.requires_grad  # no regulariser asked for its graph
            m.entropy_graph = True  # what model.entropy_reg > 0 sets
            m(torch.randn(B, T, D), document_ids=docs)
            assert m.last_entropy.requires_grad
            m.entropy_graph = False


def _outputs(m, x, docs):
    m.eval()
    with torch.no_grad():
        return m(x, document_ids=docs)


def test_causal_pool_never_looks_ahead():
    m = make("causal")
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = _outputs(m, x, None)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:]) * 3
        y2 = _outputs(m, x2, None)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_mean_pool_is_not_causal():
    """Documents the paper's leak: a later token changes the routing, hence the outputs, of earlier tokens."""
    m = make("mean")
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = _outputs(m, x, None)
    x2 = x.clone()
    x2[:, -1] += 3.0
    y2 = _outputs(m, x2, None)
    assert not torch.allclose(y2[:, 0], y[:, 0])


@pytest.mark.parametrize("pool", POOLS)
def test_documents_never_steer_each_other(pool):
    m = make(pool)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = _outputs(m, x, DOCS)
    for doc_id in DOCS.unique():
        other = DOCS != doc_id
        x2 = x.clone()
        x2[DOCS == doc_id] += torch.randn_like(x2[DOCS == doc_id]) * 3
        y2 = _outputs(m, x2, DOCS)
        torch.testing.assert_close(y2[other], y[other], rtol=0, atol=1e-12)
    # A packed row routes each document exactly as if it ran alone.
    for pos in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]):
        alone = _outputs(m, x[:1, pos], None)
        torch.testing.assert_close(y[:1, pos], alone, rtol=1e-10, atol=1e-10)


def test_gradient_reaches_routing_parameters():
    m = make("mean", dtype=torch.float32)
    m.train()
    m(torch.randn(B, T, D)).pow(2).sum().backward()
    for p in (m.alpha, m.beta, *m.gate_net.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_eval_is_deterministic_training_is_not():
    m = make("mean", dtype=torch.float32)
    x = torch.randn(B, T, D)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
        _, g = m.routing(x)
        torch.testing.assert_close(g, torch.softmax(m.routing(x)[0] / m.tau, dim=-1))
    m.train()
    with torch.no_grad():
        assert not torch.allclose(m(x), m(x))


def test_tau_sharpens_routing():
    m = make("mean", dtype=torch.float32)
    m.eval()
    x = torch.randn(B, T, D)

    def max_weight(tau):
        m.tau = tau
        with torch.no_grad():
            return m.routing(x)[1].max(dim=-1).values.mean().item()

    hot, mid, cold = max_weight(1.0), max_weight(0.3), max_weight(0.1)
    assert hot < mid < cold and cold > hot + 0.1


def test_static_entropy_at_init_is_ln4():
    m = PolyGLU(D, F_)
    assert abs(m.static_entropy().item() - math.log(4)) < 1e-6
    m(torch.randn(B, T, D))
    assert abs(m.last_routing["entropy"].item() - math.log(4)) < 0.2  # beta * gate_net(.) is small at init


@pytest.mark.parametrize("pool", POOLS)
def test_routing_stays_fp32_under_bf16_autocast(pool):
    m = make(pool, dtype=torch.float32)
    m.eval()
    x = torch.randn(B, T, D)
    with torch.no_grad():
        m(x, document_ids=DOCS)
        logits_fp32 = m.last_routing["logits"].clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x, document_ids=DOCS)
            _, g = m.routing(x, DOCS)
    assert y.dtype == torch.bfloat16  # the big matmuls did run in bf16
    assert m.last_routing["logits"].dtype == torch.float32 and g.dtype == torch.float32
    # bf16 gate_net math would be off by ~1e-2; fp32 routing is bit-for-bit the same as outside autocast.
    torch.testing.assert_close(m.last_routing["logits"], logits_fp32, rtol=0, atol=0)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x).float().sum().backward()
    assert m.alpha.grad.dtype == torch.float32 and m.alpha.grad.abs().sum() > 0


def test_model_cast_to_bf16_still_routes_in_fp32():
    m = make("mean", dtype=torch.bfloat16)
    m.eval()
    with torch.no_grad():
        y = m(torch.randn(B, T, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and m.last_routing["logits"].dtype == torch.float32


def test_swiglu_shape():
    assert SwiGLU(D, F_)(torch.randn(B, T, D)).shape == (B, T, D)


def test_rejects_unknown_pool():
    with pytest.raises(ValueError):
        PolyGLU(D, F_, routing_pool="max")
