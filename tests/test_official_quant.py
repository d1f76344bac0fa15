"""The official_quant mode (dsv4.quant.official_quant): FP8 activations, Hadamard + FP4 indexer queries and
keys, FP8 kv round trips. With it, an FP8 cache's chunked prefill and decode equal the uncached forward;
without it they do not; switched off, the model is unchanged."""

import pytest
import torch
from conftest import every_kind_model

from dsv4.infer.cache import ModelCache
from dsv4.quant.official_quant import disable_official_quant, enable_official_quant, fp8_act, hadamard, hadamard_fp4

T = 60


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(3))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def chunks_then_steps(model, ids, prefill: int, dtype):
    cache = ModelCache(model, batch=ids.shape[0], capacity=16, page=16, dtype=dtype)
    with torch.no_grad():
        outs = [model(ids[:, :prefill], cache=cache).logits]
        outs += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(outs, 1)


def test_fp8_activations_are_e4m3_values_with_power_of_two_scales():
    x = torch.randn(3, 300) * torch.logspace(-3, 3, 300)
    q = fp8_act(x)
    assert q.shape == x.shape and torch.equal(fp8_act(q), q)  # idempotent
    blocks = torch.nn.functional.pad(x, (0, 84)).unflatten(-1, (3, 128))
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1) / 448)))
    codes = torch.nn.functional.pad(q, (0, 84)).unflatten(-1, (3, 128)) / scale[..., None]
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # each value is an e4m3 code x the scale
    assert ((q - x).abs() <= x.abs() / 16 + scale.repeat_interleave(128, -1)[..., :300] * 2**-9).all()


def test_hadamard_is_orthogonal_and_fp4_keeps_scores_close():
    h = hadamard(128)
    torch.testing.assert_close(h @ h.T, torch.eye(128), atol=1e-6, rtol=0)
    q, k = torch.randn(64, 128), torch.randn(500, 128)
    exact, got = q @ k.T, hadamard_fp4(q) @ hadamard_fp4(k).T
    assert 0 < ((got - exact).norm() / exact.norm()).item() < 0.2
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(96)


def test_off_is_the_baseline_and_on_changes_the_logits(ids):
    model = every_kind_model()
    with torch.no_grad():
        base = model(ids).logits
        enable_official_quant(model)
        quant = model(ids).logits
        disable_official_quant(model)
        again = model(ids).logits
    assert torch.equal(again, base)
    assert 1e-4 < rel(quant, base) < 0.5


def test_the_kv_round_trip_is_what_an_fp8_cache_stores():
    """Storing a round-tripped vector and reading it back gives it exactly: what a prefill chunk attends is
    what a later decode step reads from the cache."""
    from dsv4.quant.kv import KVCodec
    from dsv4.quant.official_quant import kv_round_trip

    codec, rt = KVCodec(192, 64, "fp8"), kv_round_trip(192, 64)
    v = rt(torch.randn(5, 7, 192) * torch.logspace(-4, 2, 192))
    assert torch.equal(codec.decode(codec.encode(v)), v)


def test_in_official_mode_an_fp8_cache_changes_nothing(ids):
    """Chunked prefill + decode through an FP8 cache gives bit for bit the logits of an fp32 cache in official
    mode (every stored value is already what the codec keeps); without the mode the FP8 cache changes
    them. Against the uncached forward of the same mode, the prefill chunk agrees to 1e-5; the decode
    steps agree up to rounding flips (a last-bit difference between the batched and the one-token products
    can move a value to the next FP8 / FP4 code, and a flipped indexer key can change a top-k choice)."""
    model = every_kind_model()
    with torch.no_grad():
        plain = [chunks_then_steps(model, ids, 30, dt) for dt in (torch.float32, "fp8")]
        enable_official_quant(model)
        full = model(ids).logits
        fp32, fp8 = (chunks_then_steps(model, ids, 30, dt) for dt in (torch.float32, "fp8"))
    assert torch.equal(fp8, fp32)
    assert rel(plain[1], plain[0]) > 1e-4
    assert rel(fp8[:, :30], full[:, :30]) < 1e-5
    per_position = (fp8 - full).abs().amax(-1) / full.abs().max()
    assert per_position.median().item() < 1e-2


def test_generate_runs_in_official_mode(tmp_path, capsys):
    """`dsv4 generate --official-quant` on a directory in DeepSeek's layout, kept quantised, runs and is
    deterministic (the same command twice gives the same greedy text)."""
    from dsv4.cli import main
    from dsv4.convert.official import save_official
    from dsv4.data import train_tokenizer

    real = save_official(every_kind_model(), tmp_path / "real")
    train_tokenizer(["def f(x):\n    return x + 1\n" * 40], 512, real / "tokenizer.json", show_progress=False)
    args = ["generate", "--ckpt", str(real), "--prompt", "def", "--max-new-tokens", "6", "--temperature", "0"]
    outs = []
    for _ in range(2):
        assert main([*args, "--keep-quantized", "--official-quant"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def")
