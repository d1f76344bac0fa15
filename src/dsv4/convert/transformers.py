"""dsv4 (official DeepSeek checkpoint names) <-> transformers' DeepseekV4ForCausalLM layout.

Names follow the official-to-transformers correspondence of the released checkpoints; routed experts
are fused in transformers (gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2). transformers builds no
MTP block and ignores `mtp.*` keys on load, so they are carried through unchanged.

A transformers folder written here also holds the run's tokenizer (tokenizer.json + tokenizer_config.json,
loadable with AutoTokenizer) and dsv4_config.json, the exact dsv4 config (fields transformers has no name
for, such as the MTP entries of compress_ratios), so the round trip dsv4 -> transformers -> dsv4 gives the
same config and weights. A dsv4 folder written here (config.json, model.safetensors, tokenizer.json) loads
with `dsv4 generate / chat / serve / info`.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter
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
# config fields transformers' DeepseekV4Config has under the same name
FIELDS = (
    "vocab_size",
    "hidden_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "q_lora_rank",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
    "scoring_func",
    "norm_topk_prob",
    "routed_scaling_factor",
    "max_position_embeddings",
    "rope_theta",
    "compress_rope_theta",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "swiglu_limit",
    "sliding_window",
    "o_groups",
    "o_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "num_nextn_predict_layers",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)
DSV4_CONFIG = "dsv4_config.json"  # the exact dsv4 config, beside a transformers config.json
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def _rename(suffix: str, table, src: int, dst: int) -> str:
    for pair in table:
        a = pair[src]
        if suffix == a or suffix.startswith(a + "."):
            return pair[dst] + suffix[len(a) :]
    raise ValueError(f"no transformers name known for {suffix!r}")


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
            raise ValueError(f"unexpected dsv4 tensor {k!r}")
    for i in range(cfg.num_hidden_layers):
        n = cfg.n_routed_experts
        if (i, 0, "w1") not in experts:
            continue
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(i, e, "w1")], experts[(i, e, "w3")]], 0) for e in range(n)]
        )
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
            raise ValueError(f"unexpected transformers tensor {k!r}")
    return out


def to_transformers_config(cfg: ModelConfig, dtype: str | None = None):
    """A transformers DeepseekV4Config with the same maths (no DSA layers: transformers has none); `dtype`:
    the weights' dtype name (default: cfg.torch_dtype)."""
    try:
        from transformers import DeepseekV4Config
    except ModuleNotFoundError as e:
        raise RuntimeError(
            f"converting to transformers needs the transformers package ({e}); pip install 'transformers==5.24.0'"
        ) from None

    kinds = cfg.layer_kinds
    if "dsa" in kinds:
        raise ConfigError("compress_ratios: DSA layers (ratio 1) have no transformers equivalent")
    if cfg.engram_layer_ids:
        raise ConfigError("engram_layer_ids: Engram layers have no transformers equivalent")
    if cfg.hc_mode != "mhc":
        raise ConfigError(f"hc_mode={cfg.hc_mode!r}: only mHC residual streams have a transformers equivalent")
    hca = {cfg.compress_ratio(i) for i, k in enumerate(kinds) if k == "hca"}
    if len(hca) > 1:
        raise ConfigError(f"compress_ratios: transformers needs one HCA ratio for all layers, got {sorted(hca)}")
    names = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention"}
    layer_types = [names.get(cfg.compress_ratio(i), "heavily_compressed_attention") for i in range(len(kinds))]
    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {
            "rope_type": "yarn",
            "factor": rs["factor"],
            "beta_fast": rs.get("beta_fast", 32),
            "beta_slow": rs.get("beta_slow", 1),
            "original_max_position_embeddings": rs["original_max_position_embeddings"],
        }
    kw = {f: getattr(cfg, f) for f in FIELDS}
    kw["mlp_layer_types"] = ["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(len(kinds))]
    return DeepseekV4Config(
        **kw,
        layer_types=layer_types,
        dtype=dtype or cfg.torch_dtype,
        compress_rates={
            "compressed_sparse_attention": CSA_RATIO,
            "heavily_compressed_attention": hca.pop() if hca else 128,
        },
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim,
        rope_parameters=rope,
    )


def transformers_config_dict_to_ours(d: dict) -> dict:
    """Map a transformers DeepseekV4Config dict (layer_types, compress_rates, rope_parameters) to our field
    names; ModelConfig.from_dict calls it for a transformers config (see is_transformers_config)."""
    d = dict(d)
    rates = d.pop("compress_rates", None) or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    kind_ratio = {
        "sliding_attention": 0,
        "compressed_sparse_attention": rates["compressed_sparse_attention"],
        "heavily_compressed_attention": rates["heavily_compressed_attention"],
    }
    if kind_ratio["compressed_sparse_attention"] != CSA_RATIO:
        raise ConfigError("compress_rates: the CSA rate must be 4 (official rule: ratio 4 <=> CSA)")
    d["compress_ratios"] = [kind_ratio[t] for t in d.pop("layer_types")]
    mlp = d.pop("mlp_layer_types", None)
    if mlp is not None:
        d["num_hash_layers"] = sum(1 for t in mlp if t == "hash_moe")
    rp = d.pop("rope_parameters", None) or {}
    if isinstance(rp.get("main"), dict):
        d["rope_theta"] = rp["main"].get("rope_theta", d.get("rope_theta", 10000.0))
        comp = rp.get("compress", {})
        d["compress_rope_theta"] = comp.get("rope_theta", d.get("compress_rope_theta", 160000.0))
        if comp.get("rope_type") == "yarn":
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": comp["factor"],
                "original_max_position_embeddings": comp["original_max_position_embeddings"],
                "beta_fast": comp.get("beta_fast", 32),
                "beta_slow": comp.get("beta_slow", 1),
            }
        else:
            d["rope_scaling"] = None
        prf = comp.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if prf is not None:
            d["qk_rope_head_dim"] = round(d["head_dim"] * prf)
    for k in (
        "partial_rotary_factor",
        "model_type",
        "architectures",
        "transformers_version",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "use_cache",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "attention_dropout",
        "dtype",
        "num_local_experts",
        "intermediate_size",
    ):
        d.pop(k, None)
    return d


def is_transformers_config(d) -> bool:
    """Whether a config dict is transformers' DeepseekV4Config or DeepseekV32Config (layer_types, no
    compress_ratios)."""
    return isinstance(d, dict) and "layer_types" in d and "compress_ratios" not in d


def from_transformers_config(hf_config) -> ModelConfig:
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    dtype = d.get("dtype") or d.get("torch_dtype")
    cfg = ModelConfig.from_dict(d)
    if isinstance(dtype, str):
        cfg.torch_dtype = dtype.removeprefix("torch.")
    return cfg


def is_transformers_folder(path: str | Path) -> bool:
    """Whether `path` holds a transformers DeepseekV4 config.json (layer_types, no compress_ratios)."""
    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return is_transformers_config(d)


def weights_dtype(sd: dict[str, torch.Tensor]) -> str | None:
    """The float dtype holding most of the weights, as a config name ("float32", "bfloat16", ...)."""
    counts = Counter()
    for v in sd.values():
        if v.dtype in WEIGHT_DTYPES:
            counts[v.dtype] += v.numel()
    return str(counts.most_common(1)[0][0]).removeprefix("torch.") if counts else None


def _saved_dsv4_config(src: Path, mapped: ModelConfig) -> ModelConfig | None:
    """The exact dsv4 config an export left beside config.json, when it still describes the same model."""
    path = src / DSV4_CONFIG
    if not path.exists():
        return None
    saved = ModelConfig.from_json(path)
    n = mapped.num_hidden_layers
    same = (
        all(getattr(saved, f) == getattr(mapped, f) for f in (*FIELDS, "num_hash_layers", "qk_rope_head_dim"))
        and saved.compress_ratios[:n] == mapped.compress_ratios[:n]
    )
    if not same:
        warnings.warn(f"{path} does not match {src / 'config.json'}; using config.json", stacklevel=2)
    return saved if same else None


def convert_from_transformers_dir(src: str | Path, out: str | Path) -> ModelConfig:
    """transformers checkpoint dir -> dsv4 model dir (config.json, model.safetensors, and tokenizer.json when
    the source has one), loadable by dsv4.run.load_run."""
    from dsv4.run import find_checkpoint

    src, out = Path(src), Path(out)
    if not is_transformers_folder(src):
        try:
            find_checkpoint(src)
        except ValueError:
            raise ConfigError(f"{src} is not a transformers model folder (no config.json with layer_types)") from None
        raise ConfigError(f"{src} is a dsv4 checkpoint, not a transformers model folder; use --to-transformers")
    mapped = from_transformers_config(json.loads((src / "config.json").read_text()))
    if mapped.is_v32:
        from dsv4.convert.v32 import from_hub_state_dict

        sd = from_hub_state_dict(load_state_dict(src), mapped)
    else:
        sd = from_transformers_state_dict(load_state_dict(src), mapped)
    cfg = _saved_dsv4_config(src, mapped)
    if cfg is None:
        cfg = mapped
        cfg.torch_dtype = weights_dtype(sd) or cfg.torch_dtype
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, out)
    cfg.to_json(out / "config.json")
    if (src / "tokenizer.json").exists():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    return cfg


def convert_to_transformers_dir(src: str | Path, out: str | Path) -> Path | None:
    """dsv4 run, checkpoint or model dir -> transformers dir loadable with DeepseekV4ForCausalLM.from_pretrained
    (and AutoTokenizer when the run has a tokenizer). Returns the tokenizer.json copied, or None."""
    from dsv4.data import load_tokenizer
    from dsv4.run import find_checkpoint, run_folder

    ckpt = find_checkpoint(src)
    cfg = ModelConfig.from_json(ckpt / "config.json")
    weights = load_state_dict(ckpt)
    if cfg.is_v32:  # the V3.2 family: DeepseekV32ForCausalLM (dsv4.convert.v32)
        from dsv4.convert import v32

        hf = v32.to_transformers_config(cfg, dtype=weights_dtype(weights))
        hf.architectures = ["DeepseekV32ForCausalLM"]
        sd = v32.to_hub_state_dict(weights, cfg, fuse_experts=True)
    else:
        hf = to_transformers_config(cfg, dtype=weights_dtype(weights))
        hf.architectures = ["DeepseekV4ForCausalLM"]
        sd = to_transformers_state_dict(weights, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, out)
    hf.save_pretrained(out)
    cfg.to_json(out / DSV4_CONFIG)
    tok = run_folder(ckpt) / "tokenizer.json"
    if not tok.exists():
        return None
    shutil.copyfile(tok, out / "tokenizer.json")
    vocab = load_tokenizer(tok)
    special = {
        name: vocab.id_to_token(i)
        for name, i in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id))
        if i is not None
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special,
                "model_max_length": cfg.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    return tok
