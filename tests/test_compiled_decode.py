"""The compiled decode step (dsv4.infer.compiled) equals the eager step and the full forward: every layer
kind, rows at different lengths, across a store growth (a new shape bucket)."""
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
                model(ids[r:r + 1, :n], cache=cache, rows=[r])
        dec = CompiledDecoder(model)
        for s in range(14):   # the DSA raw store grows from 48 to 96 positions on the way: two buckets
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
    for n_tok in (1, 3, 7):   # gathered (N k <= E) and every-expert paths
        x = torch.randn(n_tok, 16, generator=g)
        idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n_tok)])
        w = torch.rand(n_tok, 2, generator=g)
        torch.testing.assert_close(ex.forward_static(x, idx, w), ex.forward_reference(x, idx, w), rtol=1e-5, atol=1e-6)
