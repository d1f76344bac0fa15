"""Cached inference equals the full forward: chunked prefill, token-by-token decode, mixed-length batches,
rollback; the decode kernel equals the sparse kernels; bad use gets clear errors."""

import pytest
import torch
from conftest import every_kind_model

from dsv4.infer.cache import CacheError, ModelCache
from dsv4.kernels.decode_attention import decode_attention
from dsv4.kernels.sparse_attention import dense_entries_attention, sparse_attention

T = 90


@pytest.fixture(scope="module")
def model():
    return every_kind_model()  # HCA m=8: 11 blocks in T = 90


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_chunks(model, ids, chunks, **kw):
    cache = ModelCache(model, batch=ids.shape[0], capacity=16, page=16, **kw)
    outs, p = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, p : p + n], cache=cache).logits)
            p += n
    assert int(cache.lengths[0]) == p
    return torch.cat(outs, 1)


@pytest.mark.parametrize("chunks", [[T], [1] * T, [13, 1, 7, 20, 3, 46], [3, 4, 5, 1, 1, 76], [40, 1, 1, 48]])
def test_chunked_prefill_and_decode_equal_full_forward(model, ids, full, chunks):
    assert rel(run_chunks(model, ids, chunks), full) < 1e-5


def test_mixed_length_decode_batch(model, ids, full):
    cache = ModelCache(model, batch=3, capacity=16, page=16)
    with torch.no_grad():
        model(ids[0:1, :30], cache=cache, rows=[0])
        model(ids[1:2, :41], cache=cache, rows=[2])  # row 1 stays empty
        for s in range(25):
            tok = torch.stack([ids[0, 30 + s], ids[1, 41 + s]])[:, None]
            o = model(tok, cache=cache, rows=[0, 2]).logits[:, 0]
            assert rel(o[0], full[0, 30 + s]) < 1e-5 and rel(o[1], full[1, 41 + s]) < 1e-5
    assert cache.lengths.tolist() == [55, 0, 66]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_rollback_then_continue(model, ids, full, n):
    cache = ModelCache(model, batch=2, capacity=16, page=16)
    junk = torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids[:, :33], cache=cache)
        model(junk, cache=cache)  # e.g. rejected speculative tokens (33 + n crosses blocks)
        cache.rollback(None, n)
        o = model(ids[:, 33:60], cache=cache).logits
    assert rel(o, full[:, 33:60]) < 1e-5


def test_cache_bug_would_be_caught(model, ids, full):
    """The equality tests can fail: a cache that loses the compressor's previous block differs."""
    cache = ModelCache(model, batch=2, capacity=16, page=16)
    with torch.no_grad():
        model(ids[:, :41], cache=cache)
        for lc in cache.layers:
            if lc.kind == "csa":
                lc.comp.kv.data.zero_()
        o = model(ids[:, 41:50], cache=cache).logits
    assert rel(o, full[:, 41:50]) > 1e-3


@pytest.mark.parametrize("dtype,mean_bound,max_bound", [(torch.bfloat16, 0.03, 0.3), ("fp8", 0.08, 0.5)])
def test_low_precision_cache_deviation_bounded(model, ids, full, dtype, mean_bound, max_bound):
    """Rounded kv / entries / indexer keys: not exact. Per position, the max |logit error| / max |logit|
    averages ~1% for bf16 here; a few positions reach ~15% where a rounded indexer key flips a top-k
    choice (a bf16 copy of the whole model deviates 24% on the same input)."""
    got = run_chunks(model, ids, [50] + [1] * 40, dtype=dtype)
    err = (got - full).abs().amax(-1) / full.abs().max()
    assert 1e-6 < err.mean().item() < mean_bound and err.max().item() < max_bound


def test_decode_kernel_equals_sparse_kernels():
    g = torch.Generator().manual_seed(0)
    b, h, c, s, n, k, win = 3, 4, 16, 40, 12, 5, 8
    q = torch.randn(b, 1, h, c, generator=g, dtype=torch.float64)
    kv = torch.randn(b, s, c, generator=g, dtype=torch.float64)
    ent = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    sink = torch.randn(h, generator=g, dtype=torch.float64)
    q_pos, kv_pos = torch.tensor([s - 1]), torch.arange(s)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])[:, None]
    idx[0, 0, -2:] = -1
    ref = sparse_attention(q, kv, sink, 0.25, win, q_pos, kv_pos, ent, idx)[:, 0]
    win_part = (kv[:, -win:], torch.ones(b, win, dtype=torch.bool))
    got = decode_attention(
        q[:, 0], [win_part, (ent[torch.arange(b)[:, None], idx[:, 0].clamp_min(0)], idx[:, 0] >= 0)], sink, 0.25
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    ref = dense_entries_attention(q, kv, sink, 0.25, win, q_pos, kv_pos, ent, ratio=4)[:, 0]  # 10 visible
    got = decode_attention(q[:, 0], [win_part, (ent, (torch.arange(n) < s // 4).expand(b, n))], sink, 0.25)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_store_grows_in_pages(model, ids):
    cache = ModelCache(model, batch=2, capacity=16, page=16)
    dsa = next(lc for lc in cache.layers if lc.kind == "dsa")
    assert dsa.raw.data.shape[1] == 16
    with torch.no_grad():
        model(ids[:, :40], cache=cache)
    assert dsa.raw.data.shape[1] == 48 and cache.nbytes() > 0


def test_cache_errors(model, ids):
    cache = ModelCache(model, batch=2, capacity=16, page=16)
    with torch.no_grad():
        model(ids[:1, :5], cache=cache, rows=[0])
        with pytest.raises(CacheError, match="one length"):
            model(ids[:, :3], cache=cache)
        with pytest.raises(CacheError, match=r"rows must be in \[0, 2\)"):
            model(ids[:1, :3], cache=cache, rows=[2])
        with pytest.raises(ValueError, match="2 rows but 1 cache rows"):
            model(ids[:, :3], cache=cache, rows=[0])
        with pytest.raises(CacheError, match="at most 4"):
            cache.rollback([0], 5)
        with pytest.raises(ValueError, match="no segment_ids"):
            model(ids[:1, :3], cache=cache, rows=[0], return_mtp=True)
        small = ModelCache(model, batch=1)
        small.lengths[0] = model.cfg.max_position_embeddings - 2
        with pytest.raises(CacheError, match="max_position_embeddings"):
            model(ids[:1, :3], cache=small)
    with pytest.raises(CacheError, match="batch must be >= 1"):
        ModelCache(model, batch=0)
