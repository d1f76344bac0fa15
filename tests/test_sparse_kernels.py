"""Long-context kernels equal the masked dense oracle (forward and backward) and stay sparse in memory.

sparse_attention (CSA, DSA), dense_entries_attention (HCA), window_attention (SWA) vs
attention_reference; chunked_indexer_topk vs topk_indices on the full score matrix.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from dsv4.kernels.attention import attention_reference, selection_mask
from dsv4.kernels.indexer_topk import chunked_indexer_topk, segment_same_doc
from dsv4.kernels.sparse_attention import dense_entries_attention, sparse_attention, window_attention
from dsv4.kernels.topk import topk_indices
from dsv4.model.indexer import Indexer, visible_entries

H, C = 3, 16


def _rand(shape, g, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _segments(b, t, g, p=0.06):
    return torch.cumsum(torch.rand(b, t, generator=g) < p, 1)


def _entry_seg(seg, n, ratio, overlap):
    """Document of the first token each entry pools (Attention.entry_segments)."""
    first = torch.arange(n) * ratio
    if overlap:
        first = (first - ratio).clamp_min(0)
    return seg[:, first]


def _grads(o, leaves):
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    gs = torch.autograd.grad((o * w).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, gs)]


def _check(fast, ref, leaves, dtype):
    """Forward and every grad: max |a - b| <= tol * max |b| (1e-5 fp32, 1e-10 fp64)."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    o1, o2 = ref(), fast()
    assert o2.shape == o1.shape and o2.dtype == o1.dtype
    pairs = [(o2, o1)] + list(zip(_grads(o2, leaves), _grads(o1, leaves)))
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape
        if b.numel() == 0:
            continue
        err = (a - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1e-30), (i, err, b.abs().max().item())


def _setup(b, t, s, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv, ent = _rand((b, t, H, C), g, dtype), _rand((b, s, C), g, dtype), _rand((b, n, C), g, dtype)
    sink = _rand((H,), g, dtype)
    return g, q, kv, ent, sink


DTYPES = [torch.float64, torch.float32]


# ------------------------------------------------------------------------------------------ SWA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,window,chunk", [(1, 4, 8), (7, 16, 4), (40, 8, 16), (100, 5, 32), (64, 16, 64)])
@pytest.mark.parametrize("segs", [False, True])
def test_window_attention(dtype, t, window, chunk, segs):
    g, q, kv, _, sink = _setup(2, t, t, 0, dtype, t)
    pos = torch.arange(t)
    seg = _segments(2, t, g) if segs else None
    ref = lambda: attention_reference(q, kv, sink, 0.25, window, pos, pos, q_seg=seg, kv_seg=seg)
    fast = lambda: window_attention(q, kv, sink, 0.25, window, pos, pos, chunk=chunk, q_seg=seg, kv_seg=seg)
    _check(fast, ref, [q, kv, sink], dtype)


# ------------------------------------------------------------------------------------- CSA / DSA
def _topk_ids(g, b, q_pos, n, k, ratio, exclude_window=0, same_doc=None, holes=0.0):
    vis = visible_entries(q_pos, n, ratio, exclude_window).expand(b, -1, -1)
    if same_doc is not None:
        vis = vis & same_doc
    idx = topk_indices(torch.randn(vis.shape, generator=g), k, vis)
    if holes:  # -1 slots in the middle of a row, too
        idx = torch.where(torch.rand(idx.shape, generator=g) < holes, -1, idx)
    return idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,window,chunk", [(5, 8, 4, 4), (37, 4, 8, 8), (101, 6, 16, 32), (130, 12, 8, 256)])
@pytest.mark.parametrize("segs", [False, True])
def test_sparse_attention_csa(dtype, t, k, window, chunk, segs):
    ratio, b = 4, 2
    n = t // ratio
    g, q, kv, ent, sink = _setup(b, t, t, n, dtype, t + k)
    pos = torch.arange(t)
    seg = _segments(b, t, g) if segs else None
    same = None if seg is None else seg[:, :, None] == _entry_seg(seg, n, ratio, True)[:, None, :]
    idx = _topk_ids(g, b, pos, n, k, ratio, same_doc=same, holes=0.2)
    ref = lambda: attention_reference(
        q, kv, sink, 0.3, window, pos, pos, ent, selection_mask(idx, n), q_seg=seg, kv_seg=seg
    )
    fast = lambda: sparse_attention(q, kv, sink, 0.3, window, pos, pos, ent, idx, chunk=chunk, q_seg=seg, kv_seg=seg)
    _check(fast, ref, [q, kv, ent, sink], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,window,chunk", [(6, 4, 4, 4), (45, 8, 8, 16), (120, 16, 16, 32)])
@pytest.mark.parametrize("segs", [False, True])
def test_sparse_attention_dsa(dtype, t, k, window, chunk, segs):
    """Ratio 1: the entries ARE the raw kv (same tensor), top-k over tokens outside the window."""
    b = 2
    g, q, kv, _, sink = _setup(b, t, t, 0, dtype, t + 1)
    pos = torch.arange(t)
    seg = _segments(b, t, g) if segs else None
    same = None if seg is None else seg[:, :, None] == seg[:, None, :]
    idx = _topk_ids(g, b, pos, t, k, 1, exclude_window=window, same_doc=same)
    ref = lambda: attention_reference(
        q, kv, sink, 0.25, window, pos, pos, kv, selection_mask(idx, t), q_seg=seg, kv_seg=seg
    )
    fast = lambda: sparse_attention(q, kv, sink, 0.25, window, pos, pos, kv, idx, chunk=chunk, q_seg=seg, kv_seg=seg)
    _check(fast, ref, [q, kv, sink], dtype)


# ------------------------------------------------------------------------------------------ HCA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,ratio,window,chunk", [(5, 4, 4, 4), (37, 4, 8, 8), (70, 16, 16, 16), (150, 8, 8, 64)])
@pytest.mark.parametrize("segs", [False, True])
def test_dense_entries_attention_hca(dtype, t, ratio, window, chunk, segs):
    b = 2
    n = t // ratio
    g, q, kv, ent, sink = _setup(b, t, t, n, dtype, t + ratio)
    pos = torch.arange(t)
    seg = _segments(b, t, g) if segs else None
    eseg = None if seg is None else _entry_seg(seg, n, ratio, False)
    mask = visible_entries(pos, n, ratio).expand(b, -1, -1)
    if seg is not None:
        mask = mask & (seg[:, :, None] == eseg[:, None, :])
    ref = lambda: attention_reference(q, kv, sink, 0.25, window, pos, pos, ent, mask, q_seg=seg, kv_seg=seg)
    fast = lambda: dense_entries_attention(
        q, kv, sink, 0.25, window, pos, pos, ent, ratio=ratio, chunk=chunk, q_seg=seg, kv_seg=seg, entry_seg=eseg
    )
    _check(fast, ref, [q, kv, ent, sink], dtype)


def test_dense_entries_dsa_warmup_and_probs():
    """exclude_window (DSA dense warm-up set) and the per-entry mass used by the indexer KL."""
    t, window = 60, 8
    _g, q, kv, _, sink = _setup(2, t, t, 0, torch.float64, 5)
    pos = torch.arange(t)
    mask = visible_entries(pos, t, 1, window).expand(2, -1, -1)
    o1, p1 = attention_reference(q, kv, sink, 0.25, window, pos, pos, kv, mask, return_entry_probs=True)
    o2, p2 = dense_entries_attention(
        q, kv, sink, 0.25, window, pos, pos, kv, ratio=1, exclude_window=window, chunk=16, return_entry_probs=True
    )
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p2, p1, rtol=1e-10, atol=1e-12)


def test_sparse_entry_probs_aligned_with_ids():
    t, n, k = 50, 12, 5
    g, q, kv, ent, sink = _setup(2, t, t, n, torch.float64, 9)
    pos = torch.arange(t)
    idx = _topk_ids(g, 2, pos, n, k, 4, holes=0.1)
    _, p1 = attention_reference(q, kv, sink, 0.25, 8, pos, pos, ent, selection_mask(idx, n), return_entry_probs=True)
    o2, p2 = sparse_attention(q, kv, sink, 0.25, 8, pos, pos, ent, idx, chunk=16, return_entry_probs=True)
    want = torch.where(idx >= 0, p1.gather(-1, idx.clamp_min(0)), 0.0)
    torch.testing.assert_close(p2, want, rtol=1e-10, atol=1e-12)
    assert not p2.requires_grad and o2.requires_grad


# ------------------------------------------------------------------------------- cached decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["swa", "csa", "hca", "dsa"])
@pytest.mark.parametrize("s,tq", [(3, 1), (53, 1), (53, 4), (200, 3)])
def test_decode_style_calls(dtype, kind, s, tq):
    """q covers the last tq positions only: q_pos = S-tq..S-1, kv_pos = 0..S-1."""
    b, window, k = 2, 8, 6
    ratio = {"swa": 4, "csa": 4, "hca": 16, "dsa": 1}[kind]
    n = s // ratio
    g, q, kv, ent, sink = _setup(b, tq, s, n, dtype, s * 7 + tq)
    q_pos, kv_pos = torch.arange(s - tq, s), torch.arange(s)
    if kind == "swa":
        ref = lambda: attention_reference(q, kv, sink, 0.25, window, q_pos, kv_pos)
        fast = lambda: window_attention(q, kv, sink, 0.25, window, q_pos, kv_pos, chunk=2)
        leaves = [q, kv, sink]
    elif kind == "hca":
        mask = visible_entries(q_pos, n, ratio).expand(b, -1, -1)
        ref = lambda: attention_reference(q, kv, sink, 0.25, window, q_pos, kv_pos, ent, mask)
        fast = lambda: dense_entries_attention(q, kv, sink, 0.25, window, q_pos, kv_pos, ent, ratio=ratio, chunk=2)
        leaves = [q, kv, ent, sink]
    else:
        e = kv if kind == "dsa" else ent
        idx = _topk_ids(g, b, q_pos, e.shape[1], k, ratio, exclude_window=window if kind == "dsa" else 0)
        ref = lambda: attention_reference(q, kv, sink, 0.25, window, q_pos, kv_pos, e, selection_mask(idx, e.shape[1]))
        fast = lambda: sparse_attention(q, kv, sink, 0.25, window, q_pos, kv_pos, e, idx, chunk=2)
        leaves = [q, kv, sink] + ([] if kind == "dsa" else [ent])
    _check(fast, ref, leaves, dtype)


def test_all_padding_and_empty_entries():
    """Rows whose ids are all -1 and layers with no entries yet (N = 0) reduce to window attention."""
    t = 9
    _g, q, kv, ent, sink = _setup(1, t, t, 2, torch.float64, 1)
    pos = torch.arange(t)
    ref = attention_reference(q, kv, sink, 0.25, 4, pos, pos)
    none = torch.full((1, t, 3), -1)
    torch.testing.assert_close(sparse_attention(q, kv, sink, 0.25, 4, pos, pos, ent, none, chunk=4), ref)
    torch.testing.assert_close(sparse_attention(q, kv, sink, 0.25, 4, pos, pos, ent[:, :0], none, chunk=4), ref)
    torch.testing.assert_close(dense_entries_attention(q, kv, sink, 0.25, 4, pos, pos, ent[:, :0], ratio=4), ref)


def test_bf16_autocast_close_to_reference():
    t, n, k = 64, 16, 6
    g, q, kv, ent, sink = _setup(1, t, t, n, torch.float32, 2)
    pos = torch.arange(t)
    idx = _topk_ids(g, 1, pos, n, k, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o1 = attention_reference(q, kv, sink, 0.25, 8, pos, pos, ent, selection_mask(idx, n))
        o2 = sparse_attention(q, kv, sink, 0.25, 8, pos, pos, ent, idx, chunk=16)
    assert o2.dtype == o1.dtype == torch.bfloat16
    torch.testing.assert_close(o2.float(), o1.float(), rtol=3e-2, atol=3e-2)
    g2 = torch.autograd.grad(o2.float().sum(), [q, kv, ent, sink])
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in g2)


# ---------------------------------------------------------------------------- indexer top-k
def _indexer_inputs(b, t, n, nh, c, g, ties=False):
    if ties:  # small integers: exact arithmetic, many exact ReLU-zero and equal-score ties
        q = torch.randint(-2, 2, (b, t, nh, c), generator=g).float()
        keys = torch.randint(-1, 2, (b, n, c), generator=g).float()
        w = torch.randint(-1, 3, (b, t, nh), generator=g).float()
    else:
        q, keys, w = (
            torch.randn(b, t, nh, c, generator=g),
            torch.randn(b, n, c, generator=g),
            torch.randn(b, t, nh, generator=g),
        )
    return q, w, keys


def _check_chunked_topk(fn_topk, q, w, keys, k, ratio, excl, chunk, key_chunk, seg_rate, g):
    """fn_topk (chunked_indexer_topk) == topk_indices on the full score matrix: ids exactly, selected
    scores to 1e-6 (same float ops, other blocking); seg_rate: document-boundary rate, None = one
    document. Returns (full scores, visibility)."""
    b, t, n = q.shape[0], q.shape[1], keys.shape[1]
    pos = torch.arange(t)
    full = Indexer.score(q, w, keys)
    vis = visible_entries(pos, n, ratio, excl).expand(b, -1, -1)
    fn = None
    if seg_rate is not None:
        seg = _segments(b, t, g, seg_rate)
        eseg = _entry_seg(seg, n, ratio, ratio == 4)
        vis = vis & (seg[:, :, None] == eseg[:, None, :])
        fn = segment_same_doc(seg, eseg)
    want = topk_indices(full, k, vis)
    got, sc = fn_topk(
        q,
        w,
        keys,
        k,
        pos,
        ratio,
        exclude_window=excl,
        chunk=chunk,
        key_chunk=key_chunk,
        same_doc_fn=fn,
        return_scores=True,
    )
    assert torch.equal(got, want)
    ref_sc = torch.where(want >= 0, full.gather(-1, want.clamp_min(0)), float("-inf"))
    torch.testing.assert_close(sc, ref_sc, rtol=1e-6, atol=1e-6)
    return full, vis


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "t,ratio,k,excl,chunk,key_chunk",
    [
        (37, 4, 4, 0, 8, 3),
        (101, 4, 8, 0, 16, 5),
        (64, 4, 64, 0, 64, 4096),  # k > N: all visible, -1 pad
        (90, 1, 10, 8, 7, 11),
        (130, 1, 16, 16, 32, 64),
        (50, 16, 2, 0, 4, 1),
    ],
)
@pytest.mark.parametrize("segs", [False, True])
def test_chunked_indexer_topk_exact(ties, t, ratio, k, excl, chunk, key_chunk, segs):
    g = torch.Generator().manual_seed(t * 3 + k + ties)
    b, nh, c = 2, 4, 8
    n = t // ratio
    q, w, keys = _indexer_inputs(b, t, n, nh, c, g, ties)
    full, vis = _check_chunked_topk(
        chunked_indexer_topk, q, w, keys, k, ratio, excl, chunk, key_chunk, 0.08 if segs else None, g
    )
    if ties and vis.sum() > 100:  # the tie rule is really exercised
        assert (full[vis] == 0).float().mean() > 0.1 and full[vis].unique().numel() < vis.sum() / 4


def test_chunked_indexer_topk_decode_rows():
    """Queries at the last positions only (cached decode) pick the same ids as the prefill rows."""
    g = torch.Generator().manual_seed(4)
    t, ratio, k = 83, 4, 6
    q, w, keys = _indexer_inputs(1, t, t // ratio, 4, 8, g, ties=True)
    pos = torch.arange(t)
    full = chunked_indexer_topk(q, w, keys, k, pos, ratio, chunk=16, key_chunk=5)
    last = chunked_indexer_topk(q[:, -3:], w[:, -3:], keys, k, pos[-3:], ratio, chunk=2, key_chunk=7)
    assert torch.equal(last.sort(-1).values, full[:, -3:].sort(-1).values)  # the same sets (orders differ
    # between the C++ path, used for many queries, and the PyTorch one)


def _indexer_inputs_mode(b, t, n, nh, c, g, mode):
    """ "rand", "ties" (small integers) or "sparse": scores >= 0 (w >= 0) and mostly exact ReLU zeros, so
    many rows have fewer than k positive scores (the k-th value is a 0 shared by many entries)."""
    if mode != "sparse":
        return _indexer_inputs(b, t, n, nh, c, g, mode == "ties")
    q = torch.randn(b, t, nh, c, generator=g) - 1.0
    keys = torch.rand(b, n, c, generator=g)
    w = torch.rand(b, t, nh, generator=g)
    return q, w, keys


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("mode", ["rand", "ties", "sparse"])
@pytest.mark.parametrize(
    "t,ratio,k,excl,chunk,key_chunk,head",
    [
        (700, 1, 16, 0, 64, None, None),  # one block per chunk, groups (L > 4k), boundary ties
        (700, 1, 16, 5, 100, 150, 64),  # key blocks merged, scores in many small slices
        (1203, 4, 8, 0, 32, None, 50),  # ratio 4, group selection, sliced scores
        (300, 1, 40, 3, 300, None, None),
    ],
)  # one chunk, k not a power of 2
@pytest.mark.parametrize("segs", [False, True])
def test_chunked_indexer_topk_selection_paths(
    monkeypatch, use_numpy, mode, t, ratio, k, excl, chunk, key_chunk, head, segs
):
    """Two-level (group) selection, boundary-tie fallback, key-block merge and score slicing, on the numpy
    (CPU) and the torch (other devices) selection: ids exactly those of topk_indices on full scores."""
    import dsv4.kernels.indexer_topk as it

    monkeypatch.setattr(it, "_USE_NUMPY", use_numpy)
    if head is not None:
        monkeypatch.setattr(it, "_HEAD_FLOATS", head)
    g = torch.Generator().manual_seed(t + k + len(mode))
    b, nh, c = 2, 4, 8
    n = t // ratio
    q, w, keys = _indexer_inputs_mode(b, t, n, nh, c, g, mode)
    full, vis = _check_chunked_topk(
        it.chunked_indexer_topk, q, w, keys, k, ratio, excl, chunk, key_chunk, 0.004 if segs else None, g
    )
    if mode == "sparse":  # the k-th score is an exact zero in many rows with k visible entries
        kth = full.masked_fill(~vis, float("-inf")).topk(k, -1).values[..., -1]
        assert (kth == 0).float().mean() > 0.2


def test_chunked_indexer_topk_long_decode_row():
    """One query (decode) against many keys: one block, group selection; = the full-score top-k."""
    g = torch.Generator().manual_seed(9)
    n, k = 20000, 64
    q, w, keys = _indexer_inputs(1, 1, n, 4, 16, g)
    pos = torch.tensor([4 * n + 2])
    want = topk_indices(Indexer.score(q, w, keys), k)
    assert torch.equal(chunked_indexer_topk(q, w, keys, k, pos, 4), want)  # one query: the PyTorch path
    assert torch.equal(chunked_indexer_topk(q, w, keys, k, pos, 4, key_chunk=3000, return_scores=True)[0], want)


# ------------------------------------------------------------------------------- memory check
_MEM_SCRIPT = textwrap.dedent("""
    import torch
    from dsv4.kernels.sparse_attention import sparse_attention
    from dsv4.kernels.indexer_topk import chunked_indexer_topk
    torch.set_num_threads(2)
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    T, H, c, k, win = {T}, 4, 64, 64, 32
    N = T // 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, c, generator=g).requires_grad_()
    kv = torch.randn(1, T, c, generator=g).requires_grad_()
    ent = torch.randn(1, N, c, generator=g).requires_grad_()
    sink = torch.zeros(H).requires_grad_()
    qi, wi = torch.randn(1, T, 4, 32, generator=g), torch.randn(1, T, 4, generator=g)
    ki = torch.randn(1, N, 32, generator=g)
    pos = torch.arange(T)
    # warm up the allocator / kernels on a small problem, then measure the big one
    sparse_attention(q[:, :256], kv[:, :256], sink, 0.125, win, pos[:256], pos[:256], ent[:, :64],
                     torch.zeros(1, 256, k, dtype=torch.long) - 1).sum().backward()
    q.grad = kv.grad = ent.grad = sink.grad = None
    base = hwm()
    idx = chunked_indexer_topk(qi, wi, ki, k, pos, 4)
    o = sparse_attention(q, kv, sink, 0.125, win, pos, pos, ent, idx)
    (o * o).sum().backward()
    print(hwm() - base, (idx >= 0).sum().item())
""")


def _peak_growth(t: int) -> int:
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT.format(T=t)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    growth, n_sel = map(int, res.stdout.split())
    assert n_sel > 0
    return growth


def test_memory_stays_sparse_16k():
    """T = 16384, N = T/4, k = 64, window 32, c 64, H 4: indexer top-k + sparse fwd+bwd peak RSS growth
    (VmHWM, fresh process) is well below ONE [T, N] fp32 score matrix (256 MiB; the dense reference needs
    H x T x (T + N) fp32 logits = 5 GiB), and it grows linearly in T (x4 tokens -> < x6 memory; a
    T x N term would give x16)."""
    small, big = _peak_growth(4096), _peak_growth(16384)
    dense_scores = 16384 * 4096 * 4
    assert big < dense_scores / 2, (big, dense_scores)
    assert big < 6 * small, (small, big)


@pytest.mark.slow
def test_memory_stays_sparse_64k():
    t = 65536
    growth = _peak_growth(t)
    assert growth < t * (t // 4) * 4 / 8, growth  # [T, N] fp32 = 4 GiB


def test_indexer_selected_scores_and_kl():
    """Selected-slot scores (checkpointed chunks) = full scores gathered, grads too; the KL restricted to
    the selected set is the same number as indexer_kl on [B,T,N] with the selection mask."""
    from dsv4.kernels.indexer_topk import indexer_selected_scores
    from dsv4.model.indexer import indexer_kl

    g = torch.Generator().manual_seed(11)
    b, t, ratio, k, nh, c = 2, 70, 4, 6, 4, 8
    n = t // ratio
    q, w, keys = (x.requires_grad_() for x in _indexer_inputs(b, t, n, nh, c, g))
    pos = torch.arange(t)
    idx = chunked_indexer_topk(q, w, keys, k, pos, ratio)
    mass = torch.rand(b, t, n, generator=g)
    full = Indexer.score(q, w, keys)
    sel = indexer_selected_scores(q, w, keys, idx, chunk=16)
    torch.testing.assert_close(sel, torch.where(idx >= 0, full.gather(-1, idx.clamp_min(0)), 0.0))
    l1 = indexer_kl(full, mass, selection_mask(idx, n))
    l2 = indexer_kl(sel, torch.where(idx >= 0, mass.gather(-1, idx.clamp_min(0)), 0.0), idx >= 0)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    g1, g2 = torch.autograd.grad(l1, [q, w, keys]), torch.autograd.grad(l2, [q, w, keys])
    for a, bb in zip(g2, g1):
        torch.testing.assert_close(a, bb, rtol=1e-5, atol=1e-6)
