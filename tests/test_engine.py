"""The inference engine: cached greedy == uncached greedy, continuous batching, per-request sampling,
stop rules, MTP speculative decoding (greedy identical; the acceptance rule keeps the distribution)."""

import pytest
import torch
from conftest import every_kind_model

from dsv4.data.tokenizer import train_tokenizer
from dsv4.infer.cache import ModelCache
from dsv4.infer.engine import Detokenizer, Engine
from dsv4.infer.reference import generate
from dsv4.infer.sampling import SamplingParams, probabilities
from dsv4.infer.speculative import accept_draft


@pytest.fixture(scope="module")
def model():
    return every_kind_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 37, 12, 60, 21)]


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def greedy_ref(model, prompts):
    return [generate(model, p, max_new_tokens=16, temperature=0, stop_at_eos=False) for p in prompts]


def test_greedy_batched_equals_uncached(model, prompts, greedy_ref):
    eng = Engine(model, max_batch=3, prefill_chunk=16)  # 5 requests through 3 rows: join and leave
    out = eng.generate(prompts, GREEDY)
    assert [r.output for r in out] == greedy_ref
    assert all(r.finish_reason == "length" for r in out) and not eng.running and len(eng.free_rows) == 3


def test_speculative_greedy_identical(model, prompts, greedy_ref):
    eng = Engine(model, max_batch=2, prefill_chunk=16, speculative=True)
    assert [r.output for r in eng.generate(prompts, GREEDY)] == greedy_ref
    assert eng.stats["drafted"] > 0


def test_mtp_cached_equals_full(model, prompts):
    ids = torch.tensor([prompts[3]])
    with torch.no_grad():
        ref = model(ids, return_mtp=True).mtp_logits[0]
        c = ModelCache(model)
        o1 = model(ids[:, :25], cache=c)
        l1 = model.mtp_forward(o1.hidden[:, :24], ids[:, 1:25], c)
        o2 = model(ids[:, 25:], cache=c)
        l2 = model.mtp_forward(torch.cat([o1.hidden[:, 24:], o2.hidden[:, :-1]], 1), ids[:, 25:], c)
    got = torch.cat([l1, l2], 1)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_sampling_is_per_request(model, prompts):
    """A seeded request samples the same tokens alone or batched with others (its own generator)."""
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(model, max_batch=1).generate([prompts[1]], sp)[0].output
    mixed = (
        Engine(model, max_batch=4)
        .generate(
            [prompts[0], prompts[1], prompts[2]], [SamplingParams(max_tokens=5, temperature=1.0, seed=1), sp, GREEDY]
        )[1]
        .output
    )
    assert alone == mixed and len(alone) == 12
    other = Engine(model, max_batch=1).generate([prompts[1]], SamplingParams(**{**sp.__dict__, "seed": 8}))[0].output
    assert other != alone


def test_stop_tokens_eos_and_context_limit(model, prompts, greedy_ref):
    eng = Engine(model, max_batch=2)
    stop_tok = greedy_ref[0][5]
    r = eng.generate(
        [prompts[0]], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0]
    assert r.output == greedy_ref[0][: greedy_ref[0].index(stop_tok)] and r.finish_reason == "stop"
    r = Engine(model, eos_id=greedy_ref[0][3]).generate([prompts[0]], SamplingParams(max_tokens=16, temperature=0))[0]
    assert r.finish_reason == "stop" and r.output == greedy_ref[0][: greedy_ref[0].index(greedy_ref[0][3])]
    small = Engine(model, max_context=len(prompts[0]) + 4)
    r = small.generate([prompts[0]], GREEDY)[0]
    assert r.output == greedy_ref[0][:4] and r.finish_reason == "length"
    assert Engine(model).generate([prompts[0]], SamplingParams(max_tokens=0))[0].output == []


def test_bad_requests(model):
    eng = Engine(model, max_context=32)
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add([])
    with pytest.raises(ValueError, match="at most 31 prompt tokens"):
        eng.add([5] * 40)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add([5], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="top_p"):
        eng.add([5], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        eng.add([600])
    with pytest.raises(ValueError, match="need a tokenizer"):
        eng.add([5], SamplingParams(stop=["x"]))


def test_abort_frees_row(model, prompts):
    eng = Engine(model, max_batch=1)
    a = eng.add(prompts[0], GREEDY)
    b = eng.add(prompts[1], GREEDY)
    eng.step()
    eng.abort(a.id)
    assert a.finish_reason == "abort" and eng.free_rows == [0]
    while not b.finished:
        eng.step()
    assert len(b.output) == 16


@pytest.fixture(scope="module")
def tok():
    text = ["def hello(world):\n    return world + 1\n", "héllo wörld ✓ 😀 end.\n"] * 40
    return train_tokenizer(text, vocab_size=300, show_progress=False)


def test_detokenizer_releases_whole_characters(tok):
    ids = tok.encode("héllo wörld ✓ 😀 end.").ids
    d, text = Detokenizer(tok), ""
    for i in ids:
        piece = d.push([i])
        assert "\ufffd" not in piece
        text += piece
    assert text + d.flush() == "héllo wörld ✓ 😀 end."


def test_stop_strings(model, tok, prompts):
    """The output stops before the first stop string; text streamed in pieces never shows any of it."""
    eng = Engine(model, tokenizer=tok, max_batch=1)
    free = eng.generate([prompts[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    full = free.text
    assert len(full) > 6
    stop = full[4:6]
    events = list(
        Engine(model, tokenizer=tok).stream(
            prompts[2], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
        )
    )
    streamed = "".join(e.text or "" for e in events)
    assert streamed == full[: full.index(stop)] and events[-1].finish_reason == "stop"


def test_acceptance_rule_preserves_distribution():
    """Sampling d ~ q, then accept_draft, yields tokens distributed as p (chi-square, 20k draws)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[accept_draft(p, q, d, g)[1]] += 1
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 18.5  # 4 dof, p = 0.001
    # against q itself the test does fail (it can)
    assert ((((counts - n * q) ** 2) / (n * q)).sum().item()) > 100


def test_probabilities_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[2:].sum() == 0 and abs(p.sum().item() - 1) < 1e-6
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert p[0] == 1
    assert probabilities(logits, SamplingParams(temperature=0)).tolist() == [1, 0, 0, 0]
