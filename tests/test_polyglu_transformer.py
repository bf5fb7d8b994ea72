"""PolychromaticLM backbone: shapes, chunked loss, causality, document masking, GQA, norms, init, checkpointing,
meta-device parameter count of the paper shape, and the flash-attn varlen path (CPU only: its cu_seqlens helper,
and the model's call into it against a plain reference of flash-attn 2's contract; the CUDA kernel itself
needs a GPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.layers.attention as attention_module
from models.layers.attention import cu_seqlens_from_document_ids, document_causal_mask
from models.layers.loss import _chunk_ce_sum, chunked_cross_entropy
from models.layers.norm import RMSNorm
from models.polyglu.ffn import SwiGLU
from models.polyglu.transformer import (
    PolychromaticTransformer,
    TransformerShape,
    count_parameters_without_allocating,
)

V, D, L, H, KV, HD, FF, T = 97, 32, 2, 4, 2, 8, 64, 16


class PolyGLUShape(nn.Module):
    """Parameters only, exactly PolyGLU's list: W_gate, W_up, W_down (no bias), alpha [d_ff, 4], beta [4],
    gate_net Linear(d, 32) -> ReLU -> Linear(32, 4) (with biases)."""

    def __init__(self, d: int, d_ff: int, k: int = 4, hidden: int = 32):
        super().__init__()
        self.W_gate = nn.Linear(d, d_ff, bias=False)
        self.W_up = nn.Linear(d, d_ff, bias=False)
        self.W_down = nn.Linear(d_ff, d, bias=False)
        self.alpha = nn.Parameter(torch.zeros(d_ff, k))
        self.beta = nn.Parameter(torch.zeros(k))
        self.gate_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, x, document_ids=None):  # pragma: no cover - only counted
        raise NotImplementedError


def tiny_shape(**kw) -> TransformerShape:
    base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=KV, head_dim=HD, d_ff=FF,
                max_seq_len=64)
    base.update(kw)
    return TransformerShape(**base)


def tiny_model(seed: int = 0, **kw) -> PolychromaticTransformer:
    torch.manual_seed(seed)
    return PolychromaticTransformer(tiny_shape(**kw), SwiGLU)


def batch(b: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


def reference_loss(model, ids, doc=None):
    _, logits = model(ids, document_ids=doc)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_logits_shape_and_no_loss_without_labels():
    model = tiny_model()
    loss, logits = model(batch())
    assert loss is None and logits.shape == (2, T, V)
    loss, logits = model(batch(), labels=batch())
    assert logits is None and loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("chunk", [5, 7, 32, 4096])
@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_loss_and_grads_match_full_logits(chunk, with_docs):
    model = tiny_model(loss_chunk_tokens=chunk)  # 2 x 16 = 32 tokens: several chunks, ragged last one
    ids = batch()
    doc = torch.tensor([[0] * 5 + [1] * 11, [0] * 16]) if with_docs else None
    ref = reference_loss(model, ids, doc)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    loss, _ = model(ids, document_ids=doc, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, g in grads(model).items():
        torch.testing.assert_close(g, g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_chunked_loss_never_saves_full_logits():
    """Autograd keeps no logits tensor larger than one chunk (a plain CE over all tokens would keep [N, V])."""
    n, chunk = 40, 8
    hidden = torch.randn(n, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (n,))

    def saved_logit_rows(fn) -> int:
        rows = [0]

        def pack(t):
            if t.dim() == 2 and t.shape[-1] == V:
                rows[0] = max(rows[0], t.shape[0])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().backward()
        return rows[0]

    assert saved_logit_rows(lambda: _chunk_ce_sum(hidden, weight, targets)) == n  # the hook does see logits
    assert saved_logit_rows(lambda: chunked_cross_entropy(hidden, weight, targets, chunk)) == 0


def test_ignore_index_labels_are_excluded_from_the_mean():
    model = tiny_model(loss_chunk_tokens=6)
    ids = batch()
    labels = ids.clone()
    labels[:, 8:] = -100
    loss, _ = model(ids, labels=labels)
    _, logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_causality():
    model = tiny_model().eval()
    ids = batch()
    _, before = model(ids)
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % V
    _, after = model(ids2)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=0)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def test_document_masking():
    model = tiny_model().eval()
    ids = batch(b=1)
    doc = torch.tensor([[0] * 6 + [1] * 10])
    _, base = model(ids, document_ids=doc)

    # A change inside document 2 never reaches document 1 (trivially true by causality, also checked with a
    # later token), and a change in document 1 never reaches document 2.
    later = ids.clone()
    later[0, 12] = (later[0, 12] + 1) % V
    _, out = model(later, document_ids=doc)
    torch.testing.assert_close(out[:, :6], base[:, :6], rtol=0, atol=0)
    earlier = ids.clone()
    earlier[0, :6] = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(5))
    _, out = model(earlier, document_ids=doc)
    torch.testing.assert_close(out[:, 6:], base[:, 6:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :6], base[:, :6])

    # Document 2 alone gives the same outputs as inside the packed block (RoPE is relative, so the offset of
    # its positions does not matter); its first token depends on nothing of document 1.
    _, alone = model(ids[:, 6:])
    torch.testing.assert_close(base[:, 6:], alone, rtol=1e-5, atol=1e-5)
    # Without document_ids the same block does attend across documents.
    _, unmasked = model(earlier)
    assert not torch.allclose(unmasked[:, 6:], base[:, 6:])


def test_document_mask_and_cu_seqlens_helpers():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [3, 3, 4, 4, 4, 4]])
    cu, max_len = cu_seqlens_from_document_ids(doc)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 14, 18]
    assert max_len == 6
    # A row starting with the id the previous row ended on is still a new sequence.
    cu, max_len = cu_seqlens_from_document_ids(torch.tensor([[0, 1, 1], [1, 1, 2]]))
    assert cu.tolist() == [0, 1, 3, 5, 6] and max_len == 2

    mask = document_causal_mask(doc)
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    # The mask and cu_seqlens describe the same blocks: block-diagonal causal per flattened sequence.
    cu, _ = cu_seqlens_from_document_ids(doc)
    full = torch.zeros(18, 18, dtype=torch.bool)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        full[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    for r in range(3):
        assert torch.equal(mask[r, 0], full[6 * r:6 * r + 6, 6 * r:6 * r + 6])


def reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's `flash_attn_varlen_func` (same signature), computed plainly in fp32: each of the packed
    sequences cu_seqlens[i]:cu_seqlens[i+1] attends only to itself; query head h reads KV head h // (Hq/Hkv).
    The asserts are the kernel's own requirements, so a wrong call fails here as it would on CUDA."""
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[-1] == k.shape[-1] == v.shape[-1]
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0] == k.shape[0]
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q == max_seqlen_k == max(lengths)  # the kernel sizes its grid from these
    assert dropout_p == 0.0 and window_size == (-1, -1) and alibi_slopes is None and not return_attn_probs
    hq, hkv = q.shape[1], k.shape[1]
    assert hq % hkv == 0
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        qs = q[start:end].float().transpose(0, 1)  # [Hq, len, hd]
        ks, vs = (z[start:end].float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1) for z in (k, v))
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append((scores.softmax(dim=-1) @ vs).transpose(0, 1))
    return torch.cat(out).to(q.dtype)


def test_flash_varlen_path_matches_the_masked_sdpa_path(monkeypatch):
    model = tiny_model(loss_chunk_tokens=7).to(torch.bfloat16)
    ids = batch()
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    _, sdpa_logits = model(ids, document_ids=doc)
    sdpa_loss, _ = model(ids, document_ids=doc, labels=ids)
    sdpa_loss.backward()
    sdpa_grads = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return reference_flash_attn_varlen_func(*args, **kwargs)

    monkeypatch.setattr(attention_module, "varlen_backend", lambda x, dropout_p=0.0: attention_module.FLASH_ATTN)
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", spy)
    _, flash_logits = model(ids, document_ids=doc)
    assert len(calls) == L  # every layer took the varlen kernel, with the flattened batch's boundaries
    assert calls[0]["cu_seqlens_q"].tolist() == [0, 5, 12, 16, 32] and calls[0]["max_seqlen_q"] == 16
    assert calls[0]["causal"] is True
    # bf16 both ways; the reference accumulates in fp32, SDPA on CPU in bf16: agree to bf16 rounding.
    torch.testing.assert_close(flash_logits.float(), sdpa_logits.float(), atol=0.05, rtol=0.02)
    flash_loss, _ = model(ids, document_ids=doc, labels=ids)
    flash_loss.backward()
    torch.testing.assert_close(flash_loss, sdpa_loss, atol=0.02, rtol=0.01)
    for name, p in model.named_parameters():
        g, ref = p.grad.float(), sdpa_grads[name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-4, name

    # Document masking holds on this path too: changing document 0 leaves documents 1 and 2 untouched.
    changed = ids.clone()
    changed[0, :5] = (changed[0, :5] + 1) % V
    _, after = model(changed, document_ids=doc)
    torch.testing.assert_close(after[0, 5:], flash_logits[0, 5:], rtol=0, atol=0)
    assert not torch.equal(after[0, :5], flash_logits[0, :5])


def test_flash_path_refuses_fp32_instead_of_dropping_document_masking(monkeypatch):
    monkeypatch.setattr(attention_module, "varlen_backend", lambda x, dropout_p=0.0: attention_module.FLASH_ATTN)
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", reference_flash_attn_varlen_func)
    with pytest.raises(RuntimeError, match="needs fp16/bf16"):
        tiny_model()(batch(), document_ids=torch.zeros(2, T, dtype=torch.long))


def test_varlen_kernels_are_only_chosen_on_cuda_in_half_precision():
    x = torch.zeros(1, 2, D, dtype=torch.bfloat16)
    assert attention_module.varlen_backend(x) is None  # CPU: the masked SDPA path, whatever is installed


def test_gqa_projection_sizes():
    model = tiny_model()
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (H * HD, D)
    assert attn.k_proj.weight.shape == (KV * HD, D)
    assert attn.v_proj.weight.shape == (KV * HD, D)
    assert attn.o_proj.weight.shape == (D, H * HD)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    loss, _ = model(batch(), labels=batch())
    loss.backward()
    assert attn.k_proj.weight.grad is not None


def test_gqa_matches_explicitly_repeated_kv():
    """The GQA model equals an MHA model whose K/V heads are the GQA heads repeated (query h -> kv h // 2)."""
    gqa = tiny_model().eval()
    mha = tiny_model(n_kv_heads=H).eval()
    with torch.no_grad():
        for bg, bm in zip(gqa.blocks, mha.blocks, strict=True):
            for name in ("k_proj", "v_proj"):
                w = getattr(bg.attn, name).weight.view(KV, HD, D).repeat_interleave(H // KV, dim=0)
                getattr(bm.attn, name).weight.copy_(w.reshape(H * HD, D))
        sd = {k: v for k, v in gqa.state_dict().items() if "k_proj" not in k and "v_proj" not in k}
        mha.load_state_dict(sd, strict=False)
    ids = batch()
    doc = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    for d in (None, doc):
        torch.testing.assert_close(gqa(ids, document_ids=d)[1], mha(ids, document_ids=d)[1], rtol=1e-5, atol=1e-5)


def test_norms_present_and_tied_embeddings():
    model = tiny_model()
    blk = model.blocks[0]
    assert isinstance(blk.attn.q_norm, RMSNorm) and blk.attn.q_norm.weight.shape == (HD,)
    assert isinstance(blk.attn.k_norm, RMSNorm) and blk.attn.k_norm.weight.shape == (HD,)
    assert isinstance(blk.attn_norm, RMSNorm) and isinstance(blk.ffn_norm, RMSNorm)
    assert isinstance(model.norm, RMSNorm)
    assert isinstance(blk.ffn, SwiGLU)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    # RMSNorm: unit RMS output for weight 1.
    y = RMSNorm(HD)(torch.randn(3, HD) * 7)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), rtol=1e-4, atol=1e-4)
    # QK-norm matters: scaling the q weights changes nothing after RMSNorm over head_dim (eps aside).
    ids = batch()
    _, before = model.eval()(ids)
    with torch.no_grad():
        blk.attn.q_proj.weight.mul_(10.0)
        blk.attn.k_proj.weight.mul_(10.0)
    _, after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)

    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_init_std():
    torch.manual_seed(0)
    shape = tiny_shape(d_model=256, head_dim=64, n_heads=4, n_kv_heads=2, d_ff=512, n_layers=4)
    model = PolychromaticTransformer(shape, SwiGLU)
    resid = 0.02 / math.sqrt(2 * shape.n_layers)
    o = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    down = torch.cat([b.ffn.W_down.weight.flatten() for b in model.blocks])
    q = torch.cat([b.attn.q_proj.weight.flatten() for b in model.blocks])
    up = torch.cat([b.ffn.W_up.weight.flatten() for b in model.blocks])
    assert o.std().item() == pytest.approx(resid, rel=0.05)
    assert down.std().item() == pytest.approx(resid, rel=0.05)
    assert q.std().item() == pytest.approx(0.02, rel=0.05)
    assert up.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.norm.weight == 1) and torch.all(model.blocks[0].attn.q_norm.weight == 1)


def test_ffn_without_document_ids_argument_is_accepted():
    class XOnly(SwiGLU):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = PolychromaticTransformer(tiny_shape(), XOnly)
    loss, _ = model(batch(), document_ids=torch.tensor([[0] * 8 + [1] * 8] * 2), labels=batch())
    assert torch.isfinite(loss)


def test_meta_build_then_materialise_keeps_tying_and_init():
    with torch.device("meta"):
        model = PolychromaticTransformer(tiny_shape(), SwiGLU)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.all(model.norm.weight == 1)
    loss, _ = model(batch(), labels=batch())
    assert torch.isfinite(loss)


def test_activation_checkpointing_is_exact():
    plain = tiny_model(loss_chunk_tokens=8)
    ckpt = copy.deepcopy(plain)
    ckpt.shape = tiny_shape(loss_chunk_tokens=8, activation_checkpointing=True)
    ids = batch()
    doc = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    calls = {"plain": 0, "ckpt": 0}
    plain.blocks[0].ffn.register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.blocks[0].ffn.register_forward_pre_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    l1, _ = plain(ids, document_ids=doc, labels=ids)
    l1.backward()
    l2, _ = ckpt(ids, document_ids=doc, labels=ids)
    l2.backward()
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block was recomputed in the backward
    torch.testing.assert_close(l2, l1, rtol=0, atol=0)
    g1 = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, g1[n].grad, rtol=0, atol=0, msg=n)


def test_bf16_forward_backward():
    model = tiny_model(loss_chunk_tokens=7).to(torch.bfloat16)
    ids = batch()
    loss, _ = model(ids, document_ids=torch.tensor([[0] * 8 + [1] * 8] * 2), labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.embed_tokens.weight.grad.dtype == torch.bfloat16


def test_paper_parameter_count():
    shape = TransformerShape(vocab_size=151_669, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                             head_dim=64, d_ff=4096, max_seq_len=4096)
    n = count_parameters_without_allocating(shape, PolyGLUShape)
    d, f, hd = 1024, 4096, 64
    per_layer = (
        d * (16 * hd) + 2 * d * (8 * hd) + (16 * hd) * d     # q, k, v, o
        + 2 * hd + 2 * d                                       # q_norm, k_norm, attn_norm, ffn_norm
        + 3 * d * f + f * 4 + 4 + (d * 32 + 32) + (32 * 4 + 4)  # PolyGLU: W_gate/up/down, alpha, beta, gate_net
    )
    expected = 28 * per_layer + 151_669 * d + d  # tied embedding/head counted once, final norm
    assert per_layer == 15_780_136
    assert n == expected
    # This is exactly the paper's published 597,153,888: the paper counts the UNPADDED Qwen3 vocabulary
    # (151,669); padding to 151,680 (multiple of 64 or 128) would add 11 * 1024 = 11,264 parameters.
    assert n == 597_153_888
