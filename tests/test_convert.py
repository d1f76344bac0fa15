"""Round trips: dsv4 <-> safetensors, dsv4 dir -> transformers dir -> dsv4 dir, and the CLI-facing functions."""

import json

import pytest
import torch
from conftest import randomize_, small_config

from dsv4.config import ModelConfig
from dsv4.convert.transformers import DSV4_CONFIG, convert_from_transformers_dir, convert_to_transformers_dir
from dsv4.model.transformer import Transformer
from dsv4.weights import load_model, load_state_dict, save_model, save_state_dict


def test_safetensors_round_trip(tmp_path):
    model = Transformer(small_config())
    sd = model.state_dict()
    save_state_dict(sd, tmp_path / "single")
    save_state_dict(sd, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for d in ("single", "sharded"):
        back = load_state_dict(tmp_path / d)
        assert back.keys() == sd.keys()
        assert all(torch.equal(sd[k], back[k]) and sd[k].dtype == back[k].dtype for k in sd)


def test_save_load_model_same_logits(tmp_path):
    cfg = small_config()
    model = Transformer(cfg).eval()
    randomize_(model)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 70))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = Transformer(small_config())
    save_model(model, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path)


def test_dir_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = small_config()
    model = Transformer(cfg).eval()
    randomize_(model)
    save_model(model, tmp_path / "dsv4")
    convert_to_transformers_dir(tmp_path / "dsv4", tmp_path / "hf")
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 120))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(ids).logits
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5
    back_cfg = convert_from_transformers_dir(tmp_path / "hf", tmp_path / "back")
    assert back_cfg.to_dict() == cfg.to_dict()  # every field, the MTP entry of compress_ratios included
    assert ModelConfig.from_json(tmp_path / "back").to_dict() == ModelConfig.from_json(tmp_path / "dsv4").to_dict()
    assert cfg.compress_ratios == [0, 4, 16, 4, 0] and cfg.torch_dtype == "float32"
    a, b = load_state_dict(tmp_path / "dsv4"), load_state_dict(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = load_model(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_config_states_the_weights_dtype(tmp_path, dtype):
    """config.json says the dtype the weights have (not a default bfloat16), and a round trip keeps every
    field of a config with non-default dsv4-only settings."""
    pytest.importorskip("transformers")
    cfg = small_config(mtp_loss_weight=0.5, seq_aux_loss_alpha=3e-4, topk_method="greedy")
    save_model(Transformer(cfg).to(dtype), tmp_path / "dsv4")
    convert_to_transformers_dir(tmp_path / "dsv4", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["dtype"] == str(dtype).removeprefix("torch.") and "compress_ratios" not in hf
    back = convert_from_transformers_dir(tmp_path / "hf", tmp_path / "back")
    assert back.to_dict() == cfg.to_dict()
    a, b = load_state_dict(tmp_path / "dsv4"), load_state_dict(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_a_transformers_folder_without_the_dsv4_config(tmp_path):
    """A folder from elsewhere (no dsv4_config.json): the config comes from config.json, torch_dtype from the
    weights; an edited config.json wins over a stale dsv4_config.json."""
    pytest.importorskip("transformers")
    save_model(Transformer(small_config()), tmp_path / "dsv4")
    convert_to_transformers_dir(tmp_path / "dsv4", tmp_path / "hf")
    (tmp_path / "hf" / DSV4_CONFIG).unlink()
    back = convert_from_transformers_dir(tmp_path / "hf", tmp_path / "back")
    assert back.torch_dtype == "float32" and back.compress_ratios == [0, 4, 16, 4]
    stale = small_config(sliding_window=8)
    stale.to_json(tmp_path / "hf" / DSV4_CONFIG)
    with pytest.warns(UserWarning, match="does not match"):
        again = convert_from_transformers_dir(tmp_path / "hf", tmp_path / "again")
    assert again.sliding_window == 16


def test_load_model_rebuilds_every_buffer_no_checkpoint_holds(tmp_path):
    """Rope frequencies of every rotary (main, compressed, each layer's entry rope), canonical ids: the
    buffers that are not saved equal a freshly built model's (they were zeros when built on meta)."""
    cfg = small_config()
    model = Transformer(cfg).eval()
    randomize_(model)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    fresh = dict(Transformer(cfg).named_buffers())
    saved = set(model.state_dict())
    unsaved = {n: b for n, b in loaded.named_buffers() if n not in saved}
    assert any(n.endswith("entry_rope.inv_freq") for n in unsaved)
    for n, b in unsaved.items():
        assert torch.equal(b, fresh[n]), n
