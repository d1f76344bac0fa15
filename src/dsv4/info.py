"""Parameter and KV-cache accounting for a ModelConfig, without allocating any weights.

The model is built under ``torch.device("meta")`` (Transformer skips its init there), so even
V4-Pro (1.6T parameters) is counted in well under a second and a few MB of memory.

Counting conventions (checked numerically against the official figures, see docs in README):
- ``total_params`` counts every parameter of the main model (embedding, all layers, LM head) and
  EXCLUDES the MTP block, as DeepSeek's reports do (V3: 671B + 14B MTP = the 685B checkpoint).
  V4-Flash gives 284.33B (report: 284B); V4-Pro 1.573T (report: 1.6T). ``total_params_with_mtp``
  adds the MTP block.
- ``active_params`` is the per-token count: every parameter except the routed experts, plus
  num_experts_per_tok / n_routed_experts of them; the LM head is counted, the input embedding
  table is NOT (a token reads one row of it). This is the convention that reproduces DeepSeek's
  published active counts: V2-Lite 2.4B, V3 37B, V4-Flash 13B (13.27B here), V4-Pro 49B (48.85B
  here). Counting the embedding too gives 13.80B / 49.78B, which would round to 14B / 50B.
  ``active_params_incl_embedding`` reports that variant; the ``*_with_mtp`` variants add the MTP
  block's per-token share (its experts at k/E; it shares the main embedding and head).
- Buffers (the routers' balancing bias, the hash table tid2eid, rope tables) are not parameters.

KV cache as served (spec section 7): an entry (compressed, or a raw window token) stores the
head_dim - rope non-rope dims in FP8 with one e8m0 scale byte per 64 values, plus the rope dims in
BF16; for V4 448 + 7 + 128 = 583 bytes, padded to a multiple of 8 = 584. An FP4 (MXFP4) indexer
key stores index_head_dim / 2 bytes plus one e8m0 scale per 32 values: 64 + 4 = 68 bytes.
Per token of context a layer of ratio m > 0 costs (584 [+ 68 with an indexer]) / m bytes; the raw
sliding window (n_win entries per SWA/CSA/HCA layer) is a fixed cost that does not grow with the
context. DSA layers (m = 1) keep every raw token, so their window is already inside the
per-token part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig

# Component keys in display order; the attention ones are grouped under "attention".
COMPONENTS = (
    "embedding",
    "head",
    "attention.q_proj",
    "attention.kv_proj",
    "attention.out_proj",
    "attention.sinks",
    "attention.compressor",
    "attention.indexer",
    "mhc",
    "router",
    "routed_experts",
    "shared_experts",
    "norms",
)

FP8_SCALE_BLOCK = 64  # one e8m0 scale byte per 64 FP8 kv values
FP4_SCALE_BLOCK = 32  # MXFP4: one e8m0 scale byte per 32 values
ENTRY_ALIGN = 8  # a kv entry is padded to a multiple of 8 bytes (583 -> 584)
GQA_BASELINE = dict(kv_heads=8, head_dim=128, bytes_per_value=2)  # BF16 GQA-8, head dim 128


def build_meta_model(cfg: ModelConfig):
    """The full Transformer with every parameter on the meta device (no storage, no init)."""
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def _classify(name: str, norm_params: set[str]) -> str:
    """Map a parameter name (main model or ``mtp.K.``) to a component key."""
    if name in norm_params:
        return "norms"
    name = "." + name  # so top-level names match the ".part." patterns below
    if name == ".embed.weight":
        return "embedding"
    if name == ".head.weight":
        return "head"
    leaf = name.rsplit(".", 1)[-1]
    if ".attn.indexer." in name:
        return "attention.indexer"
    if ".attn.compressor." in name:
        return "attention.compressor"
    if ".attn." in name:
        part = name.split(".attn.", 1)[1].split(".", 1)[0]
        return {
            "wq_a": "attention.q_proj",
            "wq_b": "attention.q_proj",
            "wkv": "attention.kv_proj",
            "wo_a": "attention.out_proj",
            "wo_b": "attention.out_proj",
            "attn_sink": "attention.sinks",
        }.get(part, "attention.other")
    if leaf.startswith("hc_"):
        return "mhc"
    if ".ffn.gate." in name:
        return "router"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared_experts." in name:
        return "shared_experts"
    if ".e_proj." in name or ".h_proj." in name:
        return "mtp_proj"
    return "other"


@dataclass
class ParamCount:
    total: int
    total_with_mtp: int
    active: int
    active_incl_embedding: int
    active_with_mtp: int
    mtp: int
    mtp_active: int
    components: dict[str, int]
    mtp_components: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "total_with_mtp": self.total_with_mtp,
            "active": self.active,
            "active_incl_embedding": self.active_incl_embedding,
            "active_with_mtp": self.active_with_mtp,
            "mtp": self.mtp,
            "mtp_active": self.mtp_active,
            "components": dict(self.components),
            "mtp_components": dict(self.mtp_components),
        }


def count_params(cfg: ModelConfig, model=None) -> dict:
    """Exact parameter counts; see the module docstring for the conventions.

    Returns a dict with total, total_with_mtp, active, active_incl_embedding, active_with_mtp,
    mtp, mtp_active, components {key: n} (main model, sums to total) and mtp_components.
    """
    return _count(cfg, model).as_dict()


def _count(cfg: ModelConfig, model=None) -> ParamCount:
    from dsv4.model.norm import RMSNorm

    model = build_meta_model(cfg) if model is None else model
    norm_params = {
        f"{mn}.{pn}" if mn else pn
        for mn, mod in model.named_modules()
        if isinstance(mod, RMSNorm)
        for pn, _ in mod.named_parameters(recurse=False)
    }
    main: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    mtp: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = _classify(name, norm_params)
        if name.startswith("mtp."):
            mtp[key] = mtp.get(key, 0) + p.numel()
        else:
            main[key] = main.get(key, 0) + p.numel()
    total = sum(main.values())
    mtp_total = sum(mtp.values())
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts

    def active_of(comp: dict[str, int]) -> int:
        routed = comp.get("routed_experts", 0)  # E equal experts: routed * k / E is exact
        return sum(comp.values()) - routed + routed * k // e

    active_incl = active_of(main)
    active = active_incl - main["embedding"]
    mtp_active = active_of(mtp)
    return ParamCount(
        total=total,
        total_with_mtp=total + mtp_total,
        active=active,
        active_incl_embedding=active_incl,
        active_with_mtp=active + mtp_active,
        mtp=mtp_total,
        mtp_active=mtp_active,
        components={k_: v for k_, v in main.items() if v or k_ in COMPONENTS},
        mtp_components=mtp,
    )


# ------------------------------------------------------------------------------ KV cache
def kv_entry_bytes(cfg: ModelConfig) -> int:
    """Bytes of one served kv entry: FP8 non-rope dims + e8m0 scales + BF16 rope dims, padded."""
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    raw = nope + math.ceil(nope / FP8_SCALE_BLOCK) + 2 * cfg.qk_rope_head_dim
    return math.ceil(raw / ENTRY_ALIGN) * ENTRY_ALIGN


def indexer_key_bytes(cfg: ModelConfig) -> int:
    """Bytes of one FP4 (MXFP4) indexer key: two values per byte + one e8m0 scale per 32."""
    return cfg.index_head_dim // 2 + math.ceil(cfg.index_head_dim / FP4_SCALE_BLOCK)


def kv_cache_bytes(cfg: ModelConfig) -> dict:
    """KV cache of the main layers as served (MTP excluded).

    per_token: bytes per token of context (grows with the context); fixed: bytes of the raw
    sliding windows (constant once the context exceeds the window); baseline_per_token: a BF16
    GQA-8 head-dim-128 cache (K and V) with the same layer count; per_layer: [(kind, ratio, bytes/token)].
    """
    from dsv4.model.indexer import visible_count

    entry, ikey = kv_entry_bytes(cfg), indexer_key_bytes(cfg)
    per_layer, fixed = [], 0
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.layer_kind(i), cfg.compress_ratio(i)
        # a layer stores what its newest query can see: visible_count(L, m) entries (+ indexer keys), one
        # per m tokens (DSA, m = 1: every raw token, its window included); the others add a ring of the
        # window's min(L, n_win) raw keys, n_win once L >= n_win
        per_entry = entry + (ikey if kind in ("csa", "dsa") else 0)
        per_tok = 0.0 if m == 0 else per_entry * visible_count(m, m) / m
        per_layer.append((kind, m, per_tok))
        if kind != "dsa":
            fixed += cfg.sliding_window * entry
    g = GQA_BASELINE
    baseline = 2 * g["kv_heads"] * g["head_dim"] * g["bytes_per_value"] * cfg.num_hidden_layers
    per_token = sum(b for _, _, b in per_layer)
    return {
        "entry_bytes": entry,
        "indexer_key_bytes": ikey,
        "per_token": per_token,
        "fixed": fixed,
        "baseline_per_token": baseline,
        "ratio_to_baseline": per_token / baseline,
        "per_layer": per_layer,
    }


# ------------------------------------------------------------------------------ report
def engram_tables(cfg: ModelConfig) -> dict:
    """Engram table sizes (spec section 4): per layer sum_j p_j rows (p_j: distinct primes >= rows_per_head,
    one per (order, head)) of d_mem / (len(orders) x heads) fp32 values; rows read per token = heads total.
    The tables are row stores outside the state dict, so total_params does not count them."""
    if not cfg.engram_layer_ids:
        return dict(layers=[], rows=0, dim=0, params=0, fp32_bytes=0, rows_per_token=0)
    from dsv4.model.engram import table_shape

    primes, dim = table_shape(cfg)
    rows, n = sum(primes), len(cfg.engram_layer_ids)
    return dict(
        layers=list(cfg.engram_layer_ids),
        rows=rows,
        dim=dim,
        params=n * rows * dim,
        fp32_bytes=n * rows * dim * 4,
        rows_per_token=n * len(primes),
    )


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def layer_schedule(cfg: ModelConfig) -> list[dict]:
    rows = []
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        mtp = i >= cfg.num_hidden_layers
        rows.append(
            {
                "layer": i,
                "mtp": mtp,
                "kind": cfg.layer_kind(i),
                "ratio": cfg.compress_ratio(i),
                "routing": "hash" if i < cfg.num_hash_layers else "learned",
            }
        )
    return rows


def format_info(cfg: ModelConfig, name: str | None = None) -> str:
    """The text `dsv4 info` prints."""
    pc = _count(cfg)
    kv = kv_cache_bytes(cfg)
    out = []
    if name:
        out.append(f"model: {name}")
    kinds = cfg.layer_kinds
    summary = ", ".join(f"{kinds.count(k)} {k}" for k in ("swa", "csa", "hca", "dsa") if kinds.count(k))
    out.append(
        f"layers: {cfg.num_hidden_layers} ({summary}) + {cfg.num_nextn_predict_layers} MTP; "
        f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}x{cfg.head_dim}, "
        f"experts {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared"
        f" x {cfg.moe_intermediate_size}, vocab {cfg.vocab_size}"
    )
    out.append("")
    out.append("layer schedule:")
    out.append(f"  {'layer':>5}  {'kind':<4}  {'ratio':>5}  routing")
    for r in layer_schedule(cfg):
        tag = "  (MTP)" if r["mtp"] else ""
        out.append(f"  {r['layer']:>5}  {r['kind']:<4}  {r['ratio']:>5}  {r['routing']}{tag}")
    out.append("")
    out.append(f"total_params: {pc.total}")
    out.append(f"active_params: {pc.active}")
    out.append(f"total_params_with_mtp: {pc.total_with_mtp}")
    out.append(f"active_params_with_mtp: {pc.active_with_mtp}")
    out.append(f"active_params_incl_embedding: {pc.active_incl_embedding}")
    out.append(f"mtp_params: {pc.mtp}")
    out.append(
        f"summary: {human(pc.total)} total / {human(pc.active)} active per token "
        f"(with MTP: {human(pc.total_with_mtp)} / {human(pc.active_with_mtp)}); "
        "totals exclude MTP, active counts exclude the input embedding"
    )
    out.append("")
    out.append("components (main model; sums to total_params):")
    out.append(f"  {'component':<24} {'params':>16} {'human':>9} {'share':>7}")
    for key, n in pc.components.items():
        out.append(f"  {key:<24} {n:>16} {human(n):>9} {100 * n / max(pc.total, 1):>6.2f}%")
    attn = sum(n for key, n in pc.components.items() if key.startswith("attention."))
    out.append(f"  {'attention (sum of above)':<24} {attn:>16} {human(attn):>9} {100 * attn / max(pc.total, 1):>6.2f}%")
    out.append(f"  {'mtp (separate)':<24} {pc.mtp:>16} {human(pc.mtp):>9}")
    for key, n in sorted(pc.mtp_components.items(), key=lambda kv_: -kv_[1]):
        out.append(f"    {'mtp.' + key:<22} {n:>16} {human(n):>9}")
    out.append("")
    out.append(
        f"kv cache (served layout: {kv['entry_bytes']} B per entry, "
        f"{kv['indexer_key_bytes']} B per FP4 indexer key; main layers, MTP excluded):"
    )
    out.append(
        f"  kv_bytes_per_token: {kv['per_token']:.2f}  ({kv['per_token'] / 1000:.2f} KB, "
        f"{kv['per_token'] / 1024:.2f} KiB per token of context)"
    )
    out.append(
        f"  kv_fixed_bytes: {kv['fixed']}  ({human(kv['fixed'])}B: sliding windows, "
        f"{cfg.sliding_window} x {kv['entry_bytes']} B per non-DSA layer)"
    )
    out.append(
        f"  bf16_gqa8_bytes_per_token: {kv['baseline_per_token']}  (2 x 8 x 128 x 2 B x {cfg.num_hidden_layers} layers)"
    )
    out.append(f"  ratio_to_bf16_gqa8: {kv['ratio_to_baseline']:.4f}  ({100 * kv['ratio_to_baseline']:.2f}%)")
    eg = engram_tables(cfg)
    if eg["layers"]:
        out.append("")
        out.append(f"engram tables (row stores, not in total_params; layers {eg['layers']}):")
        out.append(
            f"  engram_table_params: {eg['params']}  ({human(eg['params'])}; {eg['rows']:,} rows x {eg['dim']} "
            f"per layer)"
        )
        out.append(
            f"  engram_table_bytes_fp32: {eg['fp32_bytes']}  ({human(eg['fp32_bytes'])}B; sparse Adam state: 2x more)"
        )
        read = eg["rows_per_token"] * eg["dim"] * 4
        out.append(f"  engram_rows_per_token: {eg['rows_per_token']}  ({read} B read per token)")
    return "\n".join(out)
