"""`dsv4 info`: parameter counts, layer schedule and KV-cache size of a config, as text. The accounting
itself, with its conventions, is dsv4.flops; this module formats it.
"""

from __future__ import annotations

from dsv4.config import ModelConfig
from dsv4.flops import engram_tables, kv_cache_bytes, param_count, resident_weight_bytes


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
                "routing": "hash"
                if i < cfg.num_hash_layers
                else ("dense" if i < cfg.first_k_dense_replace else "learned"),
            }
        )
    return rows


def format_info(cfg: ModelConfig, name: str | None = None) -> str:
    """The text `dsv4 info` prints."""
    pc = param_count(cfg)
    kv = kv_cache_bytes(cfg)
    out = []
    if name:
        out.append(f"model: {name}")
    kinds = cfg.layer_kinds
    summary = ", ".join(f"{kinds.count(k)} {k}" for k in ("swa", "csa", "hca", "dsa") if kinds.count(k))
    if cfg.is_v32:
        out.append(
            f"family: deepseek_v32 (MLA, latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}; the V3.2 "
            f"indexer's top-{cfg.index_topk} of every earlier token; {cfg.first_k_dense_replace} dense FFN layers, "
            f"{cfg.n_group} expert groups, top-{cfg.topk_group})"
        )
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
    if cfg.is_v32:
        ix = pc.components.get("attention.indexer", 0)
        out.append(
            f"indexer_params: {ix}  ({human(ix)}; MTP's indexer: {pc.mtp_components.get('attention.indexer', 0)})"
        )
        out.append(f"total_params_without_indexer: {pc.total - ix}")
        out.append(f"active_params_without_indexer: {pc.active - ix}")
        out.append(
            f"summary without the indexers: {human(pc.total - ix)} total / {human(pc.active - ix)} active (V3's "
            "counts, which DeepSeek publishes for V3.2)"
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
    if cfg.is_v32:
        out.append(
            f"kv cache (served layout: {kv['entry_bytes']} B per token per layer = {cfg.kv_lora_rank} FP8 latent "
            f"values + fp32 scales per 128 + {cfg.qk_rope_head_dim} BF16 rope values, plus "
            f"{kv['indexer_key_bytes']} B per FP8 indexer key; main layers, MTP excluded):"
        )
    else:
        out.append(
            f"kv cache (served layout: {kv['entry_bytes']} B per entry, "
            f"{kv['indexer_key_bytes']} B per FP4 indexer key; main layers, MTP excluded):"
        )
    out.append(
        f"  kv_bytes_per_token: {kv['per_token']:.2f}  ({kv['per_token'] / 1000:.2f} KB, "
        f"{kv['per_token'] / 1024:.2f} KiB per token of context)"
    )
    if not cfg.is_v32:
        out.append(
            f"  kv_fixed_bytes: {kv['fixed']}  ({human(kv['fixed'])}B: sliding windows, "
            f"{cfg.sliding_window} x {kv['entry_bytes']} B per non-DSA layer)"
        )
    out.append(
        f"  bf16_gqa8_bytes_per_token: {kv['baseline_per_token']}  (2 x 8 x 128 x 2 B x {cfg.num_hidden_layers} layers)"
    )
    out.append(f"  ratio_to_bf16_gqa8: {kv['ratio_to_baseline']:.4f}  ({100 * kv['ratio_to_baseline']:.2f}%)")
    rb = resident_weight_bytes(cfg)
    out.append("")
    out.append("resident weights (state dict in memory, MTP included):")
    out.append(f"  fp32: {rb['fp32']}  ({rb['fp32'] / 1e9:.3f} GB)")
    out.append(f"  bf16: {rb['bf16']}  ({rb['bf16'] / 1e9:.3f} GB)")
    shipped = "FP8 projections and experts" if cfg.is_v32 else "FP8 projections and MXFP4 routed experts"
    out.append(
        f"  kept_fp8_fp4: {rb['kept']}  ({rb['kept'] / 1e9:.3f} GB: the shipped layout kept in memory, "
        f"{shipped} dequantised per matmul)"
    )
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
