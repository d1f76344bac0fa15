"""ModelConfig: presets, json round trip, unknown fields, validation errors that name the field."""

from __future__ import annotations

import json
import warnings

import pytest

from dsv4 import ConfigError, ModelConfig
from dsv4.config import available_presets


def official_v4_flash_dict() -> dict:
    """config.json in the official (DeepSeek HF repo) style, with V3-era keys dsv4 does not model."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
        "compress_rope_theta": 160000,
        "first_k_dense_replace": 0,
        "hc_eps": 1e-6,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": 512,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "index_head_dim": 128,
        "index_n_heads": 64,
        "index_topk": 512,
        "initializer_range": 0.02,
        "max_position_embeddings": 1048576,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 6,
        "num_hash_layers": 3,
        "num_hidden_layers": 43,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": 1,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "q_lora_rank": 1024,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": 128,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "vocab_size": 129280,
        "n_group": 8,  # V3-era grouped routing keys: unknown to dsv4, kept verbatim
        "topk_group": 4,
    }


def test_presets_load():
    names = available_presets()
    assert {"tiny", "v4-flash", "v4-pro"} <= set(names)
    for name in names:
        cfg = ModelConfig.preset(name)
        assert isinstance(cfg, ModelConfig)
        assert len(cfg.layer_kinds) == cfg.num_hidden_layers
    flash, pro = ModelConfig.preset("v4-flash"), ModelConfig.preset("v4-pro")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.n_routed_experts, flash.index_topk) == (
        4096,
        43,
        256,
        512,
    )
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    assert flash.compress_ratios == [0, 0] + [4, 128] * 20 + [4, 0]
    assert pro.compress_ratios == [128, 128] + [4, 128] * 29 + [4, 0]
    assert flash.layer_kinds[:4] == ["swa", "swa", "csa", "hca"]
    assert flash.layer_kind(43) == "swa"  # the MTP entry
    with pytest.raises(ConfigError, match="no-such-preset"):
        ModelConfig.preset("no-such-preset")


def test_layer_kind_mapping():
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=5, num_hash_layers=1, compress_ratios=[0, 4, 16, 1, 128])
    assert cfg.layer_kinds == ["swa", "csa", "hca", "dsa", "hca"]
    assert cfg.compress_ratio(5) == 0  # MTP layers beyond the list are SWA


@pytest.mark.parametrize("name", ["tiny", "v4-flash", "v4-pro"])
def test_json_round_trip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    path = tmp_path / "config.json"
    text = cfg.to_json(path)
    assert json.loads(text) == json.loads(path.read_text())
    back = ModelConfig.from_json(path)
    assert back == cfg
    assert ModelConfig.from_json(tmp_path) == cfg  # a directory means its config.json
    assert back.to_json() == text


def test_unknown_fields_kept_written_back_and_warned(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d["zz_test_unknown_field"] = {"nested": [1, 2]}
    d["zz_test_other"] = "x"
    with pytest.warns(UserWarning, match="zz_test_unknown_field"):
        cfg = ModelConfig.from_dict(d)
    assert cfg.extra == {"zz_test_unknown_field": {"nested": [1, 2]}, "zz_test_other": "x"}
    path = tmp_path / "config.json"
    cfg.to_json(path)
    written = json.loads(path.read_text())
    assert written["zz_test_unknown_field"] == {"nested": [1, 2]} and written["zz_test_other"] == "x"
    assert "extra" not in written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ModelConfig.from_json(path)
    assert again == cfg
    # replace keeps them
    assert cfg.replace(hidden_size=128).extra == cfg.extra


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_attention_heads=6, o_groups=4), "o_groups"),
        (dict(num_hidden_layers=4, num_hash_layers=1, compress_ratios=[0, 4, 16]), "compress_ratios"),
        (dict(num_hidden_layers=4, num_hash_layers=1, compress_ratios=[0, 4, 16, 4, 0, 0]), "compress_ratios"),
        (dict(index_topk=0), "index_topk"),
        (dict(index_topk=-3), "index_topk"),
        (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (
            dict(num_hidden_layers=4, num_hash_layers=1, num_nextn_predict_layers=1, compress_ratios=[0, 4, 16, 4, 4]),
            "compress_ratios",
        ),  # the MTP entry must be 0
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ],
)
def test_impossible_configs_raise_naming_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.preset("tiny").replace(**overrides)


def test_impossible_config_from_dict_raises():
    d = ModelConfig.preset("tiny").to_dict()
    d["o_groups"] = 3
    with pytest.raises(ConfigError, match="o_groups"):
        ModelConfig.from_dict(d)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_replace_unknown_field_raises_naming_it():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ConfigError, match="hiden_size"):
        cfg.replace(hiden_size=64)
    before = cfg.hidden_size
    new = cfg.replace(hidden_size=before * 2)
    assert new.hidden_size == before * 2 and cfg.hidden_size == before  # original untouched


def test_official_v4_flash_config_loads(tmp_path):
    d = official_v4_flash_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="topk_group"):
        cfg = ModelConfig.from_json(path)
    flash = ModelConfig.preset("v4-flash")
    for f in (
        "hidden_size",
        "num_hidden_layers",
        "compress_ratios",
        "index_topk",
        "o_groups",
        "num_hash_layers",
        "rope_scaling",
        "quantization_config",
        "topk_method",
        "first_k_dense_replace",
        "torch_dtype",
        "routed_scaling_factor",
        "scoring_func",
        "swiglu_limit",
        "sliding_window",
    ):
        assert getattr(cfg, f) == getattr(flash, f), f
    assert cfg.quantization_config["weight_block_size"] == [128, 128]
    for k in (
        "architectures",
        "model_type",
        "transformers_version",
        "use_cache",
        "n_group",
        "topk_group",
        "attention_bias",
        "attention_dropout",
    ):
        assert cfg.extra[k] == d[k], k
    # every original key is written back with its value (dsv4 adds its own training constants)
    written = json.loads(cfg.to_json())
    original = json.loads(json.dumps(d))
    assert {k: written.get(k) for k in original} == original
    assert set(written) - set(original) <= {"seq_aux_loss_alpha", "bias_update_speed", "mtp_loss_weight"}


def test_bad_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)


def test_transformers_style_dict_maps_layer_types():
    d = {
        "model_type": "deepseek_v4",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "layer_types": [
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
        ],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {
                "rope_type": "yarn",
                "rope_theta": 160000.0,
                "factor": 16,
                "original_max_position_embeddings": 65536,
                "partial_rotary_factor": 0.125,
            },
        },
        "head_dim": 512,
    }
    cfg = ModelConfig.from_dict(d)
    assert cfg.compress_ratios == [0, 4, 16, 4]
    assert cfg.layer_kinds == ["swa", "csa", "hca", "csa"]
    assert cfg.num_hash_layers == 1
    assert cfg.rope_scaling["type"] == "yarn" and cfg.qk_rope_head_dim == 64
