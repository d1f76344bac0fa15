"""dsv4 (official DeepSeek checkpoint names) <-> transformers' DeepseekV4ForCausalLM layout.

Names follow the official-to-transformers correspondence of the released checkpoints; routed experts
are fused in transformers (gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2). transformers builds no
MTP block and ignores `mtp.*` keys on load, so they are carried through unchanged and the round trip
dsv4 -> transformers -> dsv4 is exact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv4.config import CSA_RATIO, ConfigError, ModelConfig
from dsv4.weights import load_state_dict, save_state_dict

TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# in-layer names, official -> transformers; the indexer's own compressor first (it is nested in HF)
LAYER = [
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.wkv", "self_attn.compressor.indexer.kv_proj"),
    ("attn.indexer.compressor.wgate", "self_attn.compressor.indexer.gate_proj"),
    ("attn.indexer.compressor.norm", "self_attn.compressor.indexer.kv_norm"),
    ("attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj"),
    ("attn.indexer.weights_proj", "self_attn.compressor.indexer.scorer.weights_proj"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.wkv", "self_attn.compressor.kv_proj"),
    ("attn.compressor.wgate", "self_attn.compressor.gate_proj"),
    ("attn.compressor.norm", "self_attn.compressor.kv_norm"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a", "self_attn.q_a_proj"),
    ("attn.wq_b", "self_attn.q_b_proj"),
    ("attn.q_norm", "self_attn.q_a_norm"),
    ("attn.wkv", "self_attn.kv_proj"),
    ("attn.kv_norm", "self_attn.kv_norm"),
    ("attn.wo_a", "self_attn.o_a_proj"),
    ("attn.wo_b", "self_attn.o_b_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.shared_experts.w1", "mlp.shared_experts.gate_proj"),
    ("ffn.shared_experts.w3", "mlp.shared_experts.up_proj"),
    ("ffn.shared_experts.w2", "mlp.shared_experts.down_proj"),
]
_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def _rename(suffix: str, table, src: int, dst: int) -> str:
    for pair in table:
        a = pair[src]
        if suffix == a or suffix.startswith(a + "."):
            return pair[dst] + suffix[len(a):]
    raise KeyError(f"no transformers name known for {suffix!r}")


def to_transformers_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out, experts = {}, {}
    for k, v in sd.items():
        if k in TOP:
            out[TOP[k]] = v
        elif k.startswith("mtp."):
            out[k] = v
        elif m := _EXPERT.match(k):
            experts[(int(m[1]), int(m[2]), m[3])] = v
        elif k.startswith("layers."):
            _, i, suffix = k.split(".", 2)
            out[f"model.layers.{i}.{_rename(suffix, LAYER, 0, 1)}"] = v
        else:
            raise KeyError(f"unexpected dsv4 tensor {k!r}")
    for i in range(cfg.num_hidden_layers):
        n = cfg.n_routed_experts
        if (i, 0, "w1") not in experts:
            continue
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(i, e, "w1")], experts[(i, e, "w3")]], 0) for e in range(n)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([experts[(i, e, "w2")] for e in range(n)])
    return out


def from_transformers_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    inv_top = {v: k for k, v in TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v
        elif k.startswith("mtp."):
            out[k] = v
        elif k.startswith("model.layers."):
            _, _, i, suffix = k.split(".", 3)
            if suffix == "mlp.experts.gate_up_proj":
                inter = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"layers.{i}.ffn.experts.{e}.w1.weight"] = v[e, :inter]
                    out[f"layers.{i}.ffn.experts.{e}.w3.weight"] = v[e, inter:]
            elif suffix == "mlp.experts.down_proj":
                for e in range(v.shape[0]):
                    out[f"layers.{i}.ffn.experts.{e}.w2.weight"] = v[e]
            else:
                out[f"layers.{i}.{_rename(suffix, LAYER, 1, 0)}"] = v
        elif "rotary_emb" in k:
            continue
        else:
            raise KeyError(f"unexpected transformers tensor {k!r}")
    return out


def to_transformers_config(cfg: ModelConfig):
    """A transformers DeepseekV4Config with the same maths (no DSA layers: transformers has none)."""
    from transformers import DeepseekV4Config

    kinds = cfg.layer_kinds
    if "dsa" in kinds:
        raise ConfigError("compress_ratios: DSA layers (ratio 1) have no transformers equivalent")
    hca = {cfg.compress_ratio(i) for i, k in enumerate(kinds) if k == "hca"}
    if len(hca) > 1:
        raise ConfigError(f"compress_ratios: transformers needs one HCA ratio for all layers, got {sorted(hca)}")
    names = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention"}
    layer_types = [names.get(cfg.compress_ratio(i), "heavily_compressed_attention") for i in range(len(kinds))]
    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "yarn", "factor": rs["factor"], "beta_fast": rs.get("beta_fast", 32),
                "beta_slow": rs.get("beta_slow", 1),
                "original_max_position_embeddings": rs["original_max_position_embeddings"]}
    fields = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
              "n_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
              "max_position_embeddings", "rope_theta", "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters",
              "hc_eps", "swiglu_limit", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads",
              "index_head_dim", "index_topk", "num_nextn_predict_layers", "rms_norm_eps", "tie_word_embeddings",
              "initializer_range", "bos_token_id", "eos_token_id")
    kw = {f: getattr(cfg, f) for f in fields}
    kw["mlp_layer_types"] = ["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(len(kinds))]
    return DeepseekV4Config(
        **kw, layer_types=layer_types,
        compress_rates={"compressed_sparse_attention": CSA_RATIO,
                        "heavily_compressed_attention": hca.pop() if hca else 128},
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim, rope_parameters=rope)


def from_transformers_config(hf_config) -> ModelConfig:
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    return ModelConfig.from_dict(d)


def convert_from_transformers_dir(src: str | Path, out: str | Path) -> ModelConfig:
    """transformers checkpoint dir (config.json + safetensors) -> dsv4 dir (config.json + model.safetensors)."""
    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_dict(json.loads((src / "config.json").read_text()))
    sd = from_transformers_state_dict(load_state_dict(src), cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, out)
    cfg.to_json(out / "config.json")
    return cfg


def convert_to_transformers_dir(src: str | Path, out: str | Path) -> None:
    """dsv4 dir -> transformers dir loadable with DeepseekV4ForCausalLM.from_pretrained."""
    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_json(src / "config.json")
    hf = to_transformers_config(cfg)
    hf.architectures = ["DeepseekV4ForCausalLM"]
    sd = to_transformers_state_dict(load_state_dict(src), cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, out)
    hf.save_pretrained(out)
