"""Data pipeline: corpus discovery, warnings and errors, stable split, byte-level BPE, token streams, batches."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.data import (
    Batches,
    DataError,
    DataWarning,
    Document,
    TokenStream,
    default_corpus,
    find_files,
    iter_documents,
    load_tokenizer,
    split_files,
    token_byte_lengths,
    tokenize_corpus,
    tokenize_files_cached,
    train_tokenizer,
    val_batches,
)
from dsv4.data.packing import segment_ids

SAMPLE = [
    "def add(a, b):\n\treturn a + b\n",
    "Héllo wörld — ünïcödé 🙂 and tabs\tand\r\nCRLF lines.\n",
    "import os\nprint(os.path.join('a', 'b'))\n" * 3,
    "The quick brown fox jumps over the lazy dog. " * 5,
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(SAMPLE * 4, vocab_size=320, path=path, show_progress=False)
    return load_tokenizer(path)


def _write(root, rel, data):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return p


# ---------------------------------------------------------------- corpus


def test_default_corpus_is_stdlib_py_files():
    root = default_corpus()
    assert (root / "os.py").is_file()
    files = find_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert files == sorted(files)
    assert not any(
        part in ("site-packages", "__pycache__", "test") for f in files for part in f.relative_to(root).parts
    )
    assert find_files(root) == files


def test_empty_folder_raises_data_error_naming_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)) as e:
        find_files(tmp_path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    _write(tmp_path, "img.png", b"\x89PNG")
    _write(tmp_path, ".hidden/a.txt", "x")
    _write(tmp_path, "__pycache__/a.txt", "x")
    with pytest.raises(DataError, match=str(tmp_path)):
        find_files(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        find_files(tmp_path / "missing")
    with pytest.raises(DataError, match="matches no"):
        find_files(str(tmp_path / "**" / "*.md"))


def test_binary_and_non_utf8_files_skipped_with_one_warning_each(tmp_path):
    a = _write(tmp_path, "a.txt", "alpha text\n")
    _write(tmp_path, "sub/blob.dat", b"head\x00\x01\x02" * 10)
    _write(tmp_path, "sub/latin.txt", "caf\xe9".encode("latin-1"))
    c = _write(tmp_path, "sub/c.md", "# gamma\n")
    _write(tmp_path, "empty.txt", "")
    files = find_files(tmp_path)
    assert len(files) == 5
    with pytest.warns(DataWarning) as rec:
        docs = list(iter_documents(files))
    assert docs == [Document(a, "alpha text\n"), Document(c, "# gamma\n")]
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2
    assert any("blob.dat" in m and "binary" in m for m in msgs)
    assert any("latin.txt" in m and "UTF-8" in m for m in msgs)


def test_nothing_readable_raises(tmp_path):
    _write(tmp_path, "blob.dat", b"\x00" * 100)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=str(tmp_path)):
        list(iter_documents(find_files(tmp_path)))


def test_jsonl_text_field_and_bad_lines(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "one"}\n{not json\n\n{"body": "x"}\n{"text": "two", "id": 3}\n')
    with pytest.warns(DataWarning) as rec:
        docs = list(iter_documents([p]))
    assert [d.text for d in docs] == ["one", "two"] and all(d.path == p for d in docs)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2 and f"{p}:2" in msgs[0] and f"{p}:4" in msgs[1]
    q = _write(tmp_path, "e.jsonl", '{"content": "a"}\n{"content": "b"}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [d.text for d in iter_documents([q], text_field="content")] == ["a", "b"]


def test_glob_and_single_file(tmp_path):
    md = _write(tmp_path, "docs/x/a.md", "a")
    _write(tmp_path, "docs/b.txt", "b")
    md2 = _write(tmp_path, "docs/c.md", "c")
    assert find_files(str(tmp_path / "docs" / "**" / "*.md")) == sorted([md, md2])
    assert find_files(md) == [md]


def _tree(root, n=40):
    return [_write(root, f"pkg{i % 3}/mod_{i}.py", f"x = {i}\n") for i in range(n)]


def test_split_deterministic_disjoint_and_prefix_independent(tmp_path):
    files_a = _tree(tmp_path / "machine_a" / "usr" / "lib")
    files_b = _tree(tmp_path / "b" / "opt")
    train, val = split_files(files_a, val_fraction=0.2)
    rtrain, rval = split_files(list(reversed(files_a)), val_fraction=0.2)
    assert (set(rtrain), set(rval)) == (set(train), set(val))  # independent of input order
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files_a)
    assert 1 <= len(val) < len(files_a)
    assert split_files(files_a, 0.2) == (train, val)
    rel = lambda fs, r: [f.relative_to(r) for f in fs]
    tb, vb = split_files(files_b, 0.2)
    assert rel(tb, tmp_path / "b" / "opt") == rel(train, tmp_path / "machine_a" / "usr" / "lib")
    assert rel(vb, tmp_path / "b" / "opt") == rel(val, tmp_path / "machine_a" / "usr" / "lib")


def test_split_guarantees_both_sides(tmp_path):
    two = _tree(tmp_path, 2)
    for frac in (1e-9, 0.5, 0.999):
        train, val = split_files(two, frac)
        assert len(train) == 1 and len(val) == 1
    assert split_files(two, 0.0) == (two, [])
    assert split_files(two[:1], 0.05) in (([two[0]], []), ([], [two[0]]))
    with pytest.raises(ValueError):
        split_files(two, 1.0)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_files(tok, tmp_path):
    assert tok.token_to_id("<|bos|>") == 0 and tok.token_to_id("<|eos|>") == 1
    assert 258 < tok.get_vocab_size() <= 320
    # a special-token string inside text is ordinary text, not a document boundary
    ids = tok.encode("a<|eos|>b", add_special_tokens=False).ids
    assert 0 not in ids and 1 not in ids and tok.decode(ids) == "a<|eos|>b"
    out = tmp_path / "t.json"
    train_tokenizer(SAMPLE, 300, out, show_progress=False)
    assert out.is_file() and load_tokenizer(out).get_vocab_size() <= 300
    with pytest.raises(ValueError):
        train_tokenizer(SAMPLE, 100, None, show_progress=False)


def test_tokenizer_deterministic_and_sampling():
    a = train_tokenizer(SAMPLE * 4, 300, show_progress=False).to_str()
    assert a == train_tokenizer(SAMPLE * 4, 300, show_progress=False).to_str()
    # capped training text is a content-hash sample, independent of input order
    s1 = train_tokenizer(SAMPLE * 4, 300, max_chars=200, show_progress=False).to_str()
    s2 = train_tokenizer(list(reversed(SAMPLE * 4)), 300, max_chars=200, show_progress=False).to_str()
    assert s1 == s2


@settings(max_examples=200, deadline=None)
@given(
    s=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
    | st.text(alphabet=" \t\n\r\x00abc\u00e9\u4e2d\U0001f642", max_size=100)
)
def test_tokenizer_round_trip(tok, s):
    ids = tok.encode(s, add_special_tokens=False).ids
    assert tok.decode(ids) == s
    assert int(token_byte_lengths(tok)[ids].sum()) == len(s.encode("utf-8"))


# ---------------------------------------------------------------- packing


def test_tokenize_corpus_stream(tok, tmp_path):
    docs = [Document(tmp_path / f"{i}", t) for i, t in enumerate(SAMPLE)]
    s = tokenize_corpus(docs, tok, show_progress=False)
    assert s.tokens.dtype == np.uint16 and s.n_docs == len(SAMPLE)
    assert s.n_bytes == sum(len(t.encode()) for t in SAMPLE)
    assert int(token_byte_lengths(tok)[s.tokens].sum()) == s.n_bytes
    ends = np.append(s.doc_starts[1:], len(s)) - 1
    assert (s.tokens[ends] == 1).all() and (s.tokens == 1).sum() == len(SAMPLE)
    for start, end, text in zip(s.doc_starts, ends, SAMPLE):
        assert tok.decode(s.tokens[start:end].tolist()) == text
    s.save(tmp_path / "c.npz")
    t = TokenStream.load(tmp_path / "c.npz")
    assert np.array_equal(t.tokens, s.tokens) and t.tokens.dtype == s.tokens.dtype
    assert np.array_equal(t.doc_starts, s.doc_starts) and t.n_bytes == s.n_bytes


def test_tokenize_files_cached(tok, tmp_path):
    files = [_write(tmp_path, f"d/{i}.txt", t) for i, t in enumerate(SAMPLE)]
    cache = tmp_path / "cache" / "train.npz"
    s = tokenize_files_cached(files, tok, cache, show_progress=False)
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    assert np.array_equal(tokenize_files_cached(files, tok, cache, show_progress=False).tokens, s.tokens)
    assert cache.stat().st_mtime_ns == mtime  # reused, not rewritten
    files[0].write_text("changed " * 20)
    s2 = tokenize_files_cached(files, tok, cache, show_progress=False)
    assert len(s2) != len(s)


def _stream(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 300, size=n).astype(np.uint16)
    tokens[rng.random(n) < 0.03] = 1
    return TokenStream(tokens, np.array([0]), n)


def test_batches_pure_function_of_seed_and_step():
    s = _stream()
    a, b = Batches(s, 4, 32, seed=7), Batches(TokenStream(s.tokens.copy(), s.doc_starts, s.n_bytes), 4, 32, seed=7)
    later = b.get(5)
    for step in (0, 1, 5, 10**6):
        x, y = a.get(step), b.get(step)
        for f in ("input_ids", "targets", "segment_ids"):
            assert torch.equal(getattr(x, f), getattr(y, f))
    assert torch.equal(a.get(5).input_ids, later.input_ids)
    assert not torch.equal(a.get(0).input_ids, a.get(1).input_ids)
    assert not torch.equal(a.get(0).input_ids, Batches(s, 4, 32, seed=8).get(0).input_ids)


def test_batch_fields():
    s = _stream()
    tb = np.arange(300) % 4
    batch = Batches(s, 6, 64, seed=1, token_bytes=tb).get(3)
    assert batch.input_ids.shape == batch.targets.shape == batch.segment_ids.shape == (6, 64)
    assert batch.input_ids.dtype == batch.targets.dtype == batch.segment_ids.dtype == torch.int64
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert batch.n_bytes == int(tb[batch.targets.numpy()].sum())
    ids, seg = batch.input_ids, batch.segment_ids
    assert (seg[:, 0] == 0).all() and (seg.diff(dim=1) >= 0).all()
    assert torch.equal(seg.diff(dim=1), (ids[:, :-1] == 1).long())  # +1 exactly after each eos
    for off, row in zip(Batches(s, 6, 64, seed=1).offsets(3), ids):
        assert np.array_equal(row.numpy(), s.tokens[off : off + 64])


def test_segment_ids_example():
    x = np.array([[5, 1, 7, 8, 1, 1, 9]])
    assert segment_ids(x).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_too_short_stream():
    with pytest.raises(DataError, match="too short"):
        Batches(np.array([1, 2, 3], dtype=np.uint16), 2, 8)


def test_val_batches_sequential_and_deterministic():
    s = _stream(1000)
    bs = list(val_batches(s, 4, 64))
    assert [b.input_ids.shape[0] for b in bs] == [4, 4, 4, 3]  # 999 // 64 = 15 windows
    again = list(val_batches(s, 4, 64))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(bs, again))
    targets = torch.cat([b.targets.reshape(-1) for b in bs]).numpy()
    assert np.array_equal(targets, s.tokens[1 : 1 + 15 * 64])  # each target scored once, in order
    assert len(list(val_batches(s, 4, 64, max_batches=2))) == 2
    short = list(val_batches(s.tokens[:10], 4, 64))
    assert len(short) == 1 and short[0].input_ids.shape == (1, 9)
