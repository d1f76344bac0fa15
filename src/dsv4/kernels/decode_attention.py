"""One decode step of the V4 core attention: each row has its own query position and key sets.

o_bh = sum_parts sum_l p_bhl k_bl,  p = softmax over {valid keys of every part} U {sink z_h}
(docs/spec.md section 2; the sink adds exp(z_h) to the denominator only). K = V (MQA).
Parts are e.g. the raw window ring and the gathered top-k / visible compressed entries; they are
never concatenated, so a long entry list is read once. The reference twin is
`dsv4.kernels.sparse_attention` called with one query (tests compare the two).
"""

from __future__ import annotations

import torch


def decode_attention(
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
