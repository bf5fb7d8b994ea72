"""PolyGLU feed-forward layer: a GLU whose gate activation is a per-neuron, input-conditioned mix of four.

    PolyGLU(x) = W_down( [sum_k g_k * act_k(x W_gate)] * (x W_up) ),   act = (ReLU, Tanh, SiLU, GELU-erf)
    logits     = alpha + beta * gate_net(pool(x))                      alpha [d_ff, K], beta [K]
    g          = gumbel_softmax(logits, tau)  (soft, over K, per neuron)

`PolyGLU.forward` mixes the activations with `_PolyMix`, which accumulates the weighted sum activation by
activation and recomputes what backward needs from h = x W_gate; the obvious version (`stacked_reference`)
stacks all K activations into a [B, T, d_ff, K] tensor, which autograd then keeps alive together with the
activations' own saved tensors: several times the layer's activation memory and memory traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.polyglu.config import ROUTING_POOLS

ACTIVATIONS = ("relu", "tanh", "silu", "gelu")
K = len(ACTIVATIONS)
# ln(K): the entropy of uniform routing, where both static and dynamic entropy start.
UNIFORM_ENTROPY = math.log(K)
# Above this many elements last_routing keeps the position-averaged logits instead of all of them: the full
# per-position tensor is as large as the stacked activations this layer exists to avoid keeping.
_MAX_STORED_LOGITS = 1 << 20


def _activations(h: Tensor) -> list[Tensor]:
    return [torch.relu(h), torch.tanh(h), F.silu(h), F.gelu(h)]


class _PolyMix(torch.autograd.Function):
    """m = sum_k g[..., k] * act_k(h), with g [B, 1 or T, d_ff, K] broadcast over h [B, T, d_ff].

    Only h and g are saved. Backward rebuilds each activation (and uses ATen's fused derivative kernels)
    one k at a time, so neither pass ever holds more than one [B, T, d_ff] temporary besides its result.
    """

    @staticmethod
    def forward(ctx, h: Tensor, g: Tensor) -> Tensor:
        # One contiguous [B, T', d_ff] plane per k: broadcasting a stride-K view over T makes every addcmul
        # ~4x slower on CPU, and the copy is tiny for the mean pool (no T).
        g_planes = g.movedim(-1, 0).contiguous()
        gk = g_planes.unbind(0)
        m = torch.relu(h).mul_(gk[0])
        m.addcmul_(torch.tanh(h), gk[1])
        m.addcmul_(F.silu(h), gk[2])
        m.addcmul_(F.gelu(h), gk[3])
        ctx.save_for_backward(h, g_planes)
        return m

    @staticmethod
    def backward(ctx, grad_m: Tensor) -> tuple[Tensor | None, Tensor | None]:
        h, g_planes = ctx.saved_tensors
        need_h, need_g = ctx.needs_input_grad[:2]
        grad_m = grad_m.contiguous()
        gk = g_planes.unbind(0)
        # The mean pool shares one g over all positions, so its gradient is the sum over T.
        reduce_t = g_planes.shape[2] == 1 and h.shape[1] != 1

        def g_grad(act: Tensor) -> Tensor:
            prod = act.mul_(grad_m)
            return prod.sum(dim=1, keepdim=True) if reduce_t else prod

        grad_h = None
        grads_g: list[Tensor] = []
        if need_g:
            grads_g.append(g_grad(torch.relu(h)))
        if need_h:
            grad_h = torch.ops.aten.threshold_backward(grad_m, h, 0.0).mul_(gk[0])
        t = torch.tanh(h)
        if need_h:
            grad_h.addcmul_(torch.ops.aten.tanh_backward(grad_m, t), gk[1])
        if need_g:
            grads_g.append(g_grad(t))
        del t
        if need_h:
            grad_h.addcmul_(torch.ops.aten.silu_backward(grad_m, h), gk[2])
            grad_h.addcmul_(torch.ops.aten.gelu_backward(grad_m, h), gk[3])
        if need_g:
            grads_g.append(g_grad(F.silu(h)))
            grads_g.append(g_grad(F.gelu(h)))
        grad_g = torch.stack(grads_g, dim=-1) if need_g else None
        return grad_h, grad_g


def _segment_pool(x: Tensor, document_ids: Tensor | None, causal: bool) -> tuple[Tensor, Tensor | None]:
    """Per-token mean of x over its own document (whole document, or its prefix when causal).

    Returns (pooled, first): pooled is [B, 1, d] for the whole-sequence mean and [B, T, d] otherwise; first
    ([B, T], mean pool with documents only) is each token's document's first position, so noise can be drawn
    once per document. Documents are the tokens sharing an id in a row, contiguous or not: a stable sort by id
    makes each one a contiguous run in time order, where a cumsum (prefix) or a sum at the run's start (total) is
    cheap, and the result is gathered back through the inverse permutation.
    """
    B, T, D = x.shape
    if document_ids is None:
        if causal:
            counts = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)
            return x.cumsum(dim=1) / counts[:, None], None
        return x.mean(dim=1, keepdim=True), None

    ids = document_ids.to(device=x.device)
    order = torch.argsort(ids, dim=1, stable=True)
    inverse = torch.argsort(order, dim=1)  # sorted position of each token: the way back, as a gather
    # Rows are moved with index_select / index_add_ over the flattened [B*T, D] batch rather than gather /
    # scatter_add_ along dim 1: on CUDA their backward and sums then have deterministic kernels under
    # torch.use_deterministic_algorithms (hardware.deterministic), where multi-dimensional scatter_add_ has none.
    base = (torch.arange(B, device=x.device) * T)[:, None]
    flat = x.reshape(B * T, D)

    def rows(src: Tensor, index: Tensor) -> Tensor:  # src [B*T, D]; index [B, T] positions within each row
        return src.index_select(0, (index + base).reshape(-1)).view(B, T, D)

    xs = rows(flat, order)
    ids_s = ids.gather(1, order)
    pos = torch.arange(T, device=x.device).expand(B, T)
    is_start = torch.ones(B, T, dtype=torch.bool, device=x.device)
    is_start[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    start = torch.where(is_start, pos, 0).cummax(dim=1).values  # sorted index of each token's document start
    if causal:
        csum = xs.cumsum(dim=1)
        before = rows((csum - xs).reshape(B * T, D), start)  # sum of everything sorted before the document
        pooled_s = (csum - before) / (pos - start + 1).to(x.dtype)[..., None]
        first = None
    else:
        # Summed per document start instead of a cumsum difference: no cancellation error for long packed rows.
        at = (start + base).reshape(-1)
        sums = torch.zeros_like(flat).index_add_(0, at, xs.reshape(B * T, D))
        counts = torch.zeros(B * T, device=x.device, dtype=x.dtype).index_add_(
            0, at, torch.ones(B * T, device=x.device, dtype=x.dtype))
        pooled_s = (sums.index_select(0, at) / counts.index_select(0, at)[:, None]).view(B, T, D)
        first = order.gather(1, start).gather(1, inverse)  # integers: no gradient, so no scatter in backward
    pooled = rows(pooled_s.reshape(B * T, D), inverse)
    return pooled, first


@dataclass
class PoolState:
    """One PolyGLU layer's causal pool carried across decoding steps: per row, the sum [B, 1, d] and count
    [B, 1, 1] of the FFN inputs of its tokens so far (fp32; padding excluded). Empty until the prompt's call;
    the mean pool keeps nothing in it."""

    total: Tensor | None = None
    count: Tensor | None = None


class PolyGLU(nn.Module):
    """PolyGLU FFN. `tau` (Gumbel-softmax temperature) is a plain attribute that a schedule sets.

    routing_pool="mean" is the paper's whole-sequence mean: it lets later tokens steer the routing of earlier
    ones (non-causal, a leak for a causal LM) and is kept to reproduce the paper. "causal" pools the prefix
    x_0..x_t, so routing is per position. With document_ids either pool stays inside each document.
    """

    def __init__(self, d_model: int, d_ff: int, routing_pool: str = "mean", gate_hidden: int = 32):
        super().__init__()
        if routing_pool not in ROUTING_POOLS:
            raise ValueError(f"routing_pool must be one of {ROUTING_POOLS}, got {routing_pool!r}")
        self.d_model, self.d_ff, self.routing_pool = d_model, d_ff, routing_pool
        self.W_gate = nn.Linear(d_model, d_ff, bias=False)
        self.W_up = nn.Linear(d_model, d_ff, bias=False)
        self.W_down = nn.Linear(d_ff, d_model, bias=False)
        self.alpha = nn.Parameter(torch.zeros(d_ff, K))
        self.beta = nn.Parameter(torch.ones(K))
        self.gate_net = nn.Sequential(nn.Linear(d_model, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, K))
        self.tau = 1.0
        self.last_routing: dict[str, Tensor] = {}
        self.last_entropy: Tensor | None = None
        # Whether last_entropy keeps its autograd graph: only an entropy regulariser (model.entropy_reg > 0)
        # backpropagates through it. Kept by default, the graph holds two tensors of the routing logits' size per
        # layer alive through backward (with packed documents, [B, T, d_ff, 4] fp32 each) for nothing.
        self.entropy_graph = False

    # tau travels with the weights (state_dict key `<layer>._extra_state`): a snapshot routes at the temperature its
    # last update trained with (0.1 at the end of an annealed run), not at the 1.0 a freshly built layer starts at.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.tau, dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        self.tau = float(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Snapshots and checkpoints written before tau was saved load with the layer's current tau, as they did.
        state_dict.setdefault(f"{prefix}_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        for lin in (self.W_gate, self.W_up, self.W_down, self.gate_net[0], self.gate_net[2]):
            lin.reset_parameters()
        nn.init.zeros_(self.alpha)
        nn.init.ones_(self.beta)

    def routing(self, x: Tensor, document_ids: Tensor | None = None, gumbel_noise: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """(logits, g), both fp32 and [B, 1 or T, d_ff, K].

        Autocast is switched off: with bf16 logits the softmax over four near-equal values at tau=0.1 would
        amplify bf16's rounding (~0.4%) by 10x, and gate_net is tiny, so fp32 costs nothing measurable.
        Noise: an explicit gumbel_noise is always used (tests replay the same draw); otherwise it is drawn in
        training only, so eval routing is deterministic: g = softmax(logits / tau).
        """
        pooled, first = self.pool(x, document_ids)
        return self.route(pooled, first, gumbel_noise)

    def pool(self, x: Tensor, document_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """What gate_net reads: x pooled as routing_pool says (inside each document), [B, 1 or T, d] in fp32 (fp64
        when x is); and `first`, as _segment_pool returns it."""
        rdt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _segment_pool(x.to(rdt), document_ids, causal=self.routing_pool == "causal")

    def gate(self, pooled: Tensor) -> Tensor:
        """gate_net(pooled) [B, T', K], in the pooled input's precision: the input-dependent routing signal, which
        beta scales into the logits. Weights upcast explicitly: a model cast wholesale to bf16 still routes in fp32."""
        rdt = pooled.dtype
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            lin1, lin2 = self.gate_net[0], self.gate_net[2]
            return F.linear(F.relu(F.linear(pooled, lin1.weight.to(rdt), lin1.bias.to(rdt))),
                            lin2.weight.to(rdt), lin2.bias.to(rdt))

    def route(self, pooled: Tensor, first: Tensor | None = None, gumbel_noise: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        """routing() from the pooled inputs [B, 1 or T, d] (fp32 or fp64); `first` as _segment_pool returns it."""
        rdt = pooled.dtype
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            z = self.gate(pooled)  # [B, T', K]
            logits = self.alpha.to(rdt) + self.beta.to(rdt) * z[:, :, None, :]  # [B, T', d_ff, K]
            if gumbel_noise is not None:
                noise = gumbel_noise.to(rdt).reshape(logits.shape)
            elif self.training:
                noise = -torch.empty_like(logits).exponential_().log()
                if first is not None:
                    # One draw per document and neuron, as an unpacked sequence gets one per sequence.
                    noise = noise.gather(1, first[:, :, None, None].expand_as(noise))
            else:
                noise = None
            y = logits if noise is None else logits + noise
            g = torch.softmax(y / self.tau, dim=-1)
        return logits, g

    def _record(self, logits: Tensor) -> None:
        """last_entropy keeps its graph when `entropy_graph` is set (an entropy regulariser backpropagates through
        it); last_routing is the detached copy monitors read. Per-position logits above _MAX_STORED_LOGITS are kept
        averaged over T.
        """
        with torch.set_grad_enabled(self.entropy_graph and torch.is_grad_enabled()):
            logp = torch.log_softmax(logits, dim=-1)
            self.last_entropy = -(logp.exp() * logp).sum(-1).mean()
        stored = logits.detach()
        if stored.shape[1] == 1:
            stored = stored[:, 0]
        elif stored.numel() > _MAX_STORED_LOGITS:
            stored = stored.mean(dim=1)
        self.last_routing = {"logits": stored, "entropy": self.last_entropy.detach()}

    def forward(self, x: Tensor, document_ids: Tensor | None = None, gumbel_noise: Tensor | None = None
                ) -> Tensor:
        logits, g = self.routing(x, document_ids, gumbel_noise)
        return self._mix(x, logits, g)

    def new_inference_state(self) -> PoolState:
        return PoolState()

    def infer(self, x: Tensor, state: PoolState, valid: Tensor) -> Tensor:
        """forward for eval's padded rows: x [B, n, d] are the next n positions of each row, `valid` [B, n] is 1 on
        tokens and 0 on padding, and the pool leaves padding out.

        mean (the paper's): one routing per row from the mean of its tokens, as forward routes one sequence. A call
        holds the whole sequence: every new token would change every earlier token's routing, so nothing carries
        over and generation recomputes.
        causal: the first call (the prompt) pools as forward does, padding apart from tokens, and keeps each row's
        running sum and count of token inputs in `state`; later calls pool each new position over that prefix
        and itself, so no earlier input is kept (generation with a KV cache)."""
        rdt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(rdt)
            weight = valid[..., None].to(rdt)
            if self.routing_pool == "mean":
                pooled = (xf * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
            elif state.total is None:
                pooled, _ = _segment_pool(xf, valid, causal=True)
                state.total, state.count = (xf * weight).sum(1, keepdim=True), weight.sum(1, keepdim=True)
            else:
                totals = state.total + xf.cumsum(dim=1)
                counts = state.count + torch.arange(1, x.shape[1] + 1, device=x.device, dtype=rdt)[:, None]
                pooled = totals / counts
                state.total, state.count = totals[:, -1:], counts[:, -1:]
        logits, g = self.route(pooled)
        return self._mix(x, logits, g)

    def _mix(self, x: Tensor, logits: Tensor, g: Tensor) -> Tensor:
        self._record(logits)
        h = self.W_gate(x)
        u = self.W_up(x)
        # The mix runs in the matmul dtype (bf16 under autocast); only the routing itself has to be fp32.
        m = _PolyMix.apply(h, g.to(h.dtype))
        return self.W_down(m * u)

    def static_entropy(self) -> Tensor:
        """Mean over neurons of the entropy (nats) of softmax(alpha): the input-independent preference."""
        logp = torch.log_softmax(self.alpha.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, routing_pool={self.routing_pool!r}, K={K}"


def stacked_reference(module: PolyGLU, x: Tensor, document_ids: Tensor | None = None,
                      gumbel_noise: Tensor | None = None) -> Tensor:
    """The straightforward PolyGLU: same parameters and math, plain autograd, all K activations stacked.

    The pooling is written independently (a [B, T, T] same-document / causal mask) so tests cross-check the
    sort/cumsum/scatter pooling of `PolyGLU`, not just the mixing.
    """
    causal = module.routing_pool == "causal"
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    B, T, _ = x.shape
    if document_ids is None and not causal:
        pooled = xf.mean(dim=1, keepdim=True)
    else:
        ids = torch.zeros(B, T, dtype=torch.long, device=x.device) if document_ids is None else document_ids
        mask = ids[:, :, None] == ids[:, None, :]
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = mask.to(xf.dtype)
        pooled = (mask @ xf) / mask.sum(-1, keepdim=True)
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = module.gate_net(pooled)
        logits = module.alpha + module.beta * z[:, :, None, :]
        if gumbel_noise is not None:
            logits_noisy = logits + gumbel_noise.reshape(logits.shape)
        elif module.training:
            logits_noisy = logits - torch.empty_like(logits).exponential_().log()
        else:
            logits_noisy = logits
        g = torch.softmax(logits_noisy / module.tau, dim=-1)
    h = module.W_gate(x)
    acts = torch.stack(_activations(h), dim=-1)  # [B, T, d_ff, K]
    m = (acts * g.to(h.dtype)).sum(-1)
    return module.W_down(m * module.W_up(x))


class SwiGLU(nn.Module):
    """Same-size baseline: W_down(silu(x W_gate) * (x W_up))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.W_gate = nn.Linear(d_model, d_ff, bias=False)
        self.W_up = nn.Linear(d_model, d_ff, bias=False)
        self.W_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor, document_ids: Tensor | None = None) -> Tensor:
        # document_ids: the FFN contract of PolychromaticTransformer; SwiGLU mixes no tokens, so it is unused.
        return self.W_down(F.silu(self.W_gate(x)) * self.W_up(x))


__all__ = ["ACTIVATIONS", "K", "UNIFORM_ENTROPY", "PolyGLU", "PoolState", "SwiGLU", "stacked_reference"]
