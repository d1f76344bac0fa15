"""One decode step of the V4 core attention: each row has its own query position and key sets.

o_bh = sum_parts sum_l p_bhl k_bl,  p = softmax over {valid keys of every part} U {sink z_h}
(docs/spec.md section 2; the sink adds exp(z_h) to the denominator only). K = V (MQA).
Parts are e.g. the raw window ring and the gathered top-k / visible compressed entries; they are
never concatenated, so a long entry list is read once. The reference twin is
`dsv4.kernels.sparse_attention` called with one query (tests compare the two).

Eager CPU inference with fp32 keys takes the C++ kernel (csrc: `decode_attention_part`) when a part has at
least NATIVE_MIN_KEYS keys: one pass over the keys in chunks split across the threads, each chunk's
softmax statistics (max m, denominator, weighted sum) merged as in flash decoding, with no logits
tensor. `decode_attention_reference` is its twin; a test compares the two.
"""

from __future__ import annotations

import torch

USE_NATIVE = True
NATIVE_MIN_KEYS = 1024  # shorter parts: the PyTorch ops are as fast as the kernel's call


def decode_attention_reference(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B,H,c]; parts: (keys [B,L,c], valid [B,L] bool); sink [H] -> o [B,H,c] in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    z = sink.to(acc).view(1, -1)
    logits = []
    for keys, valid in parts:
        # keys @ q^T: a long contiguous matrix times a thin one (BLAS streams the keys once)
        lg = torch.matmul(keys.to(q.dtype), q.transpose(1, 2)).transpose(1, 2).to(acc).mul_(scale)
        logits.append(lg.masked_fill_(~valid[:, None, :], float("-inf")))
    m = z.expand(q.shape[0], -1)
    for lg in logits:
        if lg.shape[-1]:
            m = torch.maximum(m, lg.amax(-1))
    den = torch.exp(z - m)
    o = torch.zeros(q.shape, dtype=acc, device=q.device)
    for lg, (keys, _) in zip(logits, parts):
        p = lg.sub_(m[..., None]).exp_()
        den = den + p.sum(-1)
        o += torch.einsum("bhl,blc->bhc", p.to(q.dtype), keys.to(q.dtype)).to(acc)
    return (o / den[..., None]).to(q.dtype)


def _native():
    if not USE_NATIVE or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    from dsv4.kernels import native

    return native.ext()


def decode_attention(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """decode_attention_reference's result; with a long part, fp32 CPU parts go through the C++ kernel
    (module doc), one call per part, and the parts' statistics are merged with the sink here."""
    ext = _native() if any(p[0].shape[1] >= NATIVE_MIN_KEYS for p in parts) else None
    if ext is None or q.device.type != "cpu" or q.dtype != torch.float32 or any(p[0].dtype != q.dtype for p in parts):
        return decode_attention_reference(q, parts, sink, scale)
    z = sink.float().view(1, -1).expand(q.shape[0], -1)
    stats, q = [], q.contiguous()
    for keys, valid in parts:
        if keys.stride(-1) != 1 or keys.stride(-2) != keys.shape[-1]:
            keys = keys.contiguous()
        stats.append(ext.decode_attention_part(q, keys, valid.to(torch.uint8).contiguous(), scale))
    top = z
    for _, m, _ in stats:
        top = torch.maximum(top, m)
    den = torch.exp(z - top)
    o = torch.zeros_like(q)
    for acc, m, d in stats:
        f = torch.exp(m - top)  # m = -inf (no valid key): 0
        den = den + f * d
        o += f[..., None] * acc
    return o / den[..., None]
