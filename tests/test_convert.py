"""Round trips: dsv4 <-> safetensors, dsv4 dir -> transformers dir -> dsv4 dir, and the CLI-facing functions."""
import pytest
import torch

from dsv4.convert.transformers import convert_from_transformers_dir, convert_to_transformers_dir
from dsv4.model.transformer import Transformer
from dsv4.weights import load_model, load_state_dict, save_model, save_state_dict

from conftest import randomize_, small_config


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
    assert back_cfg.compress_ratios[: cfg.num_hidden_layers] == cfg.compress_ratios[: cfg.num_hidden_layers]
    a, b = load_state_dict(tmp_path / "dsv4"), load_state_dict(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = load_model(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)
