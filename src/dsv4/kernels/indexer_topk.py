"""Chunked lightning-indexer top-k: no [T, N] score matrix is ever stored.

Score(t, s) = sum_j w_tj ReLU(q_tj . k_s)   (DeepSeek-V3.2 DSA lightning indexer; V4 report 2.3.1;
docs/spec.md section 2), entry s visible to query t iff s < (q_pos[t] + 1 - exclude_window) // ratio (and the
optional same-document rule). The result is exactly `dsv4.kernels.topk.topk_indices(full_scores, k,
visible)`: score descending, then position ascending, -1 padding.

How (per query chunk of `chunk` rows, B*chunk rows in all):
  * scores: the chunk's visible key range is cut into key blocks of at most `key_chunk` entries (None:
    one block, i.e. one selection per query chunk, whenever B*chunk*n_visible fits _SCORE_FLOATS);
    inside a block the scores are made in cache-sized slices: one bmm [C*n, c] x [c, sub], ReLU in
    place, one bmm with w that sums the heads (the float ops of dsv4.model.indexer.Indexer.score, same
    results as the old per-key-chunk einsums), invisible entries -inf.
  * exact order by one integer key per entry: key = (order-preserving int32 of the score) << 32 |
    (2^32 - 1 - position); (score desc, position asc) is plain descending key order, the keys of a row
    are distinct, and score and position are decoded from the key. Keys are only made for few entries:
  * selection (CPU, numpy: its AVX-512 partition/sort is ~5x faster than torch.topk there):
    np.argpartition picks k entries with ties at the k-th value broken arbitrarily; rows where the k-th
    value also occurs outside the pick (a boundary tie, e.g. fewer than k positive scores: ReLU's exact
    zeros) are redone with keys over the whole row; the others are exact as they are, and their k keys
    are sorted. Long blocks (L > 4k): groups of g ~ sqrt(L / k) entries; the k groups with the largest
    max (one max-pool pass; exact unless a boundary tie between group maxima, then the whole row) hold
    the k best entries (a better group's max beats every entry of a worse group), so partitions run
    over L/g group maxima and k*g candidates only. Other devices: the same with keys and torch.topk.
  * more than one key block: the block's k best keys are merged with the running list (top-k of 2k).
Memory: O(B * chunk * key_chunk) for one score block + O(B * chunk * n_heads * sub) for the head
intermediate + O(T * k) for the result. Scores must be finite (a -inf score reads as not visible).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

_SCORE_FLOATS = 1 << 24  # one score block [B*chunk, key block] (fp32: 64 MiB) when key_chunk is None
_HEAD_FLOATS = 1 << 19  # the per-head intermediate [B*chunk*n_heads, sub] (2 MiB: stays in cache)
_USE_NUMPY = True  # CPU: select with numpy (AVX-512 partition/sort; torch.topk is ~5x slower there)
_LOW = (1 << 32) - 1


def _np_keys(v: np.ndarray, p: np.ndarray) -> np.ndarray:
    """fp32 scores v, positions p (same shape) -> int64 keys, descending = (score desc, position asc)."""
    i = (v + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
    o = (i >> 31) & 0x7FFFFFFF
    o ^= i  # negative floats: flip magnitude bits
    key = o.astype(np.int64)
    key <<= 32
    key |= _LOW - p
    return key


def _np_top(key: np.ndarray, m: int) -> np.ndarray:
    """The m largest keys of each row, descending."""
    n = key.shape[-1]
    if m < n:
        key = np.partition(key, n - m, axis=-1)[:, n - m :]
    return np.sort(key, axis=-1)[:, ::-1]


def _take(a: np.ndarray, i: np.ndarray) -> np.ndarray:
    """a [R, L], i [R, m] -> a[r, i[r, j]] (flat take: faster than take_along_axis)."""
    return np.take(a.reshape(-1), i + (np.arange(a.shape[0]) * a.shape[1])[:, None])


def _np_select(a: np.ndarray, p: np.ndarray | int, kk: int) -> np.ndarray:
    """Best min(kk, L) keys (descending) of rows a [R, L] (fp32 scores; positions p [R, L], or k0 for
    positions k0 + column).

    np.argpartition takes kk entries per row, ties at the kk-th value broken arbitrarily; a row is exact
    as is unless the kk-th value also occurs outside the taken set (a boundary tie: count(a >= v_k) > kk);
    those rows are redone with keys over the whole row."""
    _r, n = a.shape
    full = np.arange(p, p + n, dtype=np.int64)[None, :] if isinstance(p, int) else p
    if n <= kk:
        return _np_top(_np_keys(a, full), kk)
    part = np.argpartition(a, n - kk, axis=-1)[:, n - kk :]
    v = _take(a, part)
    tie = np.count_nonzero(a >= v.min(-1, keepdims=True), axis=-1) > kk
    key = _np_keys(v, part + p if isinstance(p, int) else _take(p, part))
    if tie.any():
        rows = np.flatnonzero(tie)
        key[rows] = _np_top(_np_keys(a[rows], np.broadcast_to(full, a.shape)[rows]), kk)
    return _np_top(key, kk)


def _np_block(s: torch.Tensor, k0: int, kk: int, g: int) -> np.ndarray:
    """Best kk keys of a score block s [R, L] (CPU; positions k0.., L a multiple of g, tail -inf): groups
    of g, the kk groups with the largest max (exact unless a boundary tie between group maxima, then the
    whole row) hold the kk best entries, which are selected among those kk*g candidates."""
    r, n = s.shape
    a = s.numpy()
    nb = n // g
    if g == 1 or nb <= kk:
        return _np_select(a, k0, kk)
    gm = torch.nn.functional.max_pool1d(s.view(r, 1, n), g, g).view(r, nb).numpy()  # 2x faster than amax
    gi = np.argpartition(gm, nb - kk, axis=-1)[:, nb - kk :]  # [R, kk] groups
    tie = np.count_nonzero(gm >= _take(gm, gi).min(-1, keepdims=True), axis=-1) > kk
    cand = np.take(a.reshape(r * nb, g), (gi + (np.arange(r) * nb)[:, None]).reshape(-1), axis=0).reshape(r, kk * g)
    key = _np_select(cand, (gi[:, :, None] * g + (np.arange(g) + k0)).reshape(r, kk * g), kk)
    if tie.any():
        rows = np.flatnonzero(tie)
        key[rows] = _np_select(a[rows], k0, kk)
    return key


def _t_keys(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    i = (v + 0.0).view(torch.int32)
    o = torch.where(i < 0, i ^ 0x7FFFFFFF, i)
    return (o.long() << 32) | (_LOW - p)


def _t_block(s: torch.Tensor, k0: int, kk: int, g: int) -> torch.Tensor:
    """torch version of _np_block (any device): keys of the whole block (groups: of the group maxima,
    then of the candidates), torch.topk on distinct keys."""
    r, n = s.shape
    pos = torch.arange(k0, k0 + n, device=s.device)
    nb = n // g
    if g > 1 and nb > kk:
        gm = torch.nn.functional.max_pool1d(s.view(r, 1, n), g, g).view(r, nb)
        gi = _t_keys(gm, torch.arange(nb, device=s.device)).topk(kk, dim=-1, sorted=False).indices
        cols = (gi.unsqueeze(-1) * g + torch.arange(g, device=s.device)).view(r, kk * g)
        s, pos = s.gather(-1, cols), cols + k0
    return _t_keys(s, pos).topk(min(kk, s.shape[-1]), dim=-1, sorted=True).values


def _decode(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys -> (scores fp32, positions)."""
    o = (key >> 32).int()
    return torch.where(o < 0, o ^ 0x7FFFFFFF, o).view(torch.float32), _LOW - (key & _LOW)


def _group_size(n: int, kk: int) -> int:
    """Group size g (power of 2) for the two-level selection of kk of n; 1 = select directly."""
    if n <= 4 * kk:
        return 1
    return 1 << max(1, min(8, round(math.log2(math.sqrt(n / kk)))))


def segment_same_doc(q_seg: torch.Tensor, key_seg: torch.Tensor) -> Callable:
    """q_seg [B,T], key_seg [B,N] document ids -> same_doc_fn(s0, s1, k0, k1) -> [B, s1-s0, k1-k0] bool."""

    def fn(s0: int, s1: int, k0: int, k1: int) -> torch.Tensor:
        return q_seg[:, s0:s1, None] == key_seg[:, None, k0:k1]

    return fn


@torch.no_grad()
def chunked_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    q_pos: torch.Tensor,
    ratio: int,
    exclude_window: int = 0,
    chunk: int = 128,
    key_chunk: int | None = None,
    same_doc_fn: Callable | None = None,
    return_scores: bool = False,
):
    """Top-k entry ids of the lightning indexer, computed chunk by chunk.

    q [B,T,n,c] (fp32, roped), w [B,T,n] (scaled head weights), keys [B,N,c], q_pos [T] absolute
    query positions. same_doc_fn(s0, s1, k0, k1) -> [B, s1-s0, k1-k0] bool restricts visibility
    (see segment_same_doc). chunk: query rows per selection; key_chunk: most keys per selection block
    (None: as many as fit _SCORE_FLOATS, usually all visible keys in one block). Returns idx
    [B,T,min(k,N)] (long, -1 = none) and, with return_scores, the selected scores [B,T,min(k,N)]
    (-inf on -1 slots; detached).
    Inference (no autograd, CPU, no same_doc_fn, ids only) runs the fused C++ twin (dsv4.kernels.native):
    the same ids, listed in ascending position (then -1 padding) instead of by score; USE_NATIVE = False
    forces this PyTorch path.
    Score formula and float ops are those of dsv4.model.indexer.Indexer.score, per block.
    """
    with torch.autocast(q.device.type, enabled=False):  # selection in fp32 also under bf16 autocast
        return _chunked_indexer_topk(
            q, w, keys, k, q_pos, ratio, exclude_window, chunk, key_chunk, same_doc_fn, return_scores
        )


def _chunked_indexer_topk(q, w, keys, k, q_pos, ratio, exclude_window, chunk, key_chunk, same_doc_fn, return_scores):
    b, t, n_h, c = q.shape
    n = keys.shape[1]
    kk = min(k, n)
    dev = q.device
    ext = _native(q, w, keys, same_doc_fn, return_scores)
    if ext is not None:
        blocks = torch.zeros(b, -(-n // 16) * 16, c, dtype=torch.float32, device=dev)
        blocks[:, :n] = keys
        blocks = blocks.unflatten(1, (-1, 16)).transpose(2, 3).contiguous()  # [B, N/16, c, 16]
        return ext.indexer_topk_fwd(
            q.float().contiguous(), w.float().contiguous(), blocks, n, q_pos.contiguous(), k, ratio, exclude_window
        )
    idx = torch.full((b, t, kk), -1, dtype=torch.long, device=dev)
    scores = torch.full((b, t, kk), float("-inf"), dtype=torch.float32, device=dev) if return_scores else None
    if t == 0 or kk == 0:
        return (idx, scores) if return_scores else idx
    cpu = _USE_NUMPY and q.device.type == "cpu"
    keys_t = keys.float().transpose(1, 2)  # [B, c, N] (view)
    limit = (q_pos.to(dev) + 1 - exclude_window).div(ratio, rounding_mode="floor").clamp(0, n)  # [T]
    n_ch = -(-t // chunk)
    lim_pad = torch.cat([limit, limit[-1:].expand(n_ch * chunk - t)]).view(n_ch, chunk)
    lo_hi = torch.stack([lim_pad.amin(1), lim_pad.amax(1)], 1).tolist()
    for ci, (lo, hi) in enumerate(lo_hi):
        if hi == 0:
            continue
        s0, s1 = ci * chunk, min(ci * chunk + chunk, t)
        rows = b * (s1 - s0)
        qf = q[:, s0:s1].float().reshape(b, (s1 - s0) * n_h, c)
        wf = w[:, s0:s1].float().reshape(rows, 1, n_h)
        lim = limit[s0:s1].repeat(b).unsqueeze(1)  # [rows, 1]
        kc = key_chunk or max(1, _SCORE_FLOATS // rows)
        best = None
        for k0 in range(0, hi, kc):
            k1 = min(k0 + kc, hi)
            g = _group_size(k1 - k0, kk)
            L = -(-(k1 - k0) // g) * g
            sub = max(g, _HEAD_FLOATS // (rows * n_h) // g * g)
            blk = torch.empty(rows, L, device=dev)
            for j0 in range(k0, k1, sub):
                j1 = min(j0 + sub, k1)
                # every slice is sub wide (the tail one shifted left): a narrow bmm takes another BLAS
                # path whose head sum can round differently from Indexer.score's (ties would flip)
                a0 = max(0, min(j0, n - sub))
                h = torch.bmm(qf, keys_t[:, :, a0 : a0 + sub]).relu_()  # [B, C*n, sub]
                s = blk[:, j0 - k0 : j1 - k0]
                if a0 == j0 and j1 - j0 == h.shape[-1]:
                    torch.bmm(wf, h.view(rows, n_h, -1), out=s.unsqueeze(1))
                else:
                    s.copy_(torch.bmm(wf, h.view(rows, n_h, -1))[:, 0, j0 - a0 : j1 - a0])
                if j1 > lo or same_doc_fn is not None:
                    vis = torch.arange(j0, j1, device=dev) < lim
                    if same_doc_fn is not None:
                        vis = vis & same_doc_fn(s0, s1, j0, j1).reshape(rows, j1 - j0)
                    s.masked_fill_(~vis, float("-inf"))
            blk[:, k1 - k0 :] = float("-inf")
            if cpu:
                top = torch.from_numpy(_np_block(blk, k0, kk, g).copy())
            else:
                top = _t_block(blk, k0, kk, g)
            if best is not None:
                cat = torch.cat([best, top], 1)
                top = (
                    torch.from_numpy(_np_top(cat.numpy(), kk).copy())
                    if cpu
                    else cat.topk(min(kk, cat.shape[1]), dim=-1, sorted=True).values
                )
            best = top
        v, p = _decode(best)
        m = p.shape[-1]
        ok = v > float("-inf")
        idx[:, s0:s1, :m] = torch.where(ok, p, -1).view(b, s1 - s0, m)
        if return_scores:
            scores[:, s0:s1, :m] = v.view(b, s1 - s0, m)
    return (idx, scores) if return_scores else idx


USE_NATIVE = True  # inference through the fused C++ score + top-k (dsv4.kernels.native) when it is built
NATIVE_MIN_QUERIES = 64


def _native(q, w, keys, same_doc_fn, return_scores):
    """The C++ kernel if it applies: CPU, no autograd, no document rule, ids only."""
    if not USE_NATIVE or same_doc_fn is not None or return_scores or q.device.type != "cpu":
        return None
    if q.shape[1] < NATIVE_MIN_QUERIES:  # it copies the keys into blocks once per call: pays off for many queries
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, w, keys)):
        return None
    from dsv4.kernels import native

    return native.ext()


def _selected_chunk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, t, k = idx.shape
    n = keys.shape[1]
    flat = (idx.clamp_min(0) + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
    kg = keys.reshape(b * n, -1).index_select(0, flat).view(b, t, k, -1).to(q.dtype)
    s = torch.einsum("btnc,btkc->btnk", q, kg).relu()
    s = torch.einsum("btnk,btn->btk", s, w)
    return torch.where(idx >= 0, s, 0.0)


def indexer_selected_scores(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """Differentiable indexer scores of the SELECTED entries only: out[b,t,i] = Score(t, idx[b,t,i])
    = sum_j w_tj ReLU(q_tj . keys[idx]) (0 on -1 slots), [B,T,k].

    For the sparse-stage indexer KL restricted to the selected set (DSA paper; docs/spec.md section 2):
    indexer_kl(out, probs_selected, idx >= 0) equals indexer_kl(full_scores, mass, selection_mask).
    Query chunks under activation checkpointing: memory O(chunk * k * (c_I + n_I)) instead of the
    O(T * k * (c_I + n_I)) a plain gather would keep for backward.
    """
    from torch.utils.checkpoint import checkpoint

    t = q.shape[1]
    grad = torch.is_grad_enabled() and (q.requires_grad or w.requires_grad or keys.requires_grad)
    outs = []
    for s0 in range(0, t, chunk):
        args = (q[:, s0 : s0 + chunk], w[:, s0 : s0 + chunk], keys, idx[:, s0 : s0 + chunk])
        outs.append(checkpoint(_selected_chunk, *args, use_reentrant=False) if grad else _selected_chunk(*args))
    if not outs:
        return q.new_zeros(idx.shape, dtype=torch.float32)
    return torch.cat(outs, 1)


def decode_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One query per row: q [B,n,c], w [B,n], keys [B,N,c] -> Score [B,N] = sum_j w_j ReLU(q_j . k_s), as
    keys @ q^T (streams the long key store once)."""
    return (torch.einsum("bnc,bhc->bnh", keys.to(q.dtype), q).relu() * w[:, None, :]).sum(-1) + 0.0


@torch.compiler.assume_constant_result
def _decode_native_built() -> bool:
    from dsv4.kernels import native

    return native.ext() is not None


def _decode_native_call(q, w, keys, limit, k):
    from dsv4.kernels import native

    if keys.stride(-1) != 1 or keys.stride(-2) != keys.shape[-1]:
        keys = keys.contiguous()
    return native.ext().indexer_decode_topk(q.float().contiguous(), w.float().contiguous(), keys, limit.contiguous(), k)


@torch.library.custom_op("dsv4::indexer_decode_topk", mutates_args=())
def _indexer_decode_topk_op(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, limit: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, valid = _decode_native_call(q, w, keys, limit, k)
    return ids, valid


@_indexer_decode_topk_op.register_fake
def _(q, w, keys, limit, k):
    shape = (q.shape[0], min(k, keys.shape[1]))
    return q.new_empty(shape, dtype=torch.long), q.new_empty(shape, dtype=torch.bool)


def decode_indexer_topk(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, limit: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's top-k for one decode query per row: q [B,n,c] (roped, fp32), w [B,n], keys [B,N,c] (a
    store, whole or a prefix), limit [B] = entries visible to each row (entry s visible iff s < limit)
    -> (ids [B, min(k, N)], valid [B, min(k, N)]), the set of topk_static (score descending, then position
    ascending; fewer than k visible: all of them), in no particular order.

    CPU inference with fp32 keys runs the fused C++ kernel (csrc: scores of the visible prefix of each row
    read in place, split over the threads, no [B, N] tensor beyond one score buffer, then the exact
    selection of indexer_topk_fwd), also inside a compiled step (a custom op). Elsewhere, and with
    USE_NATIVE = False, the reference: decode_scores then topk_static (compiled) / topk_eager (eager)."""
    from dsv4.kernels.topk import topk_eager, topk_static

    native = (
        USE_NATIVE
        and q.device.type == "cpu"
        and keys.dtype == torch.float32
        and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad))
        and _decode_native_built()
    )
    if native:  # through the custom op when compiled (inductor calls it), else straight (no dispatch cost)
        if torch.compiler.is_compiling():
            return _indexer_decode_topk_op(q, w, keys, limit, k)
        ids, valid = _decode_native_call(q, w, keys, limit, k)
        return ids, valid
    scores = decode_scores(q, w, keys)
    visible = torch.arange(keys.shape[1], device=keys.device) < limit[:, None]
    return (topk_static if torch.compiler.is_compiling() else topk_eager)(scores, k, visible)
