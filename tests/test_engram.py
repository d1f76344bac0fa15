"""Engram (docs/spec.md section 4): canonical ids, n-gram hashing, the module against its loop oracle, gradients
to the table rows, the model wiring (off = baseline) and cached decode."""

import pytest
import torch
from conftest import randomize_, small_config

from dsv4.config import ConfigError
from dsv4.data.canonical import canonical_map, canonical_text, compression_ratio, load_canonical_map, save_canonical_map
from dsv4.memory.stores import RamStore
from dsv4.model.engram import Engram, _is_prime, hash_multipliers, head_primes, ngram_rows

ENG = dict(engram_layer_ids=[1], engram_orders=[2, 3], engram_heads=2, engram_rows_per_head=31, engram_d_mem=32)


def eng_config(**kw):
    return small_config(**{**ENG, **kw})


def perturb_(eng: Engram, seed: int = 0, conv_std: float = 0.5) -> None:
    """Non-trivial norms and conv taps (the conv is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in eng.named_parameters():
            if "norm" in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
        eng.conv_weight.copy_(torch.randn(eng.conv_weight.shape, generator=g) * conv_std)


# ------------------------------------------------------------------------------------------- hashing
def test_hash_by_hand():
    # order 2, two heads, primes 5 and 7 (offsets 0, 5), multipliers 3, 5, pad 9
    ids = torch.tensor([[1, 2, 4]])
    rows = ngram_rows(ids, [2], 2, [5, 7], [3, 5], pad_id=9)
    # t=0: (1*3)^(9*5) = 3^45 = 46 -> 46%5=1, 5+46%7=9; t=1: 6^5=3 -> 3, 8; t=2: 12^10=6 -> 1, 11
    assert rows.tolist() == [[[1, 9], [3, 8], [1, 11]]]
    # order 3 adds x_{t-2} * m_2: t=2: 12^10^(1*11) = 6^11 = 13 -> 13%5=3, 13%7=6
    rows3 = ngram_rows(ids, [3], 1, [5], [3, 5, 11], pad_id=9)
    assert rows3[0, 2, 0].item() == 3
    # a segment boundary at t=2 makes x_{t-1} the pad: (4*3)^(9*5) = 12^45 = 33 -> 3, 5+5=10
    seg = torch.tensor([[0, 0, 1]])
    assert ngram_rows(ids, [2], 2, [5, 7], [3, 5], 9, segment_ids=seg)[0, 2].tolist() == [3, 10]


def test_hash_deterministic_and_multipliers_fixed():
    m = hash_multipliers(0, 1, 3, 512)
    assert m.tolist() == hash_multipliers(0, 1, 3, 512).tolist()
    assert all(x % 2 == 1 and 0 < x <= (2**63 - 1) // 513 for x in m.tolist())
    assert m.tolist() != hash_multipliers(0, 2, 3, 512).tolist() != hash_multipliers(1, 1, 3, 512).tolist()
    assert m.tolist() == PINNED_MULTIPLIERS  # same values on every machine / version (pure-Python splitmix64)
    ids = torch.randint(0, 512, (3, 50), generator=torch.Generator().manual_seed(0))
    a = ngram_rows(ids, [2, 3], 4, head_primes(100, 8), m, 512)
    assert torch.equal(a, ngram_rows(ids.clone(), [2, 3], 4, head_primes(100, 8), m, 512))
    # max id times the largest multiplier does not overflow int64
    assert 512 * max(m.tolist()) < 2**63


PINNED_MULTIPLIERS = [15162711550296517, 5227182257628411, 9641476889863679]  # seed 0, layer 1, ids <= 512


def test_distinct_primes():
    p = head_primes(100, 16)
    assert len(set(p)) == 16 and p == sorted(p) and p[0] >= 100 and all(_is_prime(x) for x in p)
    assert head_primes(101, 1) == [101] and head_primes(2**31, 1) == [2147483659]


def test_rows_near_uniform_chi_square():
    p = head_primes(211, 1)[0]
    ids = torch.randint(0, 100_000, (1, 60_000), generator=torch.Generator().manual_seed(3))
    rows = ngram_rows(ids, [2], 1, [p], hash_multipliers(0, 0, 2, 100_000), 100_000)[0, :, 0]
    counts = torch.bincount(rows, minlength=p).double()
    expect = rows.numel() / p
    chi2 = ((counts - expect) ** 2 / expect).sum()
    pval = torch.special.gammaincc(torch.tensor((p - 1) / 2, dtype=torch.float64), chi2 / 2).item()
    assert pval > 0.001, (chi2.item(), pval)


# ------------------------------------------------------------------------------------- canonical ids
@pytest.fixture(scope="module")
def tok():
    from dsv4.data.tokenizer import train_tokenizer

    text = (
        "Hello hello HELLO café cafe Café naïve naive the cat sat on the mat. Über uber ÜBER\n\n  x\ty " * 40
        + "The quick brown fox jumps over the lazy dog. 日本語のテキスト. Émile émile résumé resume\n" * 40
    )
    return train_tokenizer([text], vocab_size=600, show_progress=False)


def test_canonical_text_rules():
    assert canonical_text("Héllo") == canonical_text(" hello ") == canonical_text("HELLO") == "hello"
    assert canonical_text("ﬁ") == "fi"  # NFKC
    assert canonical_text("\n\n") == canonical_text("\t") == " "  # whitespace-only -> one space
    assert canonical_text("a \t b") == "a b"


def test_canonical_map_merges_variants_keeps_fragments(tok, tmp_path):
    cm = canonical_map(tok, vocab_size=1024)
    v = tok.get_vocab()
    # rule: strip removes leading spaces, so "Hello", " hello" and " Hello" share one id
    assert cm[v["Hello"]] == cm[v["Ġhello"]] == cm[v["ĠHello"]]
    assert cm[v["Ġcafe"]] == cm[v["ĠcafÃ©"]] == cm[v["CafÃ©"]]  # accent and case variants
    assert cm[v["Ċ"]] == cm[v["ĊĊ"]] == cm[v["Ġ"]] == cm[v["ĉ"]]  # whitespace-only tokens: one space
    for frag in ("Ã", "©"):  # bytes 0xC3, 0xA9: not UTF-8 on their own
        i = v[frag]
        assert cm[i] == i and int((cm == i).sum()) == 1
    assert cm[0] == 0 and cm[1] == 1 and int((cm == 0).sum()) == 1  # special tokens keep their ids
    assert cm[700] == 700  # model vocab beyond the tokenizer: identity
    assert bool((cm[cm] == cm).all()) and bool((cm <= torch.arange(1024)).all())  # class id = smallest member
    r = compression_ratio(canonical_map(tok))
    print(f"canonical map: {tok.get_vocab_size()} tokens, compression ratio {r:.3f}")
    assert 0.5 < r < 0.95
    path = save_canonical_map(cm, tmp_path / "tokenizer.json")
    assert path.name == "canonical_map.json" and torch.equal(load_canonical_map(tmp_path), cm)
    assert torch.equal(canonical_map(None, 10), torch.arange(10))


# ---------------------------------------------------------------------------------------------- module
def test_config_validation_names_fields():
    for kw, name in [
        (dict(engram_layer_ids=[7]), "engram_layer_ids"),
        (dict(engram_layer_ids=[1, 1]), "engram_layer_ids"),
        (dict(engram_orders=[1, 2]), "engram_orders"),
        (dict(engram_orders=[]), "engram_orders"),
        (dict(engram_heads=0), "engram_heads"),
        (dict(engram_d_mem=30), "engram_d_mem"),
        (dict(engram_rows_per_head=1), "engram_rows_per_head"),
        (dict(engram_conv_kernel=0), "engram_conv_kernel"),
        (dict(engram_seed=-1), "engram_seed"),
    ]:
        with pytest.raises(ConfigError, match=name):
            eng_config(**kw)
    # V4 presets write no Engram fields; an Engram config writes them and round-trips
    assert not any(k.startswith("engram_") for k in small_config().to_dict())
    cfg = eng_config()
    assert cfg.to_dict()["engram_layer_ids"] == [1] and type(cfg).from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("seg", [False, True])
def test_module_equals_reference_fp64(seg):
    cfg = eng_config(engram_conv_kernel=3)
    eng = Engram(cfg, 1).double()
    perturb_(eng)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, cfg.hc_mult, cfg.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 40, (2, 11), generator=g)  # a small id range repeats n-grams
    segment_ids = torch.tensor([[0] * 5 + [1] * 6, [0] * 11]) if seg else None
    got = eng(x, ids, segment_ids=segment_ids)
    ref = eng.forward_reference(x, ids, segment_ids)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert (eng(x, ids) - got).abs().max() > 1e-6 if seg else True  # segments change the result


def test_zero_conv_is_identity_on_the_conv_path():
    cfg = eng_config()
    eng = Engram(cfg, 1).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, cfg.hc_mult, cfg.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 512, (2, 9), generator=g)
    rows = eng.rows_for(ids)
    e = eng.table.read(rows.reshape(-1)).reshape(2, 9, -1).double()
    u, _ = eng._gate(x, e)
    assert bool((eng.conv_weight == 0).all()) and torch.equal(eng(x, ids), u)  # Y = SiLU(0) + U = U


def test_table_grads_only_used_rows_and_prefetch():
    cfg = eng_config()
    eng = Engram(cfg, 1)
    perturb_(eng)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, cfg.hc_mult, cfg.hidden_size, generator=g)
    ids = torch.randint(0, 512, (2, 8), generator=g)
    (eng(x, ids) ** 2).sum().backward()
    rows, grads = eng.table_grads()
    used = eng.rows_for(ids).unique()
    assert torch.equal(rows, used) and grads.shape == (used.numel(), eng.dim)
    assert bool((grads.abs().sum(-1) > 0).all())
    for n, p in eng.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert eng.table_grads()[0].numel() == 0  # cleared
    # accumulation over two backward passes sums; prefetched values give the same output and grads
    y1 = eng(x, ids)
    (y1**2).sum().backward()
    (eng(x, ids) ** 2).sum().backward()
    _r2, g2 = eng.table_grads()
    torch.testing.assert_close(g2, 2 * grads)
    extra = torch.cat([used, torch.tensor([eng.n_rows - 1])]).unique()
    y2 = eng(x, ids, prefetched=(extra, eng.table.read(extra)))
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    (y2**2).sum().backward()
    r3, g3 = eng.table_grads()
    assert torch.equal(r3, used) and torch.allclose(g3, grads)
    with pytest.raises(ValueError, match="prefetched rows miss"):
        eng(x, ids, prefetched=(used[1:], eng.table.read(used[1:])))


def test_custom_store_is_used():
    cfg = eng_config()
    eng = Engram(cfg, 1)
    store = RamStore(eng.n_rows, eng.dim, 0.0, 0)
    eng.set_table(store)
    x = torch.randn(1, 5, cfg.hc_mult, cfg.hidden_size)
    assert torch.equal(eng(x, torch.arange(5)[None]), torch.zeros_like(x))  # zero table -> zero output
    with pytest.raises(ValueError, match="needs a table"):
        eng.set_table(RamStore(3, eng.dim))


# ----------------------------------------------------------------------------------------------- model
def _model(cfg, seed=0, conv=True):
    from dsv4.model.transformer import Transformer

    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    randomize_(m)
    if conv:
        for eng in m.engrams().values():
            perturb_(eng, seed, conv_std=0.3)
    return m


def test_feature_off_is_the_plain_model_and_zero_engram_is_identity():
    base_cfg = small_config()
    base = _model(base_cfg)
    assert not any("engram" in k for k in base.state_dict()) and "canonical_ids" not in dict(base.named_buffers())
    assert not base.engrams() and base.engram_rows(torch.zeros(1, 3, dtype=torch.long)) == {}
    m = _model(eng_config(engram_layer_ids=[0, 2]))
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".engram." in k for k in missing)
    assert "canonical_ids" not in m.state_dict()  # non-persistent
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        assert (m(ids).logits - ref).abs().max() > 1e-4  # Engram on changes the output
        for eng in m.engrams().values():
            eng.wv.weight.zero_()  # v = 0 -> U = 0 -> RMSNorm(0) = 0 -> Y = SiLU(0) + 0 = 0 exactly
        assert torch.equal(m(ids).logits, ref)


def test_model_grads_reach_engram_and_touched_rows():
    m = _model(eng_config(engram_layer_ids=[1, 3])).train()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    m(ids).logits.float().square().mean().backward()
    for n, p in m.named_parameters():
        if ".engram." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    rows = m.engram_rows(ids)
    grads = m.engram_table_grads()
    assert set(grads) == {1, 3}
    for i, (r, g) in grads.items():
        assert torch.equal(r, rows[i]) and bool((g.abs().sum(-1) > 0).all())
    # prefetched rows give the same logits
    with torch.no_grad():
        pre = {i: (r, m.engrams()[i].table.read(r)) for i, r in rows.items()}
        torch.testing.assert_close(m(ids, engram_prefetched=pre).logits, m(ids).logits, rtol=0, atol=0)


def test_canonical_map_is_used():
    m = _model(eng_config())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = m(ids).logits
        cmap = torch.arange(512) % 256  # ids i and i + 256 become one canonical id
        m.set_canonical_map(cmap)
        after = m(ids).logits
        assert torch.equal(before, after)  # ids < 256: unchanged canonical ids
        # ids + 256 hash like ids; only the hash-routed MoE and the embedding see the difference
        assert torch.equal(m.engram_rows(ids + 256)[1], m.engram_rows(ids)[1])
        m.set_canonical_map(torch.arange(512).flip(0))
        assert (m(ids).logits - before).abs().max() > 1e-5
    with pytest.raises(ValueError, match="canonical map"):
        m.set_canonical_map(torch.arange(10))


# -------------------------------------------------------------------------------------------- decode
T = 40


@pytest.fixture(scope="module")
def dmodel():
    # swa (Engram), csa, hca, dsa (Engram), csa; window 8; conv dilation 3, kernel 4: 9 positions back
    cfg = eng_config(
        num_hidden_layers=5, compress_ratios=[0, 4, 8, 1, 4, 0], sliding_window=8, index_topk=6, engram_layer_ids=[0, 3]
    )
    m = _model(cfg, seed=3)
    m.set_canonical_map(torch.arange(512) // 2)
    return m


@pytest.fixture(scope="module")
def dids():
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def dfull(dmodel, dids):
    with torch.no_grad():
        return dmodel(dids).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunks", [[T], [1] * T, [5, 1, 7, 2, 1, 24], [12, 1, 1, 26]])
def test_cached_decode_equals_full_forward(dmodel, dids, dfull, chunks):
    from dsv4.infer.cache import ModelCache

    cache = ModelCache(dmodel, batch=2, capacity=16, page=16)
    outs, p = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(dmodel(dids[:, p : p + n], cache=cache).logits)
            p += n
    assert _rel(torch.cat(outs, 1), dfull) < 1e-5


def test_cached_mixed_lengths_and_rollback(dmodel, dids, dfull):
    from dsv4.infer.cache import ModelCache

    cache = ModelCache(dmodel, batch=3, capacity=16, page=16)
    with torch.no_grad():
        dmodel(dids[0:1, :11], cache=cache, rows=[0])
        dmodel(dids[1:2, :17], cache=cache, rows=[2])
        for s in range(8):
            tok = torch.stack([dids[0, 11 + s], dids[1, 17 + s]])[:, None]
            o = dmodel(tok, cache=cache, rows=[0, 2]).logits[:, 0]
            assert _rel(o[0], dfull[0, 11 + s]) < 1e-5 and _rel(o[1], dfull[1, 17 + s]) < 1e-5
        for n in (1, 4):  # junk tokens (rejected drafts), rolled back, then the true continuation
            cache.reset(None)
            dmodel(dids[:2, :21], cache=cache, rows=[0, 1])
            dmodel(torch.randint(0, 512, (2, n)), cache=cache, rows=[0, 1])
            cache.rollback([0, 1], n)
            o = dmodel(dids[:2, 21:30], cache=cache, rows=[0, 1]).logits
            assert _rel(o, dfull[:, 21:30]) < 1e-5
        cache.copy_row(0, 2)  # the Engram rings travel with the row
        o = dmodel(dids[:1, 30:32], cache=cache, rows=[2]).logits
        assert _rel(o, dfull[:1, 30:32]) < 1e-5


def test_engram_state_is_needed(dmodel, dids, dfull):
    """The equality can fail: losing the Engram rings changes the next logits."""
    from dsv4.infer.cache import ModelCache

    cache = ModelCache(dmodel, batch=2, capacity=16, page=16)
    with torch.no_grad():
        dmodel(dids[:, :20], cache=cache)
        for lc in cache.layers:
            if lc.engram is not None:
                lc.engram.z.zero_()
        assert _rel(dmodel(dids[:, 20:22], cache=cache).logits, dfull[:, 20:22]) > 1e-4


def test_no_future_leakage(dmodel, dids, dfull):
    ids = dids.clone()
    ids[:, 25] = (ids[:, 25] + 7) % 512
    with torch.no_grad():
        out = dmodel(ids).logits
    # atol as tests/test_causal.py: the MoE groups tokens per expert, so other tokens change the rounding
    assert torch.allclose(out[:, :25], dfull[:, :25], atol=1e-6, rtol=0)
    assert (out[:, 25:] - dfull[:, 25:]).abs().max() > 1e-4


def test_bf16_model_runs_and_keeps_fp32_parts():
    m = _model(eng_config()).to(torch.bfloat16)
    eng = m.engrams()[1]
    assert eng.conv_weight.dtype == torch.float32 and eng.h_norm[0].weight.dtype == torch.float32
    assert eng.wv.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = m(ids).logits
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_tiny_engram_preset():
    from dsv4.config import ModelConfig

    cfg, tiny = ModelConfig.preset("tiny-engram"), ModelConfig.preset("tiny")
    assert cfg.replace(**{k: getattr(tiny, k) for k in cfg.to_dict() if k.startswith("engram_")}) == tiny
    heads = len(cfg.engram_orders) * cfg.engram_heads
    table = sum(head_primes(cfg.engram_rows_per_head, heads)) * cfg.engram_d_mem // heads
    routed = cfg.num_hidden_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert 0.2 <= table / (table + routed) <= 0.25  # the paper's allocation law (docs/spec.md section 4)
