"""Bits per byte, the xz baseline, FLOPs per token, MFU/MBU and measured machine peaks (spec section 10).

bits per byte (bpb) = sum of nats over the target tokens / (ln 2 * UTF-8 bytes of the target text).
Normalising by bytes rather than tokens makes runs with different tokenizers comparable, and it
puts a language model on the same scale as a general-purpose compressor: ``xz_bits_per_byte`` is
what ``xz -9`` (``lzma.compress(data, preset=9)``, the .xz container, NOT the ``-9e`` extreme
preset) needs for the same bytes, a floor every trained model should beat.

MFU = achieved model FLOP/s / peak FLOP/s, with the achieved FLOP/s = tokens/s * flops_per_token
and the peak *measured* on the machine (``measure_matmul_peak``), not read from a data sheet.
MBU = achieved bytes/s / measured copy bandwidth (``measure_copy_bandwidth``).
"""

from __future__ import annotations

import lzma
import math
import time

import numpy as np
import torch

from dsv4.model.indexer import visible_count, window_count

LN2 = math.log(2.0)
XZ_PRESET = 9  # `xz -9`: lzma.compress(data, format=FORMAT_XZ, preset=9); no PRESET_EXTREME


# ------------------------------------------------------------------------------ bpb
def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy in nats over the target tokens -> bits per byte of the target text."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes}: bits per byte needs at least one byte of target text")
    return float(total_nats) / (LN2 * n_bytes)


def xz_bits_per_byte(data: bytes) -> float:
    """Bits per byte of ``xz -9`` on ``data``: 8 * len(lzma.compress(data, preset=9)) / len(data).

    The .xz container (stream header, index, footer: ~60 bytes) is included, as a file written by
    ``xz -9`` would be; it is negligible beyond a few hundred KB. Incompressible data gives a bit
    over 8.
    """
    data = bytes(data)
    if not data:
        raise ValueError("xz_bits_per_byte needs non-empty data")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    return 8.0 * len(packed) / len(data)


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
    from dsv4.info import count_params

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
    h, c = cfg.num_attention_heads, cfg.head_dim
    attn, index = 0.0, 0.0
    cache: dict[tuple[str, int], tuple[float, float]] = {}
    for i in range(cfg.num_hidden_layers + n_mtp):
        key = (cfg.layer_kind(i), cfg.compress_ratio(i))
        if key not in cache:
            cache[key] = _avg_keys(seq_len, key[0], key[1], cfg.sliding_window, cfg.index_topk, dense=warm)
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
      N = active parameters per token from ``dsv4.info.count_params`` -- every weight except the
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
