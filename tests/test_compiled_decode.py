"""The compiled decode step (dsv4.infer.compiled) equals the eager step and the full forward: every layer
kind, rows at different lengths, across a store growth (a new shape bucket)."""

import unittest.mock

import torch
from conftest import every_kind_model

from dsv4.infer.cache import ModelCache
from dsv4.infer.compiled import CompiledDecoder


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_compiled_decode_equals_eager_and_full_forward():
    model = every_kind_model()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    lens = [27, 36]
    with torch.no_grad():
        full = model(ids).logits
        eager, comp = (ModelCache(model, batch=2, capacity=48, page=16) for _ in range(2))
        for cache in (eager, comp):
            for r, n in enumerate(lens):
                model(ids[r : r + 1, :n], cache=cache, rows=[r])
        dec = CompiledDecoder(model)
        for s in range(14):  # the DSA raw store grows from 48 to 96 positions on the way: two buckets
            tok = torch.stack([ids[r, n + s] for r, n in enumerate(lens)])[:, None]
            le = model(tok, cache=eager, last_only=True).logits[:, -1]
            lc = dec(tok, comp)
            assert rel(lc, le) < 1e-5
            for r, n in enumerate(lens):
                assert rel(lc[r], full[r, n + s]) < 1e-5
    assert comp.lengths.tolist() == eager.lengths.tolist() == [n + 14 for n in lens]
    assert len(dec.compile_seconds) == 2


def test_static_moe_paths_equal_the_loop():
    from dsv4.model.moe import Experts

    g = torch.Generator().manual_seed(0)
    ex = Experts(8, 16, 24, 10.0)
    for p in ex.parameters():
        p.data.normal_(0, 0.3, generator=g)
    for n_tok, compiling in ((1, False), (3, False), (7, False), (7, True)):
        # gathered (N k <= E, or under torch.compile whatever N) and every-expert paths
        x = torch.randn(n_tok, 16, generator=g)
        idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n_tok)])
        w = torch.rand(n_tok, 2, generator=g)
        with unittest.mock.patch.object(torch.compiler, "is_compiling", return_value=compiling):
            y = ex.forward_static(x, idx, w)
        torch.testing.assert_close(y, ex.forward_reference(x, idx, w), rtol=1e-5, atol=1e-6)


def test_few_rows_products_equal_matmul():
    """The decompositions the CPU backend uses for products of few rows or columns (both loop orders)."""
    from dsv4.kernels import inductor as compiled

    g = torch.Generator().manual_seed(0)
    w_big = torch.randn(2048, 256, generator=g)  # 2 MiB > LARGE_WEIGHT: outputs-first when M > 1
    w_small = torch.randn(64, 32, generator=g)
    for m in (1, 2, 8):
        for w in (w_big, w_small):
            a = torch.randn(m, w.shape[1], generator=g)
            torch.testing.assert_close(compiled._mm(a, w.t()), a @ w.t(), rtol=1e-5, atol=1e-4)
            c = torch.randn(w.shape[0], generator=g)
            torch.testing.assert_close(
                compiled._addmm(c, a, w.t(), beta=0.5, alpha=2.0),
                torch.addmm(c, a, w.t(), beta=0.5, alpha=2.0),
                rtol=1e-5,
                atol=1e-4,
            )
        a, b = torch.randn(3, m, 40, generator=g), torch.randn(3, 40, 24, generator=g)
        torch.testing.assert_close(compiled._bmm(a, b), a @ b, rtol=1e-5, atol=1e-4)
    keys, q = torch.randn(300, 32, generator=g), torch.randn(32, 4, generator=g)  # few columns
    torch.testing.assert_close(compiled._mm(keys, q), keys @ q, rtol=1e-5, atol=1e-4)
    n = compiled.SMALL_ROWS + 1
    assert compiled._mm(torch.randn(n, 8), torch.randn(8, n)) is NotImplemented  # a real GEMM: BLAS
