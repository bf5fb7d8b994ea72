"""Document masking for the GPT-2 families (dense, MoE): no token of a packed block attends to another document,
positions restart per document, masking off (the default) keeps today's outputs, generation is unchanged; and the
shared backend choice of models/layers/attention.py (torch's varlen_attn, flash-attn, masked SDPA). The CUDA
kernels need a GPU: here their call is checked against a plain fp32 reference of varlen_attn's contract, as
tests/test_polyglu_transformer.py does for flash-attn. PolyGLU's own masking tests live in that file."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import models.gpt2.attention as gpt2_attention
import models.layers.attention as attention_module
import models.layers.kernels as kernels
from eval.decoding import generate
from models.gpt2.config import GPT2Config
from models.layers.attention import (
    FLASH_ATTN,
    TORCH_VARLEN,
    AttentionContext,
    attend,
    cu_seqlens_from_document_ids,
    document_context,
    document_positions,
    varlen_backend,
)
from models.moe.config import MoEGPT2Config
from models.registry import build_model

V = 300
SIZES = dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, dropout=0.0)
# One row of three documents (5, 7 and 4 tokens) and a second row that is one document.
DOC = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
DOC1 = slice(5, 12)


def tiny(family: str, document_masking: bool, seed: int = 0, **overrides):
    """Built through the registry; the same seed gives the same weights with masking on or off."""
    cfg = dict(SIZES, document_masking=document_masking, **overrides)
    torch.manual_seed(seed)
    if family == "moe":
        model_cfg = MoEGPT2Config(**cfg, moe_layers=[1, 2], num_experts=4, topk=1, noise_std=0.1)
    else:
        model_cfg = GPT2Config(**cfg)
    return build_model(model_cfg, vocab_size=V, eos_id=0).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, tuple(DOC.shape), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of exactly what model.forward runs (forward itself returns only the loss)."""
    with torch.no_grad():
        return model.hf(input_ids=ids, **model.hf_kwargs(ids, document_ids)).logits


def perturb_document_1(ids: torch.Tensor) -> torch.Tensor:
    changed = ids.clone()
    changed[0, DOC1] = (changed[0, DOC1] + 7) % V
    return changed


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_no_token_attends_across_documents(family):
    model = tiny(family, document_masking=True)
    ids = batch()
    before = logits(model, ids, DOC)
    after = logits(model, perturb_document_1(ids), DOC)
    # Documents 0 and 2 of row 0, and all of row 1, do not see document 1.
    torch.testing.assert_close(after[0, :5], before[0, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[0, 12:], before[0, 12:], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-5)
    assert not torch.allclose(after[0, DOC1], before[0, DOC1], atol=1e-3)

    # Without masking (same weights), document 2 does see document 1: the check above can fail.
    unmasked = tiny(family, document_masking=False)
    before, after = logits(unmasked, ids, DOC), logits(unmasked, perturb_document_1(ids), DOC)
    assert not torch.allclose(after[0, 12:], before[0, 12:], atol=1e-3)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_a_packed_document_is_the_same_as_alone(family):
    """Positions restart at 0 per document, so a document inside a packed block gives the logits it gives by
    itself (as at generation, where a prompt starts at position 0)."""
    model = tiny(family, document_masking=True)
    ids = batch()
    packed = logits(model, ids, DOC)
    for span in (slice(0, 5), DOC1, slice(12, 16)):
        alone = logits(model, ids[:1, span])
        torch.testing.assert_close(packed[:1, span], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_masking_off_keeps_todays_outputs(family):
    ids = batch()
    off = tiny(family, document_masking=False)
    assert off.hf_kwargs(ids, DOC) == {}
    assert off.hf.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(off(ids, document_ids=DOC).loss, off(ids).loss)
        plain = off.hf(input_ids=ids).logits
    # Masking on but no document_ids (generation, unpacked data): transformers' own SDPA path, bit for bit.
    on = tiny(family, document_masking=True)
    assert on.hf.config._attn_implementation == gpt2_attention.DOCUMENT_ATTENTION
    assert torch.equal(logits(on, ids), plain)
    prompts = ids[:, :4].tolist()
    assert generate(on, prompts, 5, stop_ids=[0]) == generate(off, prompts, 5, stop_ids=[0])


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_masked_forward_trains_with_gpt2s_attention_dropout(family, monkeypatch):
    model = tiny(family, document_masking=True, dropout=0.1).train()
    calls = []

    def spy(q, k, v, ctx, dropout_p=0.0, scale=None):
        calls.append((dropout_p, scale))
        return attend(q, k, v, ctx, dropout_p=dropout_p, scale=scale)

    monkeypatch.setattr(gpt2_attention, "attend", spy)
    out = model(batch(), document_ids=DOC)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.hf.transformer.wpe.weight.grad is not None
    head_dim = SIZES["n_embd"] // SIZES["n_head"]
    assert calls == [(0.1, head_dim ** -0.5)] * SIZES["n_layer"]  # GPT-2's attn_pdrop and scaling reach attend
    calls.clear()
    model.eval()
    model(batch(), document_ids=DOC)
    assert {c[0] for c in calls} == {0.0}


def test_document_positions_restart_per_document_and_row():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 6, 6]])
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


# --------------------------------------------------------------------------- backend choice (CPU contract)


@pytest.mark.parametrize(("torch_varlen", "sm80", "flash", "dropout", "expected"), [
    (True, True, True, 0.0, TORCH_VARLEN),
    (True, True, False, 0.0, TORCH_VARLEN),
    (True, True, True, 0.1, FLASH_ATTN),   # varlen_attn has no dropout
    (True, True, False, 0.1, None),
    (False, True, True, 0.0, FLASH_ATTN),  # older torch without varlen_attn
    (False, True, False, 0.0, None),
    (True, False, True, 0.0, FLASH_ATTN),  # pre-Ampere GPU
    (True, False, False, 0.0, None),
])
def test_varlen_backend_choice(monkeypatch, torch_varlen, sm80, flash, dropout, expected):
    monkeypatch.setattr(attention_module, "_half_on_cuda", lambda x: True)
    monkeypatch.setattr(attention_module, "_sm80_or_newer", lambda device: sm80)
    monkeypatch.setattr(attention_module, "TORCH_VARLEN_AVAILABLE", torch_varlen)
    monkeypatch.setattr(attention_module, "FLASH_ATTN_AVAILABLE", flash)
    x = torch.zeros(2, 16, 8)
    assert varlen_backend(x, dropout) == expected
    ctx = document_context(x, DOC, dropout_p=dropout)
    assert ctx.varlen == expected
    if expected is None:
        assert ctx.cu_seqlens is None and ctx.attn_mask.shape == (2, 1, 16, 16)
    else:
        assert ctx.attn_mask is None and ctx.cu_seqlens.tolist() == [0, 5, 12, 16, 32] and ctx.max_seqlen == 16


def test_cpu_and_fp32_never_take_a_varlen_kernel():
    assert varlen_backend(torch.zeros(1, 2, 8, dtype=torch.bfloat16)) is None
    assert varlen_backend(torch.zeros(1, 2, 8)) is None
    assert document_context(torch.zeros(2, 16, 8), None).attn_mask is None  # no document_ids: plain causal


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn (same signature), computed plainly in fp32: each packed sequence
    cu_seq[i]:cu_seq[i+1] attends only to itself, causally when window_size == (-1, 0); query head h reads KV
    head h // (Hq/Hkv). The asserts are the kernel's requirements, so a wrong call fails here as on CUDA."""
    assert query.dtype in (torch.float16, torch.bfloat16) and key.dtype == value.dtype == query.dtype
    assert query.dim() == key.dim() == value.dim() == 3
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    assert torch.equal(cu_seq_q, cu_seq_k) and int(cu_seq_q[-1]) == query.shape[0] == key.shape[0]
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    assert max_q == max_k == max(lengths)
    assert window_size in ((-1, -1), (-1, 0)) and return_aux is None and seqused_k is None and block_table is None
    hq, hkv = query.shape[1], key.shape[1]
    assert enable_gqa or hq == hkv, "varlen_attn raises without enable_gqa when head counts differ"
    assert hq % hkv == 0
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        qs = query[start:end].float().transpose(0, 1)
        ks, vs = (z[start:end].float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1) for z in (key, value))
        scores = qs @ ks.transpose(1, 2) * scale
        if window_size == (-1, 0):
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append((scores.softmax(dim=-1) @ vs).transpose(0, 1))
    return torch.cat(out).to(query.dtype)


def test_torch_varlen_path_matches_the_masked_sdpa_path(monkeypatch):
    """GPT-2 in bf16 through varlen_attn's call (the fp32 reference) agrees with its masked SDPA path."""
    model = tiny("dense", document_masking=True).to(torch.bfloat16)
    ids = batch()
    sdpa = logits(model, ids, DOC)
    calls = []

    @functools.wraps(reference_varlen_attn)  # the call is built from the kernel's signature, so keep it visible
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(attention_module, "varlen_backend", lambda x, dropout_p=0.0: TORCH_VARLEN)
    monkeypatch.setattr(attention_module, "varlen_attn", spy)
    varlen = logits(model, ids, DOC)
    assert len(calls) == SIZES["n_layer"]
    assert calls[0]["window_size"] == (-1, 0) and "enable_gqa" not in calls[0]  # GPT-2: as many KV heads as Q
    torch.testing.assert_close(varlen.float(), sdpa.float(), atol=0.05, rtol=0.02)
    after = logits(model, perturb_document_1(ids), DOC)
    torch.testing.assert_close(after[0, 12:], varlen[0, 12:], rtol=0, atol=0)


def gqa_inputs():
    """bf16 q [2, 16, 4, 8] and k, v with 2 KV heads, over DOC, with a torch-varlen and a masked-SDPA context."""
    b, t, h, kv, hd = 2, 16, 4, 2, 8
    q, k, v = (torch.randn(b, t, n, hd, dtype=torch.bfloat16) for n in (h, kv, kv))
    cu, max_len = cu_seqlens_from_document_ids(DOC)
    ctx = AttentionContext(cu_seqlens=cu, max_seqlen=max_len, varlen=TORCH_VARLEN)
    return q, k, v, ctx, AttentionContext(attn_mask=attention_module.document_causal_mask(DOC))


def test_torch_varlen_dropout_and_dtype_guards(monkeypatch):
    monkeypatch.setattr(attention_module, "varlen_attn", reference_varlen_attn)
    q, k, v, ctx, _ = gqa_inputs()
    with pytest.raises(RuntimeError, match="no dropout"):
        attend(q, k, v, ctx, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="needs fp16/bf16"):
        attend(q.float(), k.float(), v.float(), ctx)


def varlen_attn_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.9's varlen_attn: causal is `is_causal`, no `scale`, and K/V must have the query's head count."""
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 window_size=(-1, 0) if is_causal else (-1, -1))


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """PyTorch 2.10's: `scale` and `window_size`, still no `enable_gqa`."""
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 scale=scale, window_size=window_size)


@pytest.mark.parametrize("kernel", [varlen_attn_2_9, varlen_attn_2_10, reference_varlen_attn])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_every_release_of_varlen_attn_gets_a_call_it_takes(monkeypatch, kernel, scale):
    """The GPU image may carry an older torch than CI: causal, scale and GQA are spelled in its keywords (or, where
    it has none, done around the call) and the result is the masked SDPA path's."""
    monkeypatch.setattr(attention_module, "varlen_attn", kernel)
    q, k, v, ctx, masked = gqa_inputs()
    torch.testing.assert_close(attend(q, k, v, ctx, scale=scale).float(), attend(q, k, v, masked, scale=scale).float(),
                               atol=0.03, rtol=0.03)


def test_a_varlen_attn_without_a_causal_keyword_is_not_used():
    def unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError("never called")

    assert all(attention_module._usable(k) for k in (varlen_attn_2_9, varlen_attn_2_10, reference_varlen_attn))
    assert not attention_module._usable(unknown) and not attention_module._usable(None)


@pytest.mark.parametrize(("torch_varlen", "sm80", "dropout", "says"), [
    (False, True, 0.0, "has no torch.nn.attention.varlen.varlen_attn"),
    (True, False, 0.0, "compute capability 8.0+"),
    (True, True, 0.1, "attention dropout is 0.1"),
])
def test_the_cuda_fallback_to_masked_sdpa_is_logged_once_with_its_reason(monkeypatch, caplog, torch_varlen, sm80,
                                                                          dropout, says):
    monkeypatch.setattr(attention_module, "_half_on_cuda", lambda x: True)
    monkeypatch.setattr(attention_module, "_sm80_or_newer", lambda device: sm80)
    monkeypatch.setattr(attention_module, "TORCH_VARLEN_AVAILABLE", torch_varlen)
    monkeypatch.setattr(attention_module, "FLASH_ATTN_AVAILABLE", False)
    monkeypatch.setattr(kernels, "_said", set())
    x = torch.zeros(2, 16, 8)
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        for _ in range(3):  # every layer of every forward asks; the log says it once
            assert document_context(x, DOC, dropout_p=dropout).attn_mask is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == attention_module.__name__]
    assert len(warnings) == 1, warnings
    assert "falls back to SDPA" in warnings[0] and says in warnings[0] and "[flash]" in warnings[0]


def test_no_fallback_is_logged_off_cuda(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_said", set())
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        document_context(torch.zeros(2, 16, 8, dtype=torch.bfloat16), DOC)
    assert not caplog.records  # CPU runs use masked SDPA by design: nothing to warn about
