"""Token -> expert dispatch for a bank of GPT-2-style expert FFNs (y = act(x @ W_fc + b_fc) @ W_proj + b_proj).

`expert_ffn` is the one the layer calls: it picks a kernel with `expert_kernel` and runs either
`grouped_mm_expert_ffn` (bf16 on CUDA, sm90+: two `torch._grouped_mm` calls over padded expert groups, no host sync) or
`grouped_expert_ffn` (everywhere else, the CPU path: sorted slices, one addmm pair per expert).
`per_expert_loop_ffn` is the obvious masked version kept as the reference for tests and the benchmark baseline.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from models.layers.kernels import cuda_capability, say_once

log = logging.getLogger(__name__)

# torch._grouped_mm (a private op, present in recent releases) runs every expert's GEMM in one kernel. Its fast
# CUDA kernel wants bf16 (sm90+); elsewhere it falls back to a loop, and on CPU the sorted-slice path is faster.
GROUPED_MM_AVAILABLE = hasattr(torch, "_grouped_mm")
# Every expert's group of rows is padded to a multiple of this many rows (as torchtitan does), so every group
# starts on a tile boundary and at a 16-byte-aligned row for the grouped GEMM.
ALIGN = 16


def expert_kernel(x: Tensor, w_fc: Tensor) -> str:
    """"grouped_mm" where `torch._grouped_mm` has its fast path (bf16 compute on CUDA, d_model and d_ff multiples
    of 8: its operands' strides must be multiples of 16 bytes), else "sorted"."""
    d_model, d_ff = w_fc.shape[-2:]
    if GROUPED_MM_AVAILABLE and _bf16_on_hopper_or_newer(x) and d_model % 8 == 0 and d_ff % 8 == 0:
        return "grouped_mm"
    return "sorted"


def _bf16_on_hopper_or_newer(x: Tensor) -> bool:
    """Whether the expert matmuls would run in bf16 (autocast's dtype where it is on, else x's own) on a CUDA GPU
    of compute capability 9.0+, where _grouped_mm has its CUTLASS kernel. Older GPUs get a fallback that copies
    the offsets to the host and loops over experts: no better than the sorted slices."""
    if not x.is_cuda:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype == torch.bfloat16 and cuda_capability(x.device) >= (9, 0)


def expert_ffn(x: Tensor, expert_index: Tensor, gates: Tensor, w_fc: Tensor, b_fc: Tensor,
               w_proj: Tensor, b_proj: Tensor, activation) -> Tensor:
    """The layer's one entry point: same arguments and result as `grouped_expert_ffn`, kernel per `expert_kernel`."""
    kernel = expert_kernel(x, w_fc)
    if x.is_cuda:  # a GPU run's log says once what its experts ran on
        say_once(log, logging.INFO, "MoE experts: " + ("torch._grouped_mm (bf16)" if kernel == "grouped_mm" else
                 "sorted slices (grouped_mm needs bf16 on a GPU of compute capability 9.0+)"))
    fn = grouped_mm_expert_ffn if kernel == "grouped_mm" else grouped_expert_ffn
    return fn(x, expert_index, gates, w_fc, b_fc, w_proj, b_proj, activation)


def per_expert_loop_ffn(x: Tensor, expert_index: Tensor, gates: Tensor, w_fc: Tensor, b_fc: Tensor,
                        w_proj: Tensor, b_proj: Tensor, activation) -> Tensor:
    out = torch.zeros(x.shape, dtype=torch.result_type(x, gates), device=x.device)
    for e in range(w_fc.shape[0]):
        hit = expert_index == e
        rows = hit.any(dim=-1)
        if not bool(rows.any()):
            continue
        gate = (gates * hit).sum(dim=-1)[rows]
        y = activation(x[rows] @ w_fc[e] + b_fc[e]) @ w_proj[e] + b_proj[e]
        out = out.index_put((rows,), y * gate[:, None], accumulate=True)
    return out


def grouped_expert_ffn(x: Tensor, expert_index: Tensor, gates: Tensor, w_fc: Tensor, b_fc: Tensor,
                       w_proj: Tensor, b_proj: Tensor, activation) -> Tensor:
    """Dropless sorted dispatch: every assignment is computed, each expert on one contiguous slice.

    The N*k assignments are stably sorted by expert ("slots"); token rows are gathered once into that
    order, each expert runs two addmm's on its slice, and the gated rows are combined back once.
    """
    n, k = expert_index.shape
    flat = expert_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot -> flat assignment index (token * k + j)
    token = torch.div(order, k, rounding_mode="floor")  # slot -> token
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)  # flat assignment -> slot
    counts = torch.bincount(flat, minlength=w_fc.shape[0]).tolist()
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c

    # The expert matmuls use out= (no autocast rule applies to those).
    x, gates, w_fc, b_fc, w_proj, b_proj = _cast_as_autocast_would(x, gates, w_fc, b_fc, w_proj, b_proj)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GroupedFFN.apply(x, gates, w_fc, b_fc, w_proj, b_proj, token, order, inverse, bounds, activation)


def grouped_mm_expert_ffn(x: Tensor, expert_index: Tensor, gates: Tensor, w_fc: Tensor, b_fc: Tensor,
                          w_proj: Tensor, b_proj: Tensor, activation) -> Tensor:
    """Dropless dispatch through two `torch._grouped_mm` calls, with plain autograd and no host sync.

    The N*k assignments are stably sorted by expert and their token rows copied into a buffer of static size
    P in which every expert's group is padded to a multiple of ALIGN rows (padding rows are zero). Nothing reads
    the per-expert counts on the host and every shape depends only on N, k and E, so the CPU never waits for the
    GPU here and keeps queueing kernels ahead of it.

    Padding rows add exactly zero to every gradient: their outputs are never gathered back, so their upstream
    gradient is zero; through W_proj that gives dh = act'(b_fc[e]) * 0 = 0 (finite times zero: the rows are real
    zeros plus a finite bias, never uninitialised memory), so their terms in grad W_fc (x_pad = 0), grad b_fc and
    grad W_proj (a_pad finite, dy = 0) are all zero too, and their input rows map back to no token.
    """
    n, k = expert_index.shape
    num_experts = w_fc.shape[0]
    m = n * k
    # Static size: each group grows by at most ALIGN - 1 rows, so this always fits. The rows left over after
    # the last real group all go to the last expert's group (offs[-1] == P): a row outside every group would be
    # left uninitialised by the kernel, and garbage there (NaN * 0 = NaN) would leak into the bias gradients.
    padded_rows = -(-m // ALIGN) * ALIGN + num_experts * ALIGN

    flat = expert_index.reshape(-1)  # flat assignment index a = token * k + j
    order = torch.argsort(flat, stable=True)  # slot (sorted by expert) -> a
    # Per-expert counts as a sum of one-hot rows ([N*k, E] booleans, small), not bincount: on CUDA bincount
    # copies the input's min and max to the host to size its output, a sync on every call.
    counts = (flat[:, None] == torch.arange(num_experts, device=flat.device)).sum(dim=0)
    padded = torch.div(counts + (ALIGN - 1), ALIGN, rounding_mode="floor") * ALIGN
    pad_end = torch.cumsum(padded, dim=0)
    shift = (pad_end - padded) - (torch.cumsum(counts, dim=0) - counts)  # padded start - unpadded start
    slot_row = torch.arange(m, device=flat.device) + shift.index_select(0, flat.index_select(0, order))
    row = torch.empty_like(order).index_copy_(0, order, slot_row)  # a -> its row in the padded buffer
    ends = torch.cat([pad_end[:-1], pad_end.new_full((1,), padded_rows)])
    offs = ends.to(torch.int32)  # cumulative group ends, as _grouped_mm wants them
    row_expert = torch.searchsorted(ends, torch.arange(padded_rows, device=ends.device), right=True)

    # _grouped_mm has no autocast rule.
    x, gates, w_fc, b_fc, w_proj, b_proj = _cast_as_autocast_would(x, gates, w_fc, b_fc, w_proj, b_proj)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # _grouped_mm takes no bias: add each row's expert bias as one-hot [P, E] @ b [E, out], fused into an
        # addmm. Its gradient, one_hot^T @ d(h), is a GEMM, deterministic, unlike index_add's atomics on CUDA.
        one_hot = (row_expert[:, None] == torch.arange(num_experts, device=x.device)).to(x.dtype)
        # Every index op below moves rows by a permutation-like map whose backward is again a plain gather or a
        # write of each row once, so results and gradients are the same bit for bit from run to run. Token
        # rows are repeated k times by expand (backward: a sum over k in a fixed order), then each copy is
        # written once into its padded row (backward: a gather).
        x_rep = x[:, None, :].expand(n, k, x.shape[-1]).reshape(m, -1)
        xp = x.new_zeros(padded_rows, x.shape[-1]).index_copy(0, row, x_rep)
        h = torch.addmm(torch._grouped_mm(xp, w_fc, offs=offs), one_hot, b_fc)
        yp = torch.addmm(torch._grouped_mm(activation(h), w_proj, offs=offs), one_hot, b_proj)
        # Back to assignment order (each real row read once), gated, then each token's k slots summed in a
        # fixed order. The gate multiply also keeps a broadcast (stride-0) upstream gradient, as from
        # out.sum().backward(), from reaching _grouped_mm's backward, which rejects it.
        y = yp.index_select(0, row) * gates.reshape(m, 1)
        return y.view(n, -1) if k == 1 else y.view(n, k, -1).sum(dim=1)


def _cast_as_autocast_would(x: Tensor, gates: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
    """For expert matmuls autocast does not reach: under autocast, everything in its dtype (the caller then runs
    with autocast off; gradients flow back through the casts to the fp32 masters); else the gates in x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in (x, gates, *weights))
    return (x, gates.to(x.dtype), *weights)


class _GroupedFFN(torch.autograd.Function):
    """Hand-written backward: autograd through `w[e]` indexing would materialise a zero-filled [E, ...]
    gradient per expert and sum them; here each expert writes its slice of one gradient tensor."""

    @staticmethod
    def forward(ctx, x, gates, w_fc, b_fc, w_proj, b_proj, token, order, inverse, bounds, activation):
        n, k = gates.shape
        xs = x.index_select(0, token)  # the one gather
        y = x.new_empty(xs.shape[0], w_proj.shape[-1])
        acts = []
        for e, (s, t) in enumerate(bounds):
            if t == s:
                acts.append(None)
                continue
            h = torch.addmm(b_fc[e], xs[s:t], w_fc[e])
            # The activation runs per expert, right after its matmul: its temporaries are one expert's
            # slice (cache-sized, recycled by malloc) rather than [N*k, f] arrays, which is most of what a
            # dense MLP over the same rows pays extra on CPU. Its own autograd graph is recorded so that
            # backward replays the exact derivative of any activation callable.
            with torch.enable_grad():
                h_leaf = h.requires_grad_()
                a = activation(h_leaf)
            torch.addmm(b_proj[e], a.detach(), w_proj[e], out=y[s:t])
            acts.append((h_leaf, a))
        g = gates.reshape(-1).index_select(0, order)
        # Combine by gathering with the inverse permutation: each token's k slots land side by side and are
        # summed in a fixed order. Same result as index_add_ but deterministic (no atomics on GPU) and, on
        # CPU, ~40x faster than index_add_'s row-by-row loop at GPT-2 sizes.
        out = (y * g[:, None]).index_select(0, inverse).view(n, k, -1)
        out = out.view(n, -1) if k == 1 else out.sum(dim=1)
        ctx.save_for_backward(xs, y, g, w_fc, w_proj, token, inverse)
        ctx.acts = acts
        ctx.bounds, ctx.n, ctx.k = bounds, n, k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, y, g, w_fc, w_proj, token, inverse = ctx.saved_tensors
        acts, bounds, n, k = ctx.acts, ctx.bounds, ctx.n, ctx.k
        need_x, need_g, need_wfc, need_bfc, need_wproj, need_bproj = ctx.needs_input_grad[:6]

        dy = grad_out.contiguous().index_select(0, token)  # slot rows of d(loss)/d(gated y)
        grad_gates = None
        if need_g:
            grad_gates = (dy * y).sum(dim=-1).index_select(0, inverse).view(n, k)
        dy.mul_(g[:, None])  # now d(loss)/d(ungated y)
        grad_bproj = None
        if need_bproj:
            # One [E, slots] @ [slots, d] GEMM over one-hot expert membership sums every expert's slice in
            # a single kernel (per-slice column sums are several times slower per element on CPU).
            slot_expert = dy.new_zeros(len(bounds), dy.shape[0])
            for e, (s, t) in enumerate(bounds):
                slot_expert[e, s:t] = 1
            grad_bproj = torch.mm(slot_expert, dy)

        # empty, not zeros: each expert writes its own slice once; only experts without tokens are zeroed.
        shape_fc, shape_proj = w_fc.shape, w_proj.shape
        grad_wproj = dy.new_empty(shape_proj) if need_wproj else None
        grad_wfc = dy.new_empty(shape_fc) if need_wfc else None
        grad_bfc = dy.new_empty(shape_fc[0], shape_fc[2]) if need_bfc else None
        grad_xs = dy.new_empty(xs.shape) if need_x else None
        need_dh = need_x or need_wfc or need_bfc
        for e, (s, t) in enumerate(bounds):
            if t == s:
                for grad in (grad_wproj, grad_wfc, grad_bfc):
                    if grad is not None:
                        grad[e].zero_()
                continue
            h_leaf, a = acts[e]
            if need_wproj:
                torch.mm(a.detach().t(), dy[s:t], out=grad_wproj[e])
            if not need_dh:
                continue
            (dh,) = torch.autograd.grad(a, h_leaf, torch.mm(dy[s:t], w_proj[e].t()))
            acts[e] = None  # free this expert's activation graph as soon as it has been used
            if need_wfc:
                torch.mm(xs[s:t].t(), dh, out=grad_wfc[e])
            if need_bfc:
                torch.sum(dh, dim=0, out=grad_bfc[e])
            if need_x:
                torch.mm(dh, w_fc[e].t(), out=grad_xs[s:t])
        grad_x = None
        if need_x:
            grad_x = grad_xs.index_select(0, inverse).view(n, k, -1)
            grad_x = grad_x.view(n, -1) if k == 1 else grad_x.sum(dim=1)
        return grad_x, grad_gates, grad_wfc, grad_bfc, grad_wproj, grad_bproj, None, None, None, None, None
