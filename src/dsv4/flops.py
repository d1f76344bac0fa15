"""FLOPs, bytes and parameters of a model: the one accounting module (docs/spec.md section 10).

Used by training MFU (dsv4.train.trainer, benchmarks/train_throughput.py), decode MBU
(benchmarks/decode.py), `dsv4 info` (dsv4.app.info formats it) and the demos.

Parameter and KV-cache accounting for a ModelConfig, without allocating any weights.

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

KV cache as served (docs/spec.md section 7): an entry (compressed, or a raw window token) stores the
head_dim - rope non-rope dims in FP8 with one e8m0 scale byte per 64 values, plus the rope dims in
BF16; for V4 448 + 7 + 128 = 583 bytes, padded to a multiple of 8 = 584. An FP4 (MXFP4) indexer
key stores index_head_dim / 2 bytes plus one e8m0 scale per 32 values: 64 + 4 = 68 bytes.
Per token of context a layer of ratio m > 0 costs (584 [+ 68 with an indexer]) / m bytes; the raw
sliding window (n_win entries per SWA/CSA/HCA layer) is a fixed cost that does not grow with the
context. DSA layers (m = 1) keep every raw token, so their window is already inside the
per-token part.

MFU = achieved model FLOP/s / peak FLOP/s, with the achieved FLOP/s = tokens/s * flops_per_token
and the peak *measured* on the machine (``measure_matmul_peak``), not read from a data sheet.
MBU = achieved bytes/s / measured copy bandwidth (``measure_copy_bandwidth``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.config import ModelConfig
from dsv4.model.indexer import visible_count, window_count

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
    from dsv4.model import build_model

    with torch.device("meta"):
        return build_model(cfg)


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
            "wkv_a": "attention.kv_proj",
            "wkv_b": "attention.kv_proj",
            "kv_norm": "norms",
            "q_norm": "norms",
            "wo": "attention.out_proj",
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
    if ".ffn.w" in name:
        return "dense_ffn"  # V3.2's first_k_dense_replace layers
    if ".e_proj." in name or ".h_proj." in name or ".eh_proj." in name:
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
    return param_count(cfg, model).as_dict()


def param_count(cfg: ModelConfig, model=None) -> ParamCount:
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


def resident_weight_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of the model's state dict in memory: all fp32, all bf16 (buffers as they are), and kept in the
    shipped format (dsv4.convert.official / dsv4.quant.execution: FP8 projections with one e8m0 byte per
    128 x 128 block, MXFP4 experts at half a byte per value plus one byte per 32, the rest as written).
    V3.2 ships its routed experts in FP8 too, with an fp32 scale per 128 x 128 block."""
    from dsv4.convert.official import KEEP_FP32, is_fp8, is_routed_expert

    model = build_meta_model(cfg)
    params = {n for n, _ in model.named_parameters()}
    out = {"fp32": 0, "bf16": 0, "kept": 0}
    for name, t in model.state_dict().items():
        n, size = t.numel(), t.element_size()
        float_param = name in params or (is_routed_expert(name) and t.is_floating_point())
        out["fp32"] += n * (4 if float_param else size)
        out["bf16"] += n * (2 if float_param else size)
        blocks = math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128) if t.dim() == 2 else 0
        if is_routed_expert(name) and cfg.is_v32:
            out["kept"] += n + 4 * blocks
        elif is_routed_expert(name):
            out["kept"] += n // 2 + n // 32
        elif is_fp8(name, tuple(t.shape)):
            out["kept"] += n + (4 if cfg.is_v32 else 1) * blocks
        elif float_param and not any(k in name for k in KEEP_FP32):
            out["kept"] += 2 * n
        else:
            out["kept"] += n * (4 if float_param else size)
    return out


# ------------------------------------------------------------------------------ KV cache
def kv_entry_bytes(cfg: ModelConfig) -> int:
    """Bytes of one served kv entry: FP8 non-rope dims + e8m0 scales + BF16 rope dims, padded. V3.2 as served:
    the FP8 latent with one fp32 scale per 128 values + the BF16 rope key (512 + 16 + 128 = 656)."""
    if cfg.is_v32:
        return cfg.kv_lora_rank + 4 * math.ceil(cfg.kv_lora_rank / 128) + 2 * cfg.qk_rope_head_dim
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    raw = nope + math.ceil(nope / FP8_SCALE_BLOCK) + 2 * cfg.qk_rope_head_dim
    return math.ceil(raw / ENTRY_ALIGN) * ENTRY_ALIGN


def indexer_key_bytes(cfg: ModelConfig) -> int:
    """Bytes of one FP4 (MXFP4) indexer key: two values per byte + one e8m0 scale per 32. V3.2: an FP8 key
    with one fp32 scale per 128 values (128 + 4)."""
    if cfg.is_v32:
        return cfg.index_head_dim + 4 * math.ceil(cfg.index_head_dim / 128)
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
    """Engram table sizes (docs/spec.md section 4): per layer sum_j p_j rows (p_j: distinct primes >= rows_per_head,
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


# ------------------------------------------------------------------------------ FLOPs
def _avg_keys(seq_len: int, kind: str, ratio: int, window: int, topk: int, dense: bool = False) -> tuple[float, float]:
    """Mean over query positions t in [0, seq_len) of (attended keys, indexer-scored entries).

    Counts from dsv4.model.indexer (visible_count, window_count): the raw window holds min(t+1, n_win)
    tokens; hca adds every complete compressed entry ((t+1) // m of them); csa adds the indexer's
    top-k of those; dsa (m = 1) adds the indexer's top-k raw tokens outside the window. The indexer
    scores every causally visible entry ((t+1) // m, i.e. t+1 raw tokens for dsa). dense=True (the
    indexer warm-up): csa and dsa attend every visible entry instead of the top-k.
    """
    t1 = np.arange(1, seq_len + 1, dtype=np.float64)  # t + 1
    keys = window_count(t1, window)
    scored = np.zeros_like(t1)
    if kind == "hca":
        keys = keys + visible_count(t1, ratio)
    elif kind == "csa":
        scored = visible_count(t1, ratio)
        keys = keys + (scored if dense else np.minimum(topk, scored))
    elif kind == "dsa":
        scored = visible_count(t1, ratio)
        outside = visible_count(t1, ratio, window)
        keys = keys + (outside if dense else np.minimum(topk, outside))
    return float(keys.mean()), float(scored.mean())


def flops_breakdown(
    model_cfg, seq_len: int, training: bool = True, include_mtp: bool = True, stage: str = "sparse"
) -> dict:
    """FLOPs per token, split into terms (see ``flops_per_token``); values are floats.

    stage="warmup": a step of the indexer warm-up as the trainer computes it: the forward of the main
    blocks without the LM head and MTP (2 N), attention over every visible entry, the indexers'
    scoring forward and backward, and the backward of the indexers' own weights (4 N_indexer); nothing
    else has a gradient."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if stage not in ("sparse", "warmup"):
        raise ValueError(f"stage={stage!r}: must be 'sparse' or 'warmup'")
    cfg = model_cfg
    pc = count_params(cfg)
    warm = stage == "warmup"
    n_mtp = cfg.num_nextn_predict_layers if include_mtp and not warm else 0
    # active params without the input embedding (a row lookup), LM head included; the MTP blocks
    # add their per-token share and run the shared LM head once more per depth.
    n_active = pc["active"] + (pc["mtp_active"] + n_mtp * pc["components"].get("head", 0) if n_mtp else 0)
    h, c = cfg.num_attention_heads, cfg.kv_dim  # V3.2: the absorbed row (latent + rope key) is attended
    attn, index = 0.0, 0.0
    cache: dict[tuple[str, int, int], tuple[float, float]] = {}
    for i in range(cfg.num_hidden_layers + n_mtp):
        key = (cfg.layer_kind(i), cfg.compress_ratio(i), cfg.window_of(i))
        if key not in cache:
            cache[key] = _avg_keys(seq_len, key[0], key[1], key[2], cfg.index_topk, dense=warm)
        keys, scored = cache[key]
        attn += 2 * 2 * h * c * keys  # q.k and p.v, 2 FLOPs per MAC
        index += 2 * cfg.index_n_heads * cfg.index_head_dim * scored  # q_I.k_I per indexer head
    if warm:
        n_fwd = n_active - pc["components"].get("head", 0)
        n_ix = pc["components"].get("attention.indexer", 0)
        out = {
            "n_active": float(n_fwd),
            "matmul": 2.0 * n_fwd + 4.0 * n_ix,
            "attention": float(attn),
            "indexer": float(3 * index),
        }
    else:
        mult = 3 if training else 1  # backward = 2 x forward
        out = {
            "n_active": float(n_active),
            "matmul": 2.0 * mult * n_active,
            "attention": float(mult * attn),
            "indexer": float(mult * index),
        }
    out["total"] = out["matmul"] + out["attention"] + out["indexer"]
    return out


def flops_per_token(
    model_cfg, seq_len: int, training: bool = True, include_mtp: bool = True, stage: str = "sparse"
) -> float:
    """Model FLOPs per token for MFU: 6 * N_active + 3 * (attention + indexer scoring) forward FLOPs.

    - Matmul term: the standard ``6 N`` (Kaplan et al. 2020; forward 2N, backward 4N) with
      N = active parameters per token from ``count_params`` -- every weight except the
      routed experts, plus k/E of those, LM head included, the input embedding EXCLUDED (a token
      only reads one row). With ``include_mtp`` (the default: training runs the MTP blocks) N also
      gets each MTP block's per-token share and one more pass through the shared LM head per depth.
      ``training=False`` gives the forward-only 2N.
    - Attention term (the ``12 L H Q T``-style correction of PaLM/Chinchilla, made exact for the
      sparse pattern): per layer, each query costs 2 * 2 * n_heads * head_dim * keys FLOPs (q.k
      and p.v; V4 is MQA with key = value of width head_dim), averaged over the causal positions
      0..seq_len-1 with the keys of its layer kind (window, + all compressed entries for HCA,
      + index_topk selected entries for CSA/DSA). These are the *useful* FLOPs of the sparse
      pattern, not those of the masked-dense reference kernel.
    - Indexer term: 2 * index_n_heads * index_head_dim FLOPs per scored entry (every visible
      compressed entry for CSA, every raw token for DSA).
    - Attention and indexer terms are multiplied by 3 when training (backward = 2 x forward).
    Ignored (each well under 1%): softmax/norm/activation elementwise work, the Sinkhorn of mHC,
    top-k selection, router scoring beyond its matmul.
    stage="warmup" counts a step of the indexer warm-up instead (see flops_breakdown).
    """
    return flops_breakdown(model_cfg, seq_len, training=training, include_mtp=include_mtp, stage=stage)["total"]


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s * FLOPs/token / peak FLOP/s (a fraction, not a percentage)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops}: must be > 0")
    return float(tokens_per_s) * float(flops_per_token) / float(peak_flops)


def mbu(bytes_per_s: float, peak_bytes_per_s: float) -> float:
    """Memory bandwidth utilisation: achieved bytes/s / measured copy bandwidth (a fraction)."""
    if peak_bytes_per_s <= 0:
        raise ValueError(f"peak_bytes_per_s={peak_bytes_per_s}: must be > 0")
    return float(bytes_per_s) / float(peak_bytes_per_s)


# ------------------------------------------------------------------------------ machine peaks
def _device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_loop(fn, dev: torch.device, seconds: float, warmup: int) -> tuple[int, float]:
    """Run fn warmup times, then repeatedly for about ``seconds``; return (iterations, elapsed s)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    iters, batch = 0, 1
    t0 = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        iters += batch
        _sync(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return iters, elapsed
        # size the next batch to about half the time left: few syncs, little overshoot
        batch = max(1, min(4096, int(0.5 * (seconds - elapsed) * iters / elapsed)))


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0, device=None) -> float:
    """Measured FLOP/s of ``torch.matmul`` on two n x n matrices of ``dtype``.

    Warms up (3 matmuls), then repeats the matmul for about ``seconds`` (at least once) and returns
    2 n^3 * iterations / elapsed. ``device`` defaults to CUDA when available, else the CPU (with
    torch's current thread count). This is the denominator of MFU.
    """
    dev = _device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    iters, elapsed = _time_loop(lambda: torch.matmul(a, b, out=out), dev, seconds, warmup=3)
    return 2.0 * n**3 * iters / elapsed


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, seconds: float = 1.0, device=None) -> float:
    """Measured memory bandwidth in bytes/s of ``dst.copy_(src)`` on ``nbytes`` byte buffers.

    Each copy reads nbytes and writes nbytes, so it counts 2 * nbytes (read + write), the usual
    STREAM-copy convention; divide by 2 for the one-way copy rate. Warms up (2 copies), then
    repeats for about ``seconds``. This is the denominator of MBU.
    """
    dev = _device(device)
    n = max(1, int(nbytes) // 4)
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    iters, elapsed = _time_loop(lambda: dst.copy_(src), dev, seconds, warmup=2)
    return 2.0 * 4 * n * iters / elapsed
