"""DeepSeek's shipped layout: FP8 projections, MXFP4 routed experts, shards with an index, read lazily and
checked whole. A tiny checkpoint with every layer kind and an MTP block is written here, in that layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import every_kind_model, randomize_, small_config

from dsv4.cli import main
from dsv4.convert.official import LayoutError, OfficialReader, load_official, official_state_dict, save_official
from dsv4.quant.formats import dequantize_state_dict
from dsv4.weights import INDEX, load_state_dict, save_state_dict


@pytest.fixture(scope="module")
def model():
    return every_kind_model()


@pytest.fixture(scope="module")
def official(model, tmp_path_factory):
    """The model in the shipped layout, split over several shards."""
    return save_official(model, tmp_path_factory.mktemp("official"), max_shard_bytes=200_000)


def test_the_layout_stores_each_tensor_as_shipped(official):
    index = json.loads((official / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 1  # several shards
    r = OfficialReader(official)
    assert (
        r.dtype("layers.1.ffn.experts.0.w1.weight") == "U8" and r.dtype("layers.1.ffn.experts.0.w1.scale") == "F8_E8M0"
    )
    assert r.dtype("layers.1.attn.wq_b.weight") == "F8_E4M3" and r.dtype("layers.1.attn.wq_b.scale") == "F8_E8M0"
    assert r.dtype("layers.1.ffn.shared_experts.w2.weight") == "F8_E4M3"
    assert r.dtype("embed.weight") == "BF16" and r.dtype("head.weight") == "BF16"
    assert r.dtype("layers.1.ffn.gate.weight") == "BF16" and r.dtype("layers.1.hc_attn_fn") == "F32"
    e = r.shape("layers.1.ffn.experts.0.w1.weight")
    assert r.shape("layers.1.ffn.experts.0.w1.scale") == (e[0], e[1] * 2 // 32)


def test_loading_equals_the_explicitly_dequantised_weights(model, official):
    """The loaded model computes exactly what the model does with its weights quantised and dequantised
    by the whole-dict twin (dsv4.quant.formats.dequantize_state_dict); every layer kind and MTP."""
    loaded = load_official(official).eval()
    ref = every_kind_model()
    ref.load_state_dict(dequantize_state_dict(official_state_dict(model)))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 48))
    with torch.no_grad():
        a, b = loaded(ids, return_mtp=True), ref.eval()(ids, return_mtp=True)
    assert torch.equal(a.logits, b.logits) and all(torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits))
    rel = ((a.logits - model(ids).logits).norm() / model(ids).logits.norm()).item()
    assert 0 < rel < 0.2  # quantisation changes the logits, and only a little


def test_save_load_save_is_bitwise(official, tmp_path):
    again = save_official(load_official(official), tmp_path / "again")
    a, b = dequantize_state_dict(load_state_dict(official)), dequantize_state_dict(load_state_dict(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_every_problem_is_listed_in_one_error(official, tmp_path):
    sd = load_state_dict(official)
    del sd["layers.0.attn.wkv.weight"], sd["layers.0.attn.wkv.scale"], sd["norm.weight"]
    sd["layers.2.attn_norm.weight"] = torch.zeros(3)
    sd["layers.0.attn.extra"] = torch.zeros(2)
    bad = tmp_path / "bad"
    save_state_dict(sd, bad)
    (bad / "config.json").write_text((official / "config.json").read_text())
    with pytest.raises(LayoutError) as e:
        load_official(bad)
    msg = str(e.value)
    assert "4 tensor(s) do not fit config.json" in msg
    assert "missing layers.0.attn.wkv.weight (expected [" in msg and "missing norm.weight" in msg
    assert "layers.2.attn_norm.weight: expected [64], found [3]" in msg
    assert "unexpected layers.0.attn.extra ([2])" in msg


def test_a_corrupt_shard_is_one_clear_error(official, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(official, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LayoutError, match="corrupt or unreadable safetensors file"):
        load_official(broken)
    assert main(["info", "--config", str(broken / "config.json")]) == 0  # the config itself is fine


def test_the_commands_write_and_read_the_layout(model, official, tmp_path, capsys):
    """--from-official writes a dsv4 model directory; --to-official writes the layout back; a model
    directory in the layout loads wherever dsv4 loads a model (weights.load_model)."""
    from dsv4.weights import load_model

    assert main(["convert", "--from-official", str(official), str(tmp_path / "plain"), "--dtype", "fp32"]) == 0
    plain = load_model(tmp_path / "plain")
    assert main(["convert", "--to-official", str(tmp_path / "plain"), str(tmp_path / "back")]) == 0
    ids = torch.randint(0, model.cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "back").eval()(ids).logits, plain.eval()(ids).logits)
        assert torch.equal(load_model(official).eval()(ids).logits, plain(ids).logits)
    # V4.1's 32 x 32 FP8 blocks: written on request, read back by the block size of their scales
    assert main(["convert", "--to-official", str(tmp_path / "plain"), str(tmp_path / "v41"), "--fp8-block", "32"]) == 0
    from dsv4.convert.official import OfficialReader

    w, sc = (OfficialReader(tmp_path / "v41").shape(f"layers.1.attn.wq_b.{p}") for p in ("weight", "scale"))
    assert sc == (-(-w[0] // 32), -(-w[1] // 32))
    with torch.no_grad():
        rel = (load_model(tmp_path / "v41").eval()(ids).logits - plain(ids).logits).norm() / plain(ids).logits.norm()
    assert rel < 0.05  # requantised in finer blocks: close to the plain model, not equal


def test_transformers_reads_the_converted_checkpoint(tmp_path):
    """Official layout -> dsv4 -> transformers' DeepseekV4ForCausalLM: the same logits (transformers has no
    DSA layer kind, so this model has swa, csa, hca and an MTP block)."""
    transformers = pytest.importorskip("transformers")
    from dsv4.convert.transformers import convert_to_transformers_dir
    from dsv4.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(small_config())
    randomize_(model)
    official = save_official(model, tmp_path / "official", max_shard_bytes=200_000)
    assert main(["convert", "--from-official", str(official), str(tmp_path / "plain"), "--dtype", "fp32"]) == 0
    convert_to_transformers_dir(tmp_path / "plain", tmp_path / "hf")
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours = load_official(official).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_kept_quantised_weights_compute_what_the_dequantised_model_does(model, official):
    """FP8 projections and MXFP4 experts stay in their format in memory (a fraction of the bytes) and give
    the dequantised model's logits, prefill and cached decode, fp32 and bf16."""
    from dsv4.infer.cache import ModelCache
    from dsv4.quant.execution import FP8Linear, MXFP4Experts, resident_bytes

    full = load_official(official).eval()
    kept = load_official(official, keep_quantized=True).eval()
    assert any(isinstance(m, FP8Linear) for m in kept.modules())
    assert any(isinstance(m, MXFP4Experts) for m in kept.modules())
    assert resident_bytes(kept) < 0.5 * resident_bytes(full)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = kept(ids).logits, full(ids).logits
        assert ((a - b).norm() / b.norm()).item() < 1e-5
        cache = ModelCache(kept, batch=2, capacity=64)
        pre = kept(ids[:, :39], cache=cache).logits
        step = kept(ids[:, 39:], cache=cache).logits
        assert ((step[:, -1] - a[:, -1]).norm() / a[:, -1].norm()).item() < 1e-5 and pre.shape[1] == 39
        kb, fb = kept.to(torch.bfloat16), full.to(torch.bfloat16)
        assert ((kb(ids).logits.float() - fb(ids).logits.float()).norm() / b.norm()).item() < 1e-2


def test_generate_runs_a_real_layout_directory_kept_quantised(model, official, tmp_path, capsys):
    """`dsv4 generate --ckpt DIR --keep-quantized` on a directory in the shipped layout with a tokenizer.json:
    the same greedy text as the dequantised model."""
    import shutil

    from dsv4.data import train_tokenizer

    real = tmp_path / "real"
    shutil.copytree(official, real)
    train_tokenizer(
        ["def f(x):\n    return x + 1\n" * 40], model.cfg.vocab_size, real / "tokenizer.json", show_progress=False
    )
    outs = []
    for extra in ([], ["--keep-quantized"]):
        args = ["generate", "--ckpt", str(real), "--prompt", "def", "--max-new-tokens", "8", "--temperature", "0"]
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def")
