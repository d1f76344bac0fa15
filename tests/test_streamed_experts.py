"""Routed experts streamed from the shards (dsv4.quant.streamed): the model computes what the kept-quantised
model computes, the expert cache never holds more than its budget, read-ahead guesses the next layer's
experts, and the meta-device build allocates no expert."""

from __future__ import annotations

import pytest
import torch
from conftest import every_kind_model

from dsv4.cli import main
from dsv4.convert.official import load_official, save_official
from dsv4.infer.cache import ModelCache
from dsv4.quant.execution import resident_bytes
from dsv4.quant.streamed import StreamedExperts, tensor_ranges


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return save_official(every_kind_model(), tmp_path_factory.mktemp("official"), max_shard_bytes=200_000)


def _expert_bytes(model) -> int:
    return sum(t.nbytes for n, t in model.state_dict().items() if ".ffn.experts." in n)


def test_tensor_ranges_read_what_safetensors_reads(official):
    from dsv4.convert.official import OfficialReader

    r = OfficialReader(official)
    model = load_official(official, max_resident_bytes=1 << 20)
    store = model.expert_store
    for name in ("layers.1.ffn.experts.3.w2.weight", "layers.1.ffn.experts.3.w2.scale", "embed.weight"):
        assert torch.equal(store.read_tensor(name).view(torch.uint8), r.get(name).view(torch.uint8))
    shard = official / r.where["embed.weight"]
    dtype, shape, _offset, nbytes = tensor_ranges(shard)["embed.weight"]
    assert dtype == torch.bfloat16 and nbytes == 2 * shape[0] * shape[1]


@pytest.mark.parametrize("budget", [1 << 30, 6_000])
def test_streamed_experts_compute_what_kept_experts_compute(official, budget):
    """Prefill and cached decode give the kept-quantised model's logits bit for bit, with a cache that holds
    every expert and with one that holds about one expert (evictions on every layer)."""
    kept = load_official(official, keep_quantized=True).eval()
    streamed = load_official(official, keep_quantized=True, max_resident_bytes=budget).eval()
    assert any(isinstance(m, StreamedExperts) for m in streamed.modules())
    store = streamed.expert_store
    ids = torch.randint(0, kept.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, kept(ids).logits)
        caches = [ModelCache(m, batch=2, capacity=64) for m in (kept, streamed)]
        for m, c in zip((kept, streamed), caches):
            m(ids[:, :20], cache=c)
        for t in range(20, 30):
            a = kept(ids[:, t : t + 1], cache=caches[0]).logits
            b = streamed(ids[:, t : t + 1], cache=caches[1]).logits
            assert torch.equal(a, b)
    store.drain()
    assert store.bytes <= budget or len(store.cache) == 1  # one entry may exceed a budget smaller than it
    if budget < 10_000:
        assert store.stats["evictions"] > 0 and len(store.cache) <= 2
    else:
        assert store.stats["evictions"] == 0 and store.stats["hits"] > 0
    assert store.stats["read_bytes"] > 0 and store.stats["ahead_reads"] > 0


def test_read_ahead_guesses_are_counted_and_mostly_right_for_hash_layers(official):
    """The first layers are hash-routed: the guess from the token table is exact there."""
    model = load_official(official, max_resident_bytes=1 << 30).eval()
    store = model.expert_store
    hashed = [i for i, b in enumerate(model.layers) if b.ffn.gate.hash]
    assert hashed and hashed[0] == 0 and len(hashed) < len(model.layers)
    with torch.no_grad():
        model(torch.randint(0, model.cfg.vocab_size, (1, 12)))
    store.drain()
    assert 0 < store.stats["guessed_used"] <= store.stats["used_after_guess"]


def test_streamed_model_holds_no_expert(official):
    """The dense parts are resident; the experts live in the shards and the cache only."""
    full = load_official(official).eval()
    streamed = load_official(official, max_resident_bytes=1 << 20).eval()
    assert resident_bytes(streamed) <= resident_bytes(full) - _expert_bytes(full)
    assert streamed.expert_store.bytes == 0


def test_bad_budget_and_compile_are_refused(official, tmp_path, capsys):
    from dsv4.infer.engine import Engine

    with pytest.raises(ValueError, match="positive"):
        load_official(official, max_resident_bytes=0)
    model = load_official(official, max_resident_bytes=1 << 20)
    with pytest.raises(ValueError, match="--compile"):
        Engine(model, compile=True)


def test_generate_streams_experts_of_a_real_layout_directory(official, tmp_path, capsys):
    """`dsv4 generate --max-resident-gb` gives the same greedy text as the resident model; a bad value is
    one clear error."""
    import shutil

    from dsv4.data import train_tokenizer

    real = tmp_path / "real"
    shutil.copytree(official, real)
    train_tokenizer(["def f(x):\n    return x + 1\n" * 40], 512, real / "tokenizer.json", show_progress=False)
    outs = []
    for extra in ([], ["--max-resident-gb", "0.0001"]):
        args = ["generate", "--ckpt", str(real), "--prompt", "def", "--max-new-tokens", "8", "--temperature", "0"]
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def")
    assert main(["generate", "--ckpt", str(real), "--prompt", "x", "--max-resident-gb", "-1"]) != 0
    assert "--max-resident-gb" in capsys.readouterr().err
