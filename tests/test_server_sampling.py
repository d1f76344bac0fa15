"""OpenAI's logit_bias, presence_penalty and frequency_penalty (dsv4.infer.sampling.adjust_logits, used by the
engine): the batched path equals the per-token formula, defaults leave the output bit-identical, each one
changes what is generated, and the sampler survives a temperature whose logits / T overflow."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server import tiny_model

import dsv4.infer.engine as engine_mod
from dsv4.infer.engine import Engine
from dsv4.infer.sampling import (
    ParamError,
    SamplingParams,
    adjust_logits,
    adjust_logits_reference,
    probabilities,
    sample,
)

V = 512


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in (7, 19, 3)]


penalty = st.one_of(st.just(0.0), st.floats(-2, 2, allow_nan=False))
bias = st.one_of(st.just({}), st.dictionaries(st.integers(0, 15), st.floats(-100, 100, allow_nan=False), max_size=5))
row = st.builds(SamplingParams, presence_penalty=penalty, frequency_penalty=penalty, logit_bias=bias)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(row, st.lists(st.integers(0, 15), max_size=12)), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_batched_adjustment_equals_the_per_token_formula(rows, dtype, seed):
    params, outputs = [p for p, _ in rows], [o for _, o in rows]
    logits = torch.randn(len(rows), 16, generator=torch.Generator().manual_seed(seed)).to(dtype)
    before = logits.clone()
    got = adjust_logits(logits, params, outputs)
    assert torch.equal(logits, before)  # the input is never modified
    if not any(p.adjusts_logits for p in params):
        assert got is logits
        return
    assert got.dtype == torch.float32
    for b, (p, out) in enumerate(zip(params, outputs)):
        ref = adjust_logits_reference(logits[b], p, out)
        if p.adjusts_logits:
            torch.testing.assert_close(got[b], ref, rtol=0, atol=1e-4)
        else:  # untouched rows keep their exact values
            assert torch.equal(got[b], logits[b].float())


def test_adjustment_formula_by_hand():
    logits = torch.zeros(1, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 3.0, 1: -1.0})
    got = adjust_logits(logits, [p], [[1, 2, 2, 2]])[0]
    assert got.tolist() == [0.0, -1.75, -1.25, 0.0, 3.0, 0.0]  # 1: -(0.5 + 0.25) - 1; 2: -(0.5 + 0.75)


def test_validation_names_the_field():
    for kw, field in [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(logit_bias={V: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={3: 100.5}), "logit_bias"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-1), "seed"),
        (dict(top_p=0), "top_p"),
    ]:
        with pytest.raises(ParamError) as e:
            SamplingParams(**kw).validate(V)
        assert e.value.param == field
    SamplingParams(seed=2**64 - 1, presence_penalty=-2, frequency_penalty=2, logit_bias={V - 1: -100}).validate(V)


def _outputs(model, prompts, params, **engine_kw):
    return [r.output for r in Engine(model, max_batch=2, **engine_kw).generate(prompts, params)]


def test_defaults_are_bit_identical_to_unadjusted_sampling(model, prompts, monkeypatch):
    """Default (or explicitly neutral) fields sample exactly as the engine did before adjust_logits existed."""
    mixed = [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.3, seed=11, ignore_eos=True),
    ]
    neutral = [
        SamplingParams(**{**p.__dict__, "presence_penalty": 0.0, "frequency_penalty": 0, "logit_bias": {}})
        for p in mixed
    ]
    now = _outputs(model, prompts, mixed)
    assert _outputs(model, prompts, neutral) == now
    monkeypatch.setattr(engine_mod, "adjust_logits", lambda logits, params, outputs: logits)  # the old path
    assert _outputs(model, prompts, mixed) == now
    # and a penalised request in the same batch leaves the others' draws alone
    monkeypatch.undo()
    with_penalised = _outputs(
        model,
        prompts + [prompts[0]],
        mixed
        + [
            SamplingParams(
                max_tokens=10, temperature=0.7, presence_penalty=1.5, seed=2, logit_bias={7: 5.0}, ignore_eos=True
            )
        ],
    )
    assert with_penalised[:3] == now


def _reference(model, prompt, p: SamplingParams, n: int) -> list[int]:
    """Uncached, one token at a time, with the per-token adjustment formula."""
    out, gen = [], p.generator()
    with torch.no_grad():
        for _ in range(n):
            logits = adjust_logits_reference(model(torch.tensor([prompt + out])).logits[0, -1], p, out)
            out.append(sample(logits, p, gen))
    return out


N = 16
CASES = {
    "presence": SamplingParams(max_tokens=N, temperature=0, presence_penalty=2.0, ignore_eos=True),
    "frequency": SamplingParams(max_tokens=N, temperature=0, frequency_penalty=0.3, ignore_eos=True),
    "bias": SamplingParams(max_tokens=N, temperature=0, logit_bias={42: 100.0}, ignore_eos=True),
    "sampled": SamplingParams(
        max_tokens=N,
        temperature=0.8,
        top_p=0.95,
        seed=4,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        logit_bias={9: 2.0},
        ignore_eos=True,
    ),
}


@pytest.fixture(scope="module")
def references(model, prompts):
    return {name: [_reference(model, pr, p, N) for pr in prompts] for name, p in CASES.items()}


@pytest.mark.parametrize("speculative", [False, True])
def test_each_field_changes_the_output_as_specified(model, prompts, references, speculative):
    plain = _outputs(
        model, prompts, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True), speculative=speculative
    )
    assert any(len(set(o)) < len(o) for o in plain)  # plain greedy decoding repeats tokens here
    for name, p in CASES.items():
        got = _outputs(model, prompts, p, speculative=speculative)
        assert got == references[name], name
        if name != "sampled":
            assert got != plain, name
    assert all(len(set(o)) == len(o) for o in references["presence"])  # no token twice
    assert references["bias"] == [[42] * N] * len(prompts)
    ban = SamplingParams(max_tokens=N, temperature=0, logit_bias=dict.fromkeys(plain[0], -100.0), ignore_eos=True)
    assert not set(_outputs(model, prompts[:1], ban, speculative=speculative)[0]) & set(plain[0])


def test_penalised_requests_skip_the_speculator(model, prompts):
    eng = Engine(model, max_batch=2, speculative=True)
    eng.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, presence_penalty=1.0, ignore_eos=True))
    assert eng.stats["drafted"] == 0 and not eng.spec.pending_x  # decoded plainly, MTP state released
    eng.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert eng.stats["drafted"] > 0 and not eng.spec.pending_x


def test_vanishing_temperature_or_top_p_is_greedy_not_an_engine_failure(model, prompts):
    """logits / T overflowing (T = 1e-40, or a subnormal that rounds to 0 in fp32), or a top_p that rounds to 0
    in fp32, used to give a NaN distribution, an exception in the engine thread and every request aborted."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    for kw in (dict(temperature=1e-40), dict(temperature=5e-324), dict(top_p=1e-46), dict(top_p=5e-324)):
        assert probabilities(logits, SamplingParams(**kw)).tolist() == [0, 1, 0, 0], kw
    greedy = _outputs(model, prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for kw in (dict(temperature=5e-324), dict(top_p=1e-46)):
        assert _outputs(model, prompts, SamplingParams(max_tokens=6, seed=1, ignore_eos=True, **kw)) == greedy
