"""DeepSeek-V3.2 checkpoint names: dsv4 (the official inference names, inference/model.py) <-> the names the
V3.2 release ships on the Hub (`model.layers.N.self_attn.*`, per-expert `mlp.experts.E.*`, the MTP block as
layer num_hidden_layers + k, FP8 weights with `weight_scale_inv`) <-> transformers' DeepseekV32ForCausalLM
(the Hub names with the routed experts fused: gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2; no MTP).
The correspondence is the one the official convert.py applies (docs/architecture.md, "The V3.2 family").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv4.config import ModelConfig

TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# in-layer names, dsv4 -> Hub / transformers (longest dsv4 prefix first where one is a prefix of another)
LAYER = [
    ("attn.indexer.wq_b", "self_attn.indexer.wq_b"),
    ("attn.indexer.wk", "self_attn.indexer.wk"),
    ("attn.indexer.k_norm", "self_attn.indexer.k_norm"),
    ("attn.indexer.weights_proj", "self_attn.indexer.weights_proj"),
    ("attn.wq_a", "self_attn.q_a_proj"),
    ("attn.q_norm", "self_attn.q_a_layernorm"),
    ("attn.wq_b", "self_attn.q_b_proj"),
    ("attn.wkv_a", "self_attn.kv_a_proj_with_mqa"),
    ("attn.kv_norm", "self_attn.kv_a_layernorm"),
    ("attn.wkv_b", "self_attn.kv_b_proj"),
    ("attn.wo", "self_attn.o_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.shared_experts.w1", "mlp.shared_experts.gate_proj"),
    ("ffn.shared_experts.w2", "mlp.shared_experts.down_proj"),
    ("ffn.shared_experts.w3", "mlp.shared_experts.up_proj"),
    ("ffn.w1", "mlp.gate_proj"),
    ("ffn.w2", "mlp.down_proj"),
    ("ffn.w3", "mlp.up_proj"),
    ("enorm", "enorm"),
    ("hnorm", "hnorm"),
    ("eh_proj", "eh_proj"),
    ("norm", "shared_head.norm"),
    ("embed", "embed_tokens"),
    ("head", "shared_head.head"),
]
EXPERT_HUB = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_HUB_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.(weight|weight_scale_inv)$")


def _rename(suffix: str, src: int, dst: int) -> str:
    for pair in LAYER:
        a = pair[src]
        if suffix == a or suffix.startswith(a + "."):
            return pair[dst] + suffix[len(a) :]
    raise ValueError(f"no V3.2 name known for {suffix!r}")


def _split(name: str, cfg: ModelConfig) -> tuple[str, int, str] | None:
    """dsv4 'layers.i.rest' / 'mtp.k.rest' -> (kind, Hub layer number, rest)."""
    head, i, rest = name.split(".", 2)
    if head == "layers":
        return head, int(i), rest
    if head == "mtp":
        return head, cfg.num_hidden_layers + int(i), rest
    return None


def to_hub_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, fuse_experts: bool = False) -> dict:
    """dsv4 names -> the Hub's (fuse_experts=False, MTP kept as layer n + k) or transformers' (fuse_experts=True,
    MTP dropped: transformers builds none)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, int, str], torch.Tensor] = {}
    for k, v in sd.items():
        if k in TOP:
            out[TOP[k]] = v
            continue
        parts = _split(k, cfg)
        if parts is None:
            raise ValueError(f"unexpected dsv4 tensor {k!r}")
        kind, i, rest = parts
        if kind == "mtp" and fuse_experts:
            continue
        if m := _EXPERT.match(rest):
            if fuse_experts:
                fused[(i, int(m[1]), m[2])] = v
            else:
                out[f"model.layers.{i}.mlp.experts.{m[1]}.{EXPERT_HUB[m[2]]}.weight"] = v
            continue
        out[f"model.layers.{i}.{_rename(rest, 0, 1)}"] = v
    for i in sorted({i for i, _, _ in fused}):
        n = cfg.n_routed_experts
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([fused[(i, e, "w1")], fused[(i, e, "w3")]], 0) for e in range(n)]
        )
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([fused[(i, e, "w2")] for e in range(n)])
    return out


def from_hub_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hub's or transformers' names -> dsv4's. FP8 weights must be dequantised first (dsv4.convert.v32
    callers pair `weight_scale_inv` with its weight); rotary buffers are skipped."""
    inv_top = {v: k for k, v in TOP.items()}
    out: dict[str, torch.Tensor] = {}
    n = cfg.num_hidden_layers
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        if "rotary_emb" in k:
            continue
        if not k.startswith("model.layers."):
            raise ValueError(f"unexpected V3.2 tensor {k!r}")
        _, _, i_s, rest = k.split(".", 3)
        i = int(i_s)
        prefix = f"layers.{i}" if i < n else f"mtp.{i - n}"
        if i >= n + cfg.num_nextn_predict_layers:
            raise ValueError(f"{k!r}: layer {i} is beyond the config's {n} layers + {cfg.num_nextn_predict_layers} MTP")
        if rest == "mlp.experts.gate_up_proj":
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.ffn.experts.{e}.w1.weight"] = v[e, :inter]
                out[f"{prefix}.ffn.experts.{e}.w3.weight"] = v[e, inter:]
        elif rest == "mlp.experts.down_proj":
            for e in range(v.shape[0]):
                out[f"{prefix}.ffn.experts.{e}.w2.weight"] = v[e]
        elif m := _HUB_EXPERT.match(rest):
            w = {h: d for d, h in EXPERT_HUB.items()}[m[2]]
            out[f"{prefix}.ffn.experts.{m[1]}.{w}.weight"] = v
        else:
            out[f"{prefix}.{_rename(rest, 1, 0)}"] = v
    return out


# ------------------------------------------------------------------------------ configs
HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_shared_experts",
    "n_routed_experts",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "norm_topk_prob",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "index_topk",
    "index_head_dim",
    "index_n_heads",
    "first_k_dense_replace",
)
_HF_ONLY = (
    "layer_types",
    "mlp_layer_types",
    "head_dim",
    "architectures",
    "transformers_version",
    "use_cache",
    "pad_token_id",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "hidden_act",
    "dtype",
    "qk_head_dim",
    "output_router_logits",
    "router_aux_loss_coef",
)


def config_dict_from_transformers(d: dict) -> dict:
    """transformers' DeepseekV32Config dict (rope_parameters, layer_types, head_dim = rope dims) -> the V3.2
    config.json names ModelConfig.from_dict reads (rope_theta, rope_scaling, qk_nope_head_dim)."""
    d = dict(d)
    d.setdefault("num_nextn_predict_layers", 0)  # transformers builds no MTP block
    rp = d.pop("rope_parameters", None) or {}
    d["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") == "yarn":
        d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rp.items() if k not in ("rope_type", "rope_theta")}}
    else:
        d["rope_scaling"] = None
    mlp = d.get("mlp_layer_types")
    if mlp is not None:
        d["first_k_dense_replace"] = sum(1 for t in mlp if t == "dense")
    if isinstance(d.get("dtype"), str):
        d["torch_dtype"] = d["dtype"].removeprefix("torch.")
    for k in _HF_ONLY:
        d.pop(k, None)
    return d


def is_transformers_v32_config(d: object) -> bool:
    return isinstance(d, dict) and d.get("model_type") == "deepseek_v32" and "rope_parameters" in d


def to_transformers_config(cfg: ModelConfig, dtype: str | None = None):
    """A transformers DeepseekV32Config with the same maths. transformers builds no MTP block."""
    try:
        from transformers import DeepseekV32Config
    except ModuleNotFoundError as e:
        raise RuntimeError(
            f"converting to transformers needs the transformers package ({e}); pip install 'transformers==5.24.0'"
        ) from None
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "yarn":
        rs = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **rs}
    kw = {f: getattr(cfg, f) for f in HF_FIELDS}
    return DeepseekV32Config(**kw, rope_parameters=rope, dtype=dtype or cfg.torch_dtype)


# ------------------------------------------------------------------------------ the shipped layout
SCALE = "weight_scale_inv"  # the Hub's FP8 scale name: w = fp8 * scale per 128 x 128 block


def _ships_fp8(name: str, t: torch.Tensor) -> bool:
    """FP8 in the V3.2 release: 2-D projection weights (routed and shared experts, dense FFNs, attention,
    the indexer's wq_b and wk, the MTP eh_proj), not the embedding, head, router or indexer weights_proj."""
    if t.dim() != 2 or not name.endswith(".weight") or name in ("embed.weight", "head.weight"):
        return False
    return not (name.endswith("ffn.gate.weight") or name.endswith("indexer.weights_proj.weight"))


def hub_state_dict(model, fp8_block: int = 128) -> dict[str, torch.Tensor]:
    """The model's tensors as the V3.2 release ships them: Hub names, FP8 e4m3 projections with an fp32
    `weight_scale_inv` per block, the rest bf16 (the routing bias fp32), and each MTP layer's copies of the
    embedding and head."""
    from dsv4.quant.formats import quant_fp8_block

    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if _ships_fp8(name, t):
            codes, scale = quant_fp8_block(t, fp8_block)
            sd[name] = codes
            sd[name[: -len("weight")] + SCALE] = scale.float()
        else:
            sd[name] = t if name.endswith("gate.bias") else t.to(torch.bfloat16)
    hub = to_hub_state_dict({k: v for k, v in sd.items() if not k.endswith(SCALE)}, cfg)
    scales = to_hub_state_dict({k[: -len(SCALE)] + "weight": v for k, v in sd.items() if k.endswith(SCALE)}, cfg)
    hub.update({k[: -len("weight")] + SCALE: v for k, v in scales.items()})
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        hub[f"model.layers.{i}.embed_tokens.weight"] = hub["model.embed_tokens.weight"]
        hub[f"model.layers.{i}.shared_head.head.weight"] = hub["lm_head.weight"]
    return hub


def save_hub(model, out, max_shard_bytes: int = 4 << 30, fp8_block: int = 128):
    """Write a V3.2-family model in the release layout: config.json (V3.2 names), shards and their index."""
    from dsv4.weights import save_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(hub_state_dict(model, fp8_block), out, max_shard_bytes=max_shard_bytes)
    d = model.cfg.to_dict()
    d["architectures"] = ["DeepseekV32ForCausalLM"]
    d["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [fp8_block, fp8_block],
    }
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    return out


def load_hub(directory, dtype: torch.dtype = torch.float32):
    """A V3.2-family model from a directory in the release layout (Hub names, FP8 with weight_scale_inv,
    MTP as layer n + k), transformers' layout, or dsv4's names: tensors are read lazily, FP8 ones
    dequantised, names mapped, and every missing or unexpected tensor reported in one error."""
    from dsv4.convert.official import LayoutError, OfficialReader
    from dsv4.model import build_model
    from dsv4.quant.formats import dequant_fp8_block

    directory = Path(directory)
    cfg = ModelConfig.from_json(directory / "config.json")
    reader = OfficialReader(directory)
    raw: dict[str, torch.Tensor] = {}
    for name in reader.keys():  # noqa: SIM118 (an OfficialReader is not iterable)
        if name.endswith(SCALE):
            continue
        t = reader.get(name)
        scale_name = name[: -len("weight")] + SCALE
        if scale_name in reader.where:
            s = reader.get(scale_name)
            blocks = [b for b in (128, 32) if tuple(s.shape) == (-(-t.shape[0] // b), -(-t.shape[1] // b))]
            if not blocks:
                raise LayoutError(f"{directory}: {scale_name} {tuple(s.shape)} fits no 128 or 32 block of {name}")
            t = dequant_fp8_block(t, s, blocks[0])
        raw[name] = t.float() if t.is_floating_point() else t
    sd = raw if any(k.startswith("layers.") for k in raw) else from_hub_state_dict(raw, cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_buffers()
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise LayoutError(
            f"{directory}: the tensors do not fit its config.json (V3.2): missing {res.missing_keys}, "
            f"unexpected {res.unexpected_keys}"
        )
    return model.to(dtype) if dtype != torch.float32 else model
