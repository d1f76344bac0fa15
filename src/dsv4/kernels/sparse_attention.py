"""Long-context V4 attention kernels: truly sparse (CSA / DSA), dense-over-entries (HCA), window (SWA).

Every kernel computes the V4 core op (docs/spec.md section 2; DeepSeek-V4 report section 2.3; official
model.py `Attention`), for query t and head h:

    l_ts = scale * q_th . kv_s      for window keys s in (t - n_win, t] (same document as t),
    l_tj = scale * q_th . e_j       for the entries j of t (top-k ids, or causally complete entries),
    o_th = sum_s p_ts kv_s + sum_j p_tj e_j,   p = exp(l - lse_th),
    lse_th = log(sum_s exp l_ts + sum_j exp l_tj + exp z_h)        (z_h = the per-head sink logit).

K = V (MQA: one kv head). The results equal `dsv4.kernels.attention.attention_reference` with
entry_mask = the selection / visibility mask, but no kernel ever builds a [T, S] or [T, N] tensor:
queries are processed in chunks of `chunk`, each chunk sees only its band of raw keys
(chunk + window - 1 rows) plus
  - `sparse_attention`: the rows entries[b, idx[b, t]] gathered for the chunk ([B, chunk, k, c]);
  - `dense_entries_attention`: the entries visible to the chunk's last query ([B, n, c]);
  - `window_attention`: nothing more.
The backward is flash-attention style (Dao et al. 2022, alg. 2): only q, kv, entries, sink, the
output and the per-row logsumexp are kept; each chunk's probabilities are recomputed and
    dP = dO V^T,  dS = P * (dP - D)  with D_th = dO_th . o_th,
    dq = scale dS K,  dK += scale dS^T q,  dV += P^T dO,  dz_h = -sum_t exp(z_h - lse_th) D_th,
with the entry gradients scatter-added into `entries` through the flattened gather indices.
Peak memory is O(chunk * (k + window) * max(H, c)) per chunk on top of the inputs and grads.

Inference (no autograd, fp32, CPU, no document ids) goes through a fused C++ twin of the forward
(csrc/sparse_attention.cpp via dsv4.kernels.native; USE_NATIVE = False forces the PyTorch path): per
query it reads its band and its entries in place, with no gathered copy and no logits tensor.

Positions (`q_pos`, `kv_pos`) must be nondecreasing (cache order); queries may cover only the last
positions of kv (cached decode: q_pos = S-t..S-1, kv_pos = 0..S-1). Top-k ids must not repeat within
a row (-1 = empty slot; selection_mask semantics otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


@dataclass
class _Plan:
    """Everything the per-chunk key builder needs besides the differentiable tensors."""

    kind: str  # "none" | "sparse" | "dense"
    scale: float
    window: int
    q_pos: torch.Tensor  # [T]
    kv_pos: torch.Tensor  # [S]
    chunks: list  # [(s0, s1, lo, hi, n_hi)]
    q_seg: torch.Tensor | None  # [B, T]
    kv_seg: torch.Tensor | None  # [B, S]
    idx: torch.Tensor | None = None  # sparse: [B, T, k] entry ids, -1 = none
    ratio: int = 1  # dense: entry j visible to t iff j < (t + 1 - excl) // ratio
    exclude_window: int = 0
    entry_seg: torch.Tensor | None = None  # dense: [B, N] document id of each entry
    cdtype: torch.dtype = torch.float32  # matmul dtype (input dtype, or the autocast dtype)
    acc: torch.dtype = torch.float32  # softmax / statistics dtype (fp32, fp64 for fp64 inputs)
    want_probs: bool = False


def _plan_chunks(q_pos, kv_pos, window, chunk, n_entries=0, ratio=1, exclude_window=0):
    """Per query chunk [s0, s1): its raw-key band [lo, hi) and (dense) visible entry count n_hi."""
    t = q_pos.shape[0]
    starts = list(range(0, t, chunk))
    if not starts:
        return []
    ends = [min(s + chunk, t) for s in starts]
    first = q_pos[starts]
    last = q_pos[[e - 1 for e in ends]]
    lo = torch.searchsorted(kv_pos, first - window + 1).tolist()
    hi = torch.searchsorted(kv_pos, last, right=True).tolist()
    n_hi = ((last + 1 - exclude_window).div(ratio, rounding_mode="floor").clamp(0, n_entries)).tolist()
    return list(zip(starts, ends, lo, hi, n_hi))


def _keys(plan: _Plan, ci: int, kv: torch.Tensor, entries: torch.Tensor | None):
    """Chunk ci's keys: band [B,W,c], window mask [B|1,C,W], entries (sparse [B,C,k,c] / dense [B,n,c]),
    entry mask (sparse [B,C,k] / dense [B|1,C,n]), flat gather ids (sparse) -- all in plan.cdtype."""
    s0, s1, lo, hi, n_hi = plan.chunks[ci]
    qp = plan.q_pos[s0:s1]
    band = kv[:, lo:hi].to(plan.cdtype)
    d = qp[:, None] - plan.kv_pos[None, lo:hi]
    wm = ((d >= 0) & (d < plan.window)).unsqueeze(0)
    if plan.q_seg is not None:
        wm = wm & (plan.q_seg[:, s0:s1, None] == plan.kv_seg[:, None, lo:hi])
    ent = em = flat = None
    if plan.kind == "sparse":
        b, n = entries.shape[:2]
        idx = plan.idx[:, s0:s1]
        em = idx >= 0
        flat = (idx.clamp_min(0) + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
        ent = entries.reshape(b * n, -1).index_select(0, flat).view(*idx.shape, -1).to(plan.cdtype)
    elif plan.kind == "dense" and n_hi > 0:
        ent = entries[:, :n_hi].to(plan.cdtype)
        lim = (qp + 1 - plan.exclude_window).div(plan.ratio, rounding_mode="floor")
        em = (torch.arange(n_hi, device=qp.device)[None, :] < lim[:, None]).unsqueeze(0)
        if plan.entry_seg is not None:
            em = em & (plan.q_seg[:, s0:s1, None] == plan.entry_seg[:, None, :n_hi])
    return band, wm, ent, em, flat


def _logits(plan, qc, band, wm, ent, em):
    """qc [B,C,H,c] -> masked logits [B,C,H,W] and [B,C,H,k|n] (or None), in plan.acc (fresh tensors)."""
    lw = torch.einsum("bchd,bwd->bchw", qc, band).to(plan.acc)
    lw = lw.mul_(plan.scale).masked_fill_(~wm[:, :, None], float("-inf"))
    le = None
    if ent is not None:
        eq = "bchd,bckd->bchk" if plan.kind == "sparse" else "bchd,bnd->bchn"
        le = torch.einsum(eq, qc, ent).to(plan.acc)
        le = le.mul_(plan.scale).masked_fill_(~em[:, :, None], float("-inf"))
    return lw, le


def _entry_eq(plan, out_side: str) -> str:
    if plan.kind == "sparse":
        return {"o": "bchk,bckd->bchd", "g": "bchk,bchd->bckd", "dp": "bchd,bckd->bchk"}[out_side]
    return {"o": "bchn,bnd->bchd", "g": "bchn,bchd->bnd", "dp": "bchd,bnd->bchn"}[out_side]


def _autocast_off(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


class _V4AttentionFn(torch.autograd.Function):
    """o = V4 core attention (module docstring); backward recomputes each chunk from the saved lse."""

    @staticmethod
    def forward(ctx, q, kv, entries, sink, plan: _Plan):
        b, t, h, c = q.shape
        with _autocast_off(q):
            out = torch.empty(b, t, h, c, dtype=plan.cdtype, device=q.device)
            lse = torch.empty(b, t, h, dtype=plan.acc, device=q.device)
            n_cols = 0 if plan.kind == "none" else (plan.idx.shape[-1] if plan.kind == "sparse" else entries.shape[1])
            probs = torch.zeros(b, t, n_cols, dtype=plan.acc, device=q.device) if plan.want_probs else None
            z = sink.to(plan.acc).view(1, 1, h)
            for ci, (s0, s1, *_rest) in enumerate(plan.chunks):
                band, wm, ent, em, _ = _keys(plan, ci, kv, entries)
                qc = q[:, s0:s1].to(plan.cdtype)
                lw, le = _logits(plan, qc, band, wm, ent, em)
                # row max, finite because the sink z is; amax of an empty band is skipped
                m = torch.maximum(lw.amax(-1), z) if lw.shape[-1] else z.expand(lw.shape[:3])
                if le is not None:
                    m = torch.maximum(m, le.amax(-1))
                pw = lw.sub_(m[..., None]).exp_()  # unnormalised, in place
                den = pw.sum(-1) + torch.exp(z - m)
                o = torch.einsum("bchw,bwd->bchd", pw.to(plan.cdtype), band).to(plan.acc)
                if le is not None:
                    pe = le.sub_(m[..., None]).exp_()
                    den += pe.sum(-1)
                    o += torch.einsum(_entry_eq(plan, "o"), pe.to(plan.cdtype), ent).to(plan.acc)
                    if probs is not None:
                        probs[:, s0:s1, : pe.shape[-1]] = (pe / den[..., None]).sum(2)
                lse[:, s0:s1] = m + den.log()
                o /= den[..., None]
                out[:, s0:s1] = o
        ctx.plan = plan
        ctx.save_for_backward(q, kv, entries, sink, out, lse)
        if probs is None:
            return out
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *_unused):
        plan: _Plan = ctx.plan
        q, kv, entries, sink, out, lse = ctx.saved_tensors
        b, t, h, c = q.shape
        acc, cd, scale = plan.acc, plan.cdtype, plan.scale
        with _autocast_off(q):
            dq = torch.zeros(b, t, h, c, dtype=acc, device=q.device)
            dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
            dent = None if entries is None else torch.zeros(entries.shape, dtype=acc, device=q.device)
            dent_flat = None if dent is None else dent.view(-1, entries.shape[-1])
            dz = torch.zeros(h, dtype=acc, device=q.device)
            z = sink.to(acc).view(1, 1, h)
            for ci, (s0, s1, lo, hi, n_hi) in enumerate(plan.chunks):
                band, wm, ent, em, flat = _keys(plan, ci, kv, entries)
                qc = q[:, s0:s1].to(cd)
                m = lse[:, s0:s1]
                do = dout[:, s0:s1].to(cd)
                dd = (do.to(acc) * out[:, s0:s1].to(acc)).sum(-1)  # D = dO . o   [B,C,H]
                dz -= (torch.exp(z - m) * dd).sum((0, 1))
                lw, le = _logits(plan, qc, band, wm, ent, em)
                qd = torch.cat([qc, do], 2)  # [B,C,2H,c]
                pw = lw.sub_(m[..., None]).exp_()
                dsw = torch.einsum("bchd,bwd->bchw", do, band).to(acc).sub_(dd[..., None]).mul_(pw)
                dsw_c = dsw.mul_(scale).to(cd)
                dqc = torch.einsum("bchw,bwd->bchd", dsw_c, band).to(acc)
                # dK (scale dS^T q) and dV (P^T dO) of the band in one product over (query, 2H)
                dkv[:, lo:hi] += torch.einsum("bchw,bchd->bwd", torch.cat([dsw_c, pw.to(cd)], 2), qd).to(acc)
                if le is not None:
                    pe = le.sub_(m[..., None]).exp_()
                    dse = torch.einsum(_entry_eq(plan, "dp"), do, ent).to(acc).sub_(dd[..., None]).mul_(pe)
                    dse_c = dse.mul_(scale).to(cd)
                    dqc += torch.einsum(_entry_eq(plan, "o"), dse_c, ent).to(acc)
                    g = torch.einsum(_entry_eq(plan, "g"), torch.cat([dse_c, pe.to(cd)], 2), qd).to(acc)
                    if plan.kind == "sparse":  # masked slots carry exact zeros (p = 0)
                        dent_flat.index_add_(0, flat, g.reshape(-1, g.shape[-1]))
                    else:
                        dent[:, :n_hi] += g
                dq[:, s0:s1] = dqc
        dq = dq.to(q.dtype)
        dkv = dkv.to(kv.dtype)
        dent = None if dent is None else dent.to(entries.dtype)
        return dq, dkv, dent, dz.to(sink.dtype), None


def _dtypes(q, kv, entries):
    cd = torch.promote_types(q.dtype, kv.dtype)
    if entries is not None:
        cd = torch.promote_types(cd, entries.dtype)
    if torch.is_autocast_enabled(q.device.type):  # mirror the reference's autocast einsums
        cd = torch.get_autocast_dtype(q.device.type)
    return cd, torch.promote_types(cd, torch.float32)


USE_NATIVE = True  # inference forward through the C++ kernel (dsv4.kernels.native) when it is built


def _native(q, kv, sink, entries, q_pos, kv_pos, q_seg, want_probs):
    """The C++ forward if it applies: CPU, fp32, no autograd, no document ids, no entry masses."""
    if not USE_NATIVE or want_probs or q_seg is not None or q.device.type != "cpu":
        return None
    ts = [q, kv, sink] + ([] if entries is None else [entries])
    if any(t.dtype != torch.float32 for t in ts) or (torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    from dsv4.kernels import native

    return native.ext()


def _native_call(ext, q, kv, sink, scale, window, q_pos, kv_pos, entries, idx, ratio=1, exclude_window=0):
    e = q.new_zeros(q.shape[0], 0, q.shape[-1]) if entries is None else entries.contiguous()
    i = idx.contiguous() if idx is not None else torch.zeros(0, dtype=torch.long)
    return ext.v4_attention_fwd(
        q.contiguous(),
        kv.contiguous(),
        kv_pos.contiguous(),
        q_pos.contiguous(),
        e,
        i,
        sink.contiguous(),
        float(scale),
        int(window),
        int(ratio),
        int(exclude_window),
        idx is not None,
    )


def _run(q, kv, sink, entries, plan, return_entry_probs):
    plan.want_probs = return_entry_probs and plan.kind != "none"
    res = _V4AttentionFn.apply(q, kv, entries, sink, plan)
    if return_entry_probs:
        return res if plan.want_probs else (res, None)
    return res


def v4_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    window: int,
    positions: tuple[torch.Tensor, torch.Tensor],
    entries: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    *,
    ratio: int = 1,
    exclude_window: int = 0,
    chunk: int = 256,
    q_seg: torch.Tensor | None = None,
    kv_seg: torch.Tensor | None = None,
    entry_seg: torch.Tensor | None = None,
    return_entry_probs: bool = False,
):
    """The one banded kernel behind every layer kind: the window band of kv plus, with topk_idx, the
    selected entries (sparse_attention) or, without, every causally complete entry (dense_entries_attention),
    or nothing when there are no entries (window_attention). One softmax with the sink. positions: (q_pos [T],
    kv_pos [S]); the keywords are the three wrappers' (see their docstrings)."""
    q_pos, kv_pos = positions
    ext = _native(q, kv, sink, entries, q_pos, kv_pos, q_seg, return_entry_probs)
    if ext is not None:
        return _native_call(ext, q, kv, sink, scale, window, q_pos, kv_pos, entries, topk_idx, ratio, exclude_window)
    cd, acc = _dtypes(q, kv, entries)
    n = 0 if entries is None else entries.shape[1]
    sparse = topk_idx is not None
    kind = "none" if n == 0 or (sparse and topk_idx.shape[-1] == 0) else ("sparse" if sparse else "dense")
    chunks = _plan_chunks(q_pos, kv_pos, window, chunk, 0 if sparse else n, ratio, exclude_window)
    plan = _Plan(
        kind,
        scale,
        window,
        q_pos,
        kv_pos,
        chunks,
        q_seg,
        kv_seg,
        idx=topk_idx if kind == "sparse" else None,
        ratio=ratio,
        exclude_window=exclude_window,
        entry_seg=entry_seg,
        cdtype=cd,
        acc=acc,
    )
    if kind != "none":
        return _run(q, kv, sink, entries, plan, return_entry_probs)
    res = _run(q, kv, sink, None, plan, False)
    if not return_entry_probs:
        return res
    if sparse:
        return res, torch.zeros(*topk_idx.shape, dtype=acc, device=q.device)
    return res, (None if entries is None else torch.zeros(q.shape[0], q.shape[1], 0, dtype=acc, device=q.device))


def sparse_attention(q, kv, sink, scale, window, q_pos, kv_pos, entries, topk_idx, **kw):
    """CSA / DSA attention over window keys + top-k selected entries, one softmax with the sink.

    o_th = sum_{s in win(t)} p_ts kv_s + sum_{i: idx_ti >= 0} p_ti entries[idx_ti]   (docs/spec.md section 2;
    V4 report 2.3.1, V3.2 DSA). q [B,T,H,c]; kv [B,S,c] at kv_pos [S]; entries [B,N,c] (DSA: entries
    = kv); topk_idx [B,T,k] (-1 = none, no repeats; already causal / same-document filtered).
    Window keys are kept inside the query's document via q_seg [B,T] / kv_seg [B,S].
    Equals attention_reference(..., entries, selection_mask(topk_idx, N)). Memory per chunk:
    gathered entries [B, chunk, k, c] + logits [B, chunk, H, k + chunk + window]; backward recomputes.
    return_entry_probs: also return the attention mass (summed over heads) on each SELECTED slot,
    [B,T,k] aligned with topk_idx (0 on -1 slots), detached.
    """
    return v4_attention(q, kv, sink, scale, window, (q_pos, kv_pos), entries, topk_idx, **kw)


def dense_entries_attention(q, kv, sink, scale, window, q_pos, kv_pos, entries=None, **kw):
    """HCA attention: window keys + every causally complete entry, one softmax with the sink.

    Entry j is visible to query t iff j < (t + 1 - exclude_window) // ratio (docs/spec.md section 2: HCA
    "query t sees entries j < (t+1)//m'"; exclude_window = n_win with ratio 1 gives DSA's dense
    warm-up set) and, if entry_seg [B,N] is given, entry_seg[j] == q_seg[t] (document masking).
    Equals attention_reference(..., entries, visible_entries(...) [& same_doc]). Memory per chunk:
    logits [B, chunk, H, n_visible + chunk + window]; backward recomputes. entries=None: SWA.
    return_entry_probs: also the detached per-entry mass summed over heads, [B,T,N] (O(T N): for the
    dense indexer warm-up only).
    """
    return v4_attention(q, kv, sink, scale, window, (q_pos, kv_pos), entries, **kw)


def window_attention(q, kv, sink, scale, window, q_pos, kv_pos, **kw) -> torch.Tensor:
    """SWA attention: o_th = sum_{t - n_win < s <= t, same doc} p_ts kv_s, softmax with the sink
    (docs/spec.md section 2, m = 0). Banded chunks (memory O(chunk (chunk + window) H)), recomputing backward."""
    return v4_attention(q, kv, sink, scale, window, (q_pos, kv_pos), **kw)
