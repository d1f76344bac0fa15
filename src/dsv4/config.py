"""One flat model configuration whose field names follow the official DeepSeek-V4 and V3.2 config.json.

`model_type` names the family: "deepseek_v4" (default) or "deepseek_v32" (MLA + the V3.2 lightning indexer
on every layer, V3 group-limited routing, dense first layers; dsv4.model.v32). The fields of one family that
the other lacks keep their defaults and are left out of to_dict(). A V3.2 config.json names
qk_nope_head_dim; here head_dim = qk_nope_head_dim + qk_rope_head_dim for both families.

Layer kinds come from ``compress_ratios`` as in the official inference code (model.py):
0 = sliding window only (SWA), 4 = CSA (overlapped compressor + lightning indexer),
any other m > 1 = HCA (plain pooling over m tokens), and this project's 1 = DSA (raw-token
indexer, no compressor). The list may carry one extra entry per MTP layer (official layout).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
CSA_RATIO = 4  # official rule: ratio 4 <=> overlapped compressor + indexer

_warned_extra: set[tuple[str, ...]] = set()


class ConfigError(ValueError):
    """An impossible configuration: the message names the field and the rule."""


V32_ONLY = ("kv_lora_rank", "v_head_dim", "intermediate_size", "n_group", "topk_group")
V4_ONLY = (
    "dsa_rule",
    "o_groups",
    "o_lora_rank",
    "num_hash_layers",
    "swiglu_limit",
    "sliding_window",
    "compress_ratios",
    "compress_rope_theta",
    "hc_mult",
    "hc_mode",
    "hc_sinkhorn_iters",
    "hc_eps",
)
# what a V3.2 config.json (or transformers' DeepseekV32Config, which has no scoring_func) leaves implicit
V32_DEFAULTS = {"swiglu_limit": 0.0, "num_hash_layers": 0, "scoring_func": "sigmoid"}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v4"
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    kv_lora_rank: int = 512  # V3.2 MLA: the cached latent width
    v_head_dim: int = 128  # V3.2 MLA: value width per head
    o_groups: int = 8
    o_lora_rank: int = 1024
    # MoE
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_hash_layers: int = 3
    first_k_dense_replace: int = 0
    intermediate_size: int = 18432  # dense FFN width of the first_k_dense_replace layers (V3.2)
    n_group: int = 1  # expert groups for group-limited routing (V3.2: 8)
    topk_group: int = 1  # groups a token may route to (V3.2: 4)
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    # attention
    sliding_window: int = 128
    # DSA (ratio 1) layers of a V4 model: "v4" = window + the indexer's top-k of the tokens outside it (the
    # default, with the sink); "v3.2" = V3.2's selection rule, the top-k of every s <= t and no window
    dsa_rule: str = "v4"
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # mHC
    hc_mult: int = 4
    # residual streams (dsv4 ablation control, not an official field): "mhc" (the default; V4), "hc" =
    # unconstrained hyper-connections, "residual" = a plain residual (hc_mult 1); dsv4.model.mhc
    hc_mode: str = "mhc"
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # misc
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    # training-time constants (dsv4 names; docs/spec.md sections 3 and 5)
    seq_aux_loss_alpha: float = 1e-4
    bias_update_speed: float = 1e-3
    mtp_loss_weight: float = 0.3
    # Engram conditional memory (docs/spec.md section 4; off when engram_layer_ids is empty)
    engram_layer_ids: list[int] = field(default_factory=list)  # main layers with an Engram module
    engram_orders: list[int] = field(default_factory=lambda: [2, 3])  # n-gram orders
    engram_heads: int = 8  # hash heads per order
    engram_rows_per_head: int = 65536  # table rows per head (rounded up to distinct primes)
    engram_d_mem: int = 1280  # width of e_t = all heads' rows concatenated (row width d_mem / heads total)
    engram_conv_kernel: int = 4  # depthwise causal conv kernel (dilation = max order)
    engram_seed: int = 0  # seeds the per-layer hash multipliers and the default table init
    # unknown fields of a config.json, kept so to_json() writes them back
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.is_v32:  # every layer (and MTP layer) is a V3.2 DSA layer: ratio 1, no window
            self.compress_ratios = [1] * (self.num_hidden_layers + self.num_nextn_predict_layers)
            self.sliding_window = 0
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        self.validate()

    @property
    def is_v32(self) -> bool:
        """The DeepSeek-V3.2 family (MLA + V3.2 DSA on every layer)."""
        return self.model_type == "deepseek_v32"

    @property
    def kv_dim(self) -> int:
        """Width of one cached kv row and of the attention core: head_dim (V4), latent + rope key (V3.2 MLA,
        attended in the absorbed form)."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_v32 else self.head_dim

    # ------------------------------------------------------------------ derived
    @property
    def qk_nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_ratio(self, layer_id: int) -> int:
        """Ratio of main layer ``layer_id``; MTP layers use index num_hidden_layers + k (0 if absent)."""
        if layer_id < len(self.compress_ratios):
            return self.compress_ratios[layer_id]
        return 0

    def window_of(self, layer_id: int) -> int:
        """Raw window of a layer: sliding_window, but 0 for a DSA layer under the V3.2 rule (and V3.2 models)."""
        if self.layer_kind(layer_id) == "dsa" and (self.dsa_rule == "v3.2" or self.is_v32):
            return 0
        return self.sliding_window

    def layer_kind(self, layer_id: int) -> str:
        m = self.compress_ratio(layer_id)  # V3.2: 1 everywhere (its DSA: no window, every s <= t a candidate)
        if m == 0:
            return "swa"
        if m == 1:
            return "dsa"
        if m == CSA_RATIO:
            return "csa"
        return "hca"

    @property
    def layer_kinds(self) -> list[str]:
        return [self.layer_kind(i) for i in range(self.num_hidden_layers)]

    @property
    def has_indexer(self) -> bool:
        """Whether some main layer has a lightning indexer (CSA or DSA)."""
        return any(k in ("csa", "dsa") for k in self.layer_kinds)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, name: str, rule: str):
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name, None)!r}: {rule}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "sliding_window",
            "hc_mult",
            "hc_sinkhorn_iters",
            "index_n_heads",
            "index_head_dim",
            "max_position_embeddings",
        ):
            if self.is_v32 and name in V4_ONLY:
                continue
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.index_topk > 0, "index_topk", "must be >= 1 (the indexer selects at least one entry)")
        need(
            self.model_type in ("deepseek_v4", "deepseek_v32"),
            "model_type",
            "must be deepseek_v4 or deepseek_v32",
        )
        if self.is_v32:
            self._validate_v32(need)
            return
        need(self.num_key_value_heads == 1, "num_key_value_heads", "V4 attention is single-KV-head MQA; must be 1")
        need(
            self.num_attention_heads % self.o_groups == 0,
            "o_groups",
            f"num_attention_heads ({self.num_attention_heads}) must be divisible by o_groups",
        )
        need(
            0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"must be even and in (0, head_dim={self.head_dim}]",
        )
        need(
            self.index_head_dim % 2 == 0 and self.index_head_dim >= self.qk_rope_head_dim,
            "index_head_dim",
            f"must be even and >= qk_rope_head_dim ({self.qk_rope_head_dim})",
        )
        need(
            self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"cannot exceed n_routed_experts ({self.n_routed_experts})",
        )
        need(self.n_shared_experts in (0, 1), "n_shared_experts", "must be 0 or 1")
        need(
            0 <= self.num_hash_layers <= self.num_hidden_layers,
            "num_hash_layers",
            f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        need(
            self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"),
            "scoring_func",
            "must be one of sqrtsoftplus, sigmoid, softmax",
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        n, n_all = self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers
        need(
            len(self.compress_ratios) in (n, n_all),
            "compress_ratios",
            f"needs one entry per layer: {n} (num_hidden_layers) or {n_all} (layers + MTP layers), "
            f"got {len(self.compress_ratios)}",
        )
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios", "entries must be >= 0")
        for k in range(n, len(self.compress_ratios)):
            need(self.compress_ratios[k] == 0, "compress_ratios", f"MTP entry {k} must be 0 (MTP blocks are SWA)")
        need(self.hc_eps > 0, "hc_eps", "must be > 0")
        need(self.hc_mode in ("mhc", "hc", "residual"), "hc_mode", "must be mhc, hc or residual")
        need(self.hc_mode != "residual" or self.hc_mult == 1, "hc_mode", "residual needs hc_mult=1 (one stream)")
        need(self.dsa_rule in ("v4", "v3.2"), "dsa_rule", "must be v4 (window + top-k outside it) or v3.2")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling", "only yarn rope scaling is supported")
        self._validate_engram(need)

    def _validate_v32(self, need) -> None:
        for name in ("kv_lora_rank", "v_head_dim", "intermediate_size", "n_group", "topk_group"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(
            0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            "must be even and below head_dim = qk_nope_head_dim + qk_rope_head_dim",
        )
        need(
            self.index_head_dim % 2 == 0 and self.index_head_dim >= self.qk_rope_head_dim,
            "index_head_dim",
            f"must be even and >= qk_rope_head_dim ({self.qk_rope_head_dim})",
        )
        need(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"must divide n_routed_experts ({self.n_routed_experts})",
        )
        need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
        need(
            self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
            "num_experts_per_tok",
            "cannot exceed the experts of topk_group groups",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "V3.2 routing uses sigmoid or softmax")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.num_hash_layers == 0, "num_hash_layers", "V3.2 has no hash-routed layers; must be 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(not self.engram_layer_ids, "engram_layer_ids", "Engram is a V4-family module; must be empty")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling", "only yarn rope scaling is supported")

    def _validate_engram(self, need) -> None:
        ids, orders = self.engram_layer_ids, self.engram_orders
        need(
            isinstance(ids, list)
            and all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in ids)
            and len(set(ids)) == len(ids),
            "engram_layer_ids",
            f"must be distinct main layer ids in [0, num_hidden_layers={self.num_hidden_layers})",
        )
        need(
            isinstance(orders, list)
            and len(orders) > 0
            and all(isinstance(n, int) and n >= 2 for n in orders)
            and len(set(orders)) == len(orders),
            "engram_orders",
            "must be a non-empty list of distinct ints >= 2",
        )
        for name in ("engram_heads", "engram_d_mem", "engram_conv_kernel"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(
            isinstance(self.engram_rows_per_head, int) and self.engram_rows_per_head >= 2,
            "engram_rows_per_head",
            "must be an integer >= 2",
        )
        need(isinstance(self.engram_seed, int) and self.engram_seed >= 0, "engram_seed", "must be an integer >= 0")
        heads = len(orders) * self.engram_heads
        need(
            self.engram_d_mem % heads == 0,
            "engram_d_mem",
            f"must be divisible by len(engram_orders) * engram_heads = {heads} (the row width per head)",
        )

    # ------------------------------------------------------------------ json io
    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        from dsv4.convert.transformers import is_transformers_config, transformers_config_dict_to_ours

        if d.get("model_type") == "deepseek_v4" and is_transformers_config(d):  # the one mapping: convert/
            d = transformers_config_dict_to_ours(d)
        if "text_config" in d and isinstance(d["text_config"], dict):
            d = {**d["text_config"], **{k: v for k, v in d.items() if k == "quantization_config"}}
        if d.get("model_type") == "deepseek_v32":
            from dsv4.convert.v32 import config_dict_from_transformers, is_transformers_v32_config

            if is_transformers_v32_config(d):  # the one mapping: convert/
                d = config_dict_from_transformers(d)
            d = {**V32_DEFAULTS, **d}
            d.pop("compress_ratios", None)
            if "qk_nope_head_dim" in d:  # head_dim = nope + rope here; transformers writes head_dim = rope
                d["head_dim"] = int(d.pop("qk_nope_head_dim")) + int(d.get("qk_rope_head_dim", 64))
            if d.get("first_k_dense_replace") is None:
                d["first_k_dense_replace"] = 0
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if d.get("model_type", "deepseek_v4") not in ("deepseek_v4", "deepseek_v32"):
            raise ConfigError(f"model_type={d['model_type']!r}: must be deepseek_v4 or deepseek_v32")
        if d.get("model_type") != "deepseek_v32":  # a V4 config.json's model_type and V3-era keys (n_group,
            names -= {"model_type", *V32_ONLY}  # topk_group: V4 ignores them) are kept as read, in extra
        known = {k: v for k, v in d.items() if k in names}
        extra = {**d.get("extra", {}), **{k: v for k, v in d.items() if k not in names and k != "extra"}}
        key = tuple(sorted(extra))
        if extra and key not in _warned_extra:
            _warned_extra.add(key)
            warnings.warn(f"config: keeping unknown fields {sorted(extra)}", stacklevel=2)
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.engram_layer_ids:  # feature off: a V4 config.json stays as it was
            defaults = {
                f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(self)
                if f.name.startswith("engram_")
            }
            d = {k: v for k, v in d.items() if not (k in defaults and v == defaults[k])}
        if self.is_v32:  # the V3.2 config.json names: qk_nope_head_dim, no V4-only fields
            d["qk_nope_head_dim"] = d.pop("head_dim") - self.qk_rope_head_dim
            for k in V4_ONLY:
                d.pop(k, None)
        else:
            d.pop("model_type")  # V4 configs are written as before (a read model_type stays in extra)
            for k, default in (("dsa_rule", "v4"), ("hc_mode", "mhc")):
                if d[k] == default:
                    d.pop(k)
            for k in V32_ONLY:
                d.pop(k)
        extra = d.pop("extra")
        d.update(extra)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **overrides) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(f"unknown config field(s) {bad}; valid fields: {sorted(names - {'extra'})}")
        return dataclasses.replace(copy.deepcopy(self), **overrides)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        path = PRESET_DIR / f"{name}.json"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; available: {available_presets()}")
        return cls.from_json(path)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
