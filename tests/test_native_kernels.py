"""The C++ inference kernels (dsv4.kernels.native) equal their PyTorch twins: the fused indexer top-k
picks exactly the same ids (ascending order instead of by score), and the fused attention forward gives
the same output, for every layer kind, cached-chunk positions, padding and ties."""

import pytest
import torch

import dsv4.kernels.indexer_topk as it
import dsv4.kernels.sparse_attention as sa
from dsv4.kernels import native


def test_extension_builds():
    assert native.ext() is not None, "the C++ kernels did not build (gcc and ninja are needed)"


def _inputs(b, t, n, nh, c, g, mode):
    if mode == "ties":  # small integers: exact arithmetic, many exact ReLU-zero and equal-score ties
        return (
            torch.randint(-2, 2, (b, t, nh, c), generator=g).float(),
            torch.randint(-1, 3, (b, t, nh), generator=g).float(),
            torch.randint(-1, 2, (b, n, c), generator=g).float(),
        )
    if mode == "sparse":  # mostly exact zeros: many rows have fewer than k positive scores
        return (
            torch.randn(b, t, nh, c, generator=g) - 1.0,
            torch.rand(b, t, nh, generator=g),
            torch.rand(b, n, c, generator=g),
        )
    return torch.randn(b, t, nh, c, generator=g), torch.randn(b, t, nh, generator=g), torch.randn(b, n, c, generator=g)


def _ascending(idx):
    """ids in ascending position, -1 padding last (the C++ kernel's order)."""
    big = torch.iinfo(torch.long).max
    s = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(s == big, -1, s)


@pytest.mark.parametrize("mode", ["rand", "ties", "sparse"])
@pytest.mark.parametrize(
    "t,ratio,k,excl,nh,c,start",
    [
        (203, 4, 8, 0, 4, 8, 0),
        (301, 1, 16, 16, 4, 32, 0),
        (150, 4, 64, 0, 3, 20, 0),  # k > visible: -1 pads
        (97, 1, 40, 8, 16, 16, 500),
        (9, 4, 5, 0, 4, 8, 77),
    ],
)  # cached chunks
def test_native_indexer_topk_equals_twin(monkeypatch, mode, t, ratio, k, excl, nh, c, start):
    monkeypatch.setattr(it, "NATIVE_MIN_QUERIES", 1)
    g = torch.Generator().manual_seed(t + k + len(mode))
    n = (start + t) // ratio
    q, w, keys = _inputs(2, t, n, nh, c, g, mode)
    pos = start + torch.arange(t)
    got = it.chunked_indexer_topk(q, w, keys, k, pos, ratio, excl)
    monkeypatch.setattr(it, "USE_NATIVE", False)
    want = it.chunked_indexer_topk(q, w, keys, k, pos, ratio, excl, chunk=16)
    assert torch.equal(got, _ascending(want))
    assert (got >= 0).any() and (want < 0).sum() == (got < 0).sum()


def _attention_case(kind, t, start, g, c=24):
    b, h, win = 2, 4, 8
    s = start + t
    q = torch.randn(b, t, h, c, generator=g)
    kv = torch.randn(b, s, c, generator=g)
    sink = torch.randn(h, generator=g)
    if kind == "v32":  # V3.2's DSA layer: no window, a sink whose exp is 0 (dsv4.model.mla)
        kind, win, sink = "dsa", 0, torch.full((h,), -1e30)
    q_pos, kv_pos = start + torch.arange(t), torch.arange(s)
    if kind == "swa":
        return lambda: sa.window_attention(q, kv, sink, 0.2, win, q_pos, kv_pos)
    if kind == "hca":
        ent = torch.randn(b, s // 4, c, generator=g)
        return lambda: sa.dense_entries_attention(q, kv, sink, 0.2, win, q_pos, kv_pos, ent, ratio=4)
    n = s if kind == "dsa" else s // 4
    ent = kv if kind == "dsa" else torch.randn(b, n, c, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(n, generator=g)[:6] for _ in range(t)]) for _ in range(b)])
    idx[:, : t // 3, 4:] = -1
    return lambda: sa.sparse_attention(q, kv, sink, 0.2, win, q_pos, kv_pos, ent, idx)


@pytest.mark.parametrize("kind", ["swa", "hca", "csa", "dsa", "v32"])
@pytest.mark.parametrize("t,start", [(37, 0), (5, 60), (1, 33)])
@pytest.mark.parametrize("c", [24, 64, 80])  # scalar path; register blocks of 64; 64 + a 16-dim tail
def test_native_attention_equals_twin(monkeypatch, kind, t, start, c):
    fn = _attention_case(kind, t, start, torch.Generator().manual_seed(t + start), c)
    with torch.no_grad():
        got = fn()
        monkeypatch.setattr(sa, "USE_NATIVE", False)
        want = fn()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_native_not_used_with_autograd():
    q = torch.randn(1, 10, 2, 8, requires_grad=True)
    kv = torch.randn(1, 10, 8)
    o = sa.window_attention(q, kv, torch.zeros(2), 0.3, 4, torch.arange(10), torch.arange(10))
    o.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_inference_query_chunks_change_nothing(monkeypatch):
    """Attention.sparse_core runs inference in query chunks (indexer + attention per chunk): same output."""
    from conftest import every_kind_model

    import dsv4.model.attention as att

    model = every_kind_model()
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setattr(att, "INFER_CHUNK", 16)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_topk_eager_equals_static():
    """The eager decode selection (float topk + boundary-tie fallback) picks the same set as topk_static."""
    from dsv4.kernels.topk import topk_eager, topk_static

    g = torch.Generator().manual_seed(0)
    for scores in (torch.randn(3, 500, generator=g), torch.randint(0, 3, (3, 500), generator=g).float()):
        vis = torch.arange(500)[None] < torch.tensor([[500], [300], [40]])
        for k in (16, 64):
            a_i, a_v = topk_eager(scores, k, vis)
            b_i, b_v = topk_static(scores, k, vis)
            ka = [sorted(r[m].tolist()) for r, m in zip(a_i, a_v)]
            kb = [sorted(r[m].tolist()) for r, m in zip(b_i, b_v)]
            assert ka == kb


def _chosen(ids, valid):
    return [sorted(r[m].tolist()) for r, m in zip(ids, valid)]


@pytest.mark.parametrize("mode", ["rand", "ties", "sparse"])
@pytest.mark.parametrize("nh,c,k", [(4, 32, 16), (3, 20, 8), (8, 64, 40)])
def test_native_decode_indexer_topk_equals_twin(monkeypatch, mode, nh, c, k):
    """The decode indexer (one query per row, keys read in place from a store prefix) selects the set of
    the reference (decode_scores + topk_eager), for rows with more, fewer and no visible entries."""
    g = torch.Generator().manual_seed(nh + c + k + len(mode))
    q, w, store = _inputs(4, 1, 700, nh, c, g, mode)
    q, w = q[:, 0], w[:, 0]
    keys = store[:, :600]  # a prefix view of a larger store: rows are 700 * c floats apart
    limit = torch.tensor([600, 257, k - 3, 0])
    got = it.decode_indexer_topk(q, w, keys, limit, k)
    monkeypatch.setattr(it, "USE_NATIVE", False)
    want = it.decode_indexer_topk(q, w, keys, limit, k)
    assert got[0].shape == want[0].shape == (4, k)
    assert _chosen(*got) == _chosen(*want)
    assert [len(r) for r in _chosen(*got)] == [k, k, k - 3, 0]


@pytest.mark.parametrize("h,c", [(4, 64), (3, 24), (8, 128), (4, 80)])
def test_native_decode_attention_equals_twin(monkeypatch, h, c):
    """decode_attention's C++ path (partial softmax statistics per part, merged with the sink) equals the
    reference, with a long part, a short one, an empty one and a row with no valid key in a part."""
    import dsv4.kernels.decode_attention as da

    g = torch.Generator().manual_seed(h * c)
    b = 3
    q = torch.randn(b, h, c, generator=g)
    long_keys = torch.randn(b, 3000, c, generator=g)[:, :2500]  # a store prefix (strided rows)
    long_valid = torch.rand(b, 2500, generator=g) > 0.2
    long_valid[1] = False
    win = torch.randn(b, 35, c, generator=g)
    parts = [(win, torch.rand(b, 35, generator=g) > 0.5), (long_keys, long_valid), (win[:, :0], long_valid[:, :0])]
    sink = torch.randn(h, generator=g)
    with torch.no_grad():
        got = da.decode_attention(q, parts, sink, c**-0.5)
        want = da.decode_attention_reference(q, parts, sink, c**-0.5)
        monkeypatch.setattr(da, "NATIVE_MIN_KEYS", 10**9)
        assert torch.equal(da.decode_attention(q, parts, sink, c**-0.5), want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,out,inp", [(1, 40, 64), (5, 33, 96), (19, 16, 32)])
def test_native_mxfp4_linear_equals_dequantise_then_linear(n, out, inp):
    """x W^T straight from the MXFP4 codes equals dequant_mxfp4 + F.linear (its twin), for every byte value,
    several rows of x (more than one register pass of 16) and scales from 2^-20 to 2^4."""
    from dsv4.quant.execution import MXFP4Matrix

    g = torch.Generator().manual_seed(n * out)
    packed = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8, generator=g)
    packed.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scale = torch.randint(107, 132, (out, inp // 32), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
    x = torch.randn(n, inp, generator=g)
    m = MXFP4Matrix(packed, scale, torch.float32)
    with torch.no_grad():
        got, want = m.linear(x), m.linear_reference(x)
        assert torch.equal(m.linear(x[None])[0], got)  # leading dims are kept
    # the sums differ in order only: compare against the size of the terms (outputs can cancel to ~0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
