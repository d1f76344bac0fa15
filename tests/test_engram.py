"""Engram (spec section 4): canonical ids, n-gram hashing, the module against its loop oracle, gradients
to the table rows, the model wiring (off = baseline) and cached decode."""
import pytest
import torch

from conftest import randomize_, small_config
from dsv4.config import ConfigError
from dsv4.model.engram import (Engram, TensorStore, canonical_map, canonical_text, compression_ratio,
                               hash_multipliers, head_primes, load_canonical_map, ngram_rows, save_canonical_map,
                               _is_prime)

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
    assert all(x % 2 == 1 and 0 < x <= (2 ** 63 - 1) // 513 for x in m.tolist())
    assert m.tolist() != hash_multipliers(0, 2, 3, 512).tolist() != hash_multipliers(1, 1, 3, 512).tolist()
    assert m.tolist() == PINNED_MULTIPLIERS  # same values on every machine / version (pure-Python splitmix64)
    ids = torch.randint(0, 512, (3, 50), generator=torch.Generator().manual_seed(0))
    a = ngram_rows(ids, [2, 3], 4, head_primes(100, 8), m, 512)
    assert torch.equal(a, ngram_rows(ids.clone(), [2, 3], 4, head_primes(100, 8), m, 512))
    # max id times the largest multiplier does not overflow int64
    assert 512 * max(m.tolist()) < 2 ** 63


PINNED_MULTIPLIERS = [15162711550296517, 5227182257628411, 9641476889863679]  # seed 0, layer 1, ids <= 512


def test_distinct_primes():
    p = head_primes(100, 16)
    assert len(set(p)) == 16 and p == sorted(p) and p[0] >= 100 and all(_is_prime(x) for x in p)
    assert head_primes(101, 1) == [101] and head_primes(2 ** 31, 1) == [2147483659]


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

    text = ("Hello hello HELLO café cafe Café naïve naive the cat sat on the mat. Über uber ÜBER\n\n  x\ty " * 40
            + "The quick brown fox jumps over the lazy dog. 日本語のテキスト. Émile émile résumé resume\n" * 40)
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
    for kw, name in [(dict(engram_layer_ids=[7]), "engram_layer_ids"), (dict(engram_layer_ids=[1, 1]), "engram_layer_ids"),
                     (dict(engram_orders=[1, 2]), "engram_orders"), (dict(engram_orders=[]), "engram_orders"),
                     (dict(engram_heads=0), "engram_heads"), (dict(engram_d_mem=30), "engram_d_mem"),
                     (dict(engram_rows_per_head=1), "engram_rows_per_head"),
                     (dict(engram_conv_kernel=0), "engram_conv_kernel"), (dict(engram_seed=-1), "engram_seed")]:
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
    u = eng._gate(x, e)
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
    (y1 ** 2).sum().backward()
    (eng(x, ids) ** 2).sum().backward()
    r2, g2 = eng.table_grads()
    torch.testing.assert_close(g2, 2 * grads)
    extra = torch.cat([used, torch.tensor([eng.n_rows - 1])]).unique()
    y2 = eng(x, ids, prefetched=(extra, eng.table.read(extra)))
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    (y2 ** 2).sum().backward()
    r3, g3 = eng.table_grads()
    assert torch.equal(r3, used) and torch.allclose(g3, grads)
    with pytest.raises(ValueError, match="prefetched rows miss"):
        eng(x, ids, prefetched=(used[1:], eng.table.read(used[1:])))


def test_custom_store_is_used():
    cfg = eng_config()
    eng = Engram(cfg, 1)
    store = TensorStore(eng.n_rows, eng.dim, 0.0, 0)
    eng.set_table(store)
    x = torch.randn(1, 5, cfg.hc_mult, cfg.hidden_size)
    assert torch.equal(eng(x, torch.arange(5)[None]), torch.zeros_like(x))  # zero table -> zero output
    with pytest.raises(ValueError, match="needs a table"):
        eng.set_table(TensorStore(3, eng.dim))
