"""dsv4.memory: row stores, hot-row cache, prefetcher, sparse row Adam, chunked checkpoints."""

import json
import time

import numpy as np
import pytest
import torch

from dsv4.memory import (
    HotRowCache,
    MmapStore,
    Prefetcher,
    RamStore,
    RowStore,
    SparseRowAdam,
    coalesce_rows,
    init_rows,
    load_store,
    save_store,
)
from dsv4.memory.stores import INIT_CHUNK_ROWS

N, D = 3 * INIT_CHUNK_ROWS + 123, 8


def _pair(tmp_path, n=N, d=D, std=0.02, seed=7):
    return RamStore(n, d, std, seed), MmapStore.create(tmp_path / "t.npy", n, d, std, seed, chunk_rows=5000)


def test_ram_and_mmap_init_bitwise_equal(tmp_path):
    ram, mm = _pair(tmp_path)
    assert torch.equal(ram.data, torch.from_numpy(np.asarray(mm.mm)))
    rows = torch.randint(0, N, (2000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ram.read(rows), mm.read(rows))
    # any sub-range computes the same values; another seed differs; std 0 is zeros
    assert torch.equal(init_rows(N, D, 0.02, 7, 100, INIT_CHUNK_ROWS + 50), ram.data[100 : INIT_CHUNK_ROWS + 50])
    assert not torch.equal(RamStore(N, D, 0.02, 8).data, ram.data)
    assert float(ram.data.std()) == pytest.approx(0.02, rel=0.05)
    assert RamStore(10, 3).data.abs().sum() == 0
    # reopen read-only sees the same bits and refuses writes
    ro = MmapStore.open(tmp_path / "t.npy", "r")
    assert torch.equal(ro.read(rows), ram.read(rows))
    with pytest.raises(PermissionError):
        ro.write(torch.tensor([0]), torch.zeros(1, D))


def test_ram_and_mmap_stay_equal_under_adam(tmp_path):
    ram, mm = _pair(tmp_path)
    o_ram = SparseRowAdam(ram, lr=5e-3)
    o_mm = SparseRowAdam(mm, lr=5e-3, state_dir=tmp_path / "state")
    assert isinstance(o_mm.state["exp_avg"], MmapStore)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # overlapping random row sets -> rows with different step counts
        rows = torch.unique(torch.randint(0, 3000, (800,), generator=g))
        grads = torch.randn(rows.numel(), D, generator=g)
        o_ram.step(rows, grads)
        o_mm.step(rows, grads)
    probe = torch.arange(0, 3000)
    assert torch.equal(ram.read(probe), mm.read(probe))
    for k in SparseRowAdam.STATE_NAMES:
        assert torch.equal(o_ram.state[k].read(probe), o_mm.state[k].read(probe))
    o_mm.flush()
    again = MmapStore.open(tmp_path / "t.npy")
    assert torch.equal(again.read(probe), ram.read(probe))
    # state files are reopened by a new optimizer
    o2 = SparseRowAdam(again, lr=5e-3, state_dir=tmp_path / "state")
    assert torch.equal(o2.state["step"].read(probe), o_ram.state["step"].read(probe))


def test_sparse_adam_equals_dense_adam_all_touched():
    torch.manual_seed(0)
    table = torch.randn(500, D)
    rows = torch.tensor(sorted(np.random.default_rng(0).choice(500, 60, replace=False).tolist()))
    store = RamStore.from_tensor(table.clone())
    opt = SparseRowAdam(store, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    dense = torch.nn.Parameter(table[rows].clone())
    ref = torch.optim.Adam([dense], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, foreach=False)
    for _ in range(5):
        g = torch.randn(rows.numel(), D)
        opt.step(rows, g)
        dense.grad = g.clone()
        ref.step()
    assert torch.equal(store.read(rows), dense.detach())
    assert torch.equal(opt.state["exp_avg"].read(rows), ref.state[dense]["exp_avg"])
    assert torch.equal(opt.state["exp_avg_sq"].read(rows), ref.state[dense]["exp_avg_sq"])
    others = torch.ones(500, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(store.data[others], table[others])


def test_sparse_adam_lazy_semantics():
    torch.manual_seed(1)
    table = torch.randn(40, D)
    store = RamStore.from_tensor(table.clone())
    opt = SparseRowAdam(store, lr=3e-2)
    # row 5 every step; row 9 at steps 0 and 3 only; row 20 never
    plan = [[5, 9], [5], [5], [5, 9]]
    grads = {r: [] for r in (5, 9)}
    for step_rows in plan:
        rows = torch.tensor(step_rows)
        g = torch.randn(len(step_rows), D)
        for r, gr in zip(step_rows, g):
            grads[r].append(gr)
        m_before = opt.state["exp_avg"].read(torch.tensor([20]))
        opt.step(rows, g)
        assert torch.equal(opt.state["exp_avg"].read(torch.tensor([20])), m_before)
    assert torch.equal(store.read(torch.tensor([20])), table[20:21])
    assert opt.state["exp_avg_sq"].read(torch.tensor([20])).abs().sum() == 0
    assert opt.state["step"].read(torch.tensor([5, 9, 20])).reshape(-1).tolist() == [4.0, 2.0, 0.0]
    for r in (5, 9):  # each row = dense Adam fed only the gradients of the steps that touched it
        p = torch.nn.Parameter(table[r : r + 1].clone())
        ref = torch.optim.Adam([p], lr=3e-2, foreach=False)
        for gr in grads[r]:
            p.grad = gr[None].clone()
            ref.step()
        torch.testing.assert_close(store.read(torch.tensor([r])), p.detach(), rtol=0, atol=1e-6)


def test_coalesce_rows():
    rows, g = coalesce_rows(torch.tensor([3, 1, 3]), torch.tensor([[1.0], [2.0], [4.0]]))
    assert rows.tolist() == [1, 3] and g.reshape(-1).tolist() == [2.0, 5.0]


def test_hot_row_cache(tmp_path):
    ram, mm = _pair(tmp_path, n=20000)
    cache = HotRowCache(mm, capacity_rows=2000)
    z = np.random.default_rng(0).zipf(1.1, 200_000)
    z = (z[z <= 20000] - 1)[:100_000]
    for i in range(0, z.size, 500):
        rows = torch.from_numpy(z[i : i + 500])
        assert torch.equal(cache.read(rows), ram.read(rows))
    assert cache.hit_rate > 0.5
    assert cache.store_rows_read < z.size / 2
    # one call bigger than the cache still returns the right values
    big = torch.randint(0, 20000, (30000,))
    assert torch.equal(cache.read(big), ram.read(big))
    # write-through: cached and uncached rows visible through the cache and the store
    hot = torch.from_numpy(np.unique(z[:50]))
    cold = torch.tensor([19999, 19998])
    rows = torch.cat([hot, cold])
    vals = torch.randn(rows.numel(), cache.dim)
    cache.write(rows, vals)
    assert torch.equal(cache.read(rows), vals)
    assert torch.equal(mm.read(rows), vals)


def test_hot_row_cache_clock_bookkeeping():
    """After many calls with evictions, every cached row maps to a distinct slot holding its value, the
    cache never exceeds its capacity, and a call larger than the capacity still returns right values."""
    store = RamStore(5000, D, 0.1, 1)
    cache = HotRowCache(store, capacity_rows=300)
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        rows = torch.randint(0, 400 if i % 3 else 5000, (int(torch.randint(1, 700, (1,), generator=g)),), generator=g)
        assert torch.equal(cache.read(rows), store.read(rows))
        assert len(cache.where) <= cache.capacity
        slots = np.array(list(cache.where.values()))
        assert np.unique(slots).size == slots.size
        held = torch.tensor(list(cache.where))
        assert torch.equal(torch.from_numpy(cache.slots[slots]), store.read(held))
        assert (cache.slot_row[slots] == held.numpy()).all()
    assert 0.2 < cache.hit_rate < 1
    hot = torch.arange(20)  # rows hit again and again survive a stream of one-off rows
    for i in range(30):
        cache.read(hot)
        cache.read(torch.arange(1000 + 50 * i, 1050 + 50 * i))
    assert all(int(r) in cache.where for r in hot)


def test_mmap_will_need_and_background_read(tmp_path):
    ram, mm = _pair(tmp_path)
    rows = torch.tensor([0, 1, 5, N - 1, 4096, 4097, 77])
    mm.will_need(rows)
    mm.will_need(torch.tensor([], dtype=torch.long))
    HotRowCache(mm, 4).will_need(rows)
    assert torch.equal(mm.read(rows), ram.read(rows))
    # the background (pread) read sees the same bits, also right after writes through the mapping
    dup = torch.tensor([9, 3, 9, N - 1, 3])
    mm.write(torch.tensor([3, N - 1]), torch.full((2, D), 1.5))
    ram.write(torch.tensor([3, N - 1]), torch.full((2, D), 1.5))
    assert torch.equal(mm.read_background(dup), ram.read(dup))
    assert torch.equal(HotRowCache(mm, 2).read_background(dup), ram.read(dup))
    with pytest.raises((IndexError, ValueError)):
        mm.will_need(torch.tensor([N]))
    mm.close()


def test_cache_under_adam_matches_plain_store():
    a, b = RamStore(1000, D, 0.1, 3), RamStore(1000, D, 0.1, 3)
    cached = HotRowCache(b, 100)
    oa, ob = SparseRowAdam(a, lr=1e-2), SparseRowAdam(cached, lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        rows = torch.unique(torch.randint(0, 300, (120,), generator=g))
        gr = torch.randn(rows.numel(), D, generator=g)
        oa.step(rows, gr)
        ob.step(rows, gr)
    assert torch.equal(a.data, b.data)
    assert torch.equal(cached.read(torch.arange(1000)), a.data)


class _SlowStore(RowStore):
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
        self.n_rows, self.dim = inner.n_rows, inner.dim

    def read(self, rows):  # values taken first, returned late: a write meanwhile is not seen
        out = self.inner.read(rows)
        time.sleep(self.delay)
        return out

    def write(self, rows, values):
        self.inner.write(rows, values)


def test_prefetcher_values_and_overlap(tmp_path):
    ram, mm = _pair(tmp_path, n=20000)
    rows = torch.randint(0, 20000, (10000,))
    with Prefetcher(mm, workers=2) as pf:
        assert torch.equal(pf.get(pf.prefetch(rows)), ram.read(rows))
    slow = _SlowStore(ram, 0.3)
    with Prefetcher(slow) as pf:
        t0 = time.perf_counter()
        h = pf.prefetch(rows)
        time.sleep(0.6)  # "compute" while the read runs
        out = pf.get(h)
        elapsed = time.perf_counter() - t0
    assert torch.equal(out, ram.read(rows))
    assert elapsed < 0.85  # serial would be 0.9
    assert pf.stats["wait_s"] < 0.25 and pf.stats["gets"] == 1


def test_prefetcher_sees_writes_made_after_prefetch():
    ram = RamStore(1000, D, 0.1, 0)
    slow = _SlowStore(ram, 0.2)
    with Prefetcher(slow) as pf:
        h = pf.prefetch(torch.tensor([1, 2, 3, 2]))
        time.sleep(0.05)  # the worker has taken the old values
        opt = SparseRowAdam(pf, lr=0.1)  # optimizer writes routed through the prefetcher
        opt.step(torch.tensor([2, 500]), torch.ones(2, D))
        out = pf.get(h)
    assert torch.equal(out, ram.read(torch.tensor([1, 2, 3, 2])))
    assert not torch.equal(out[1], RamStore(1000, D, 0.1, 0).data[2])  # row 2 did change


@pytest.mark.parametrize("kind", ["ram", "mmap"])
def test_checkpoint_roundtrip(tmp_path, kind):
    n = 2500
    if kind == "ram":
        src, dst = RamStore(n, D, 0.05, 1), RamStore(n, D)
    else:
        src = MmapStore.create(tmp_path / "src.npy", n, D, 0.05, 1)
        dst = MmapStore.create(tmp_path / "dst.npy", n, D)
    opt = SparseRowAdam(src, lr=1e-2, state_dir=None if kind == "ram" else tmp_path / "s1")
    opt.step(torch.arange(0, n, 3), torch.randn(len(range(0, n, 3)), D))
    ck = save_store(src, tmp_path / "ck", chunk_rows=1000, states=opt)
    index = json.loads((ck / "index.json").read_text())
    assert len(index["stores"]["table"]["files"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]  # temp dir renamed away
    opt2 = SparseRowAdam(dst, lr=1e-2, state_dir=None if kind == "ram" else tmp_path / "s2")
    load_store(ck, into=dst, states=opt2)
    all_rows = torch.arange(n)
    assert torch.equal(dst.read(all_rows), src.read(all_rows))
    for k in SparseRowAdam.STATE_NAMES:
        assert torch.equal(opt2.state[k].read(all_rows), opt.state[k].read(all_rows))
    assert torch.equal(load_store(ck).read(all_rows), src.read(all_rows))  # into=None -> RamStore
    save_store(src, ck, chunk_rows=700)  # overwrite an existing checkpoint
    assert len(json.loads((ck / "index.json").read_text())["stores"]["table"]["files"]) == 4


def test_checkpoint_errors(tmp_path):
    src = RamStore(2500, D, 0.05, 1)
    ck = save_store(src, tmp_path / "ck", chunk_rows=1000)
    with pytest.raises(ValueError, match="shape"):
        load_store(ck, into=RamStore(2500, D + 1))
    with pytest.raises(ValueError, match="shape"):
        load_store(ck, into=RamStore(2400, D))
    f = ck / "table-00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"table-00001\.safetensors"):
        load_store(ck, into=RamStore(2500, D))
    f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"table-00001\.safetensors"):
        load_store(ck, into=RamStore(2500, D))
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"table-00001\.safetensors"):
        load_store(ck, into=RamStore(2500, D))
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        load_store(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["ram", "mmap", "cache"])
def test_bad_input(tmp_path, kind):
    store = RamStore(100, D)
    if kind == "mmap":
        store = MmapStore.create(tmp_path / "b.npy", 100, D)
    elif kind == "cache":
        store = HotRowCache(store, 10)
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        store.read(torch.tensor([0, 100]))
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        store.read(torch.tensor([-1]))
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        store.write(torch.tensor([100]), torch.zeros(1, D))
    with pytest.raises(ValueError, match="shape"):
        store.write(torch.tensor([1, 2]), torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="unique"):
        store.write(torch.tensor([1, 1]), torch.zeros(2, D))
    with pytest.raises(ValueError, match="integer"):
        store.read(torch.tensor([1.0]))
    assert store.read(torch.tensor([], dtype=torch.long)).shape == (0, D)
    opt = SparseRowAdam(store, lr=1e-3, state_dir=tmp_path / "st")
    with pytest.raises(ValueError, match="shape"):
        opt.step(torch.tensor([1]), torch.zeros(1, D - 1))
