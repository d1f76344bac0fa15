"""Official activation quantisation at inference: what DeepSeek's own inference code computes around its
FP8 / FP4 weights (docs/spec.md section 7; docs/inference.md). `enable_official_quant(model)` turns on:

1. FP8 activations before every FP8 / FP4 matmul: the input of each projection stored FP8 in the shipped
   layout (attention wq_a / wq_b / wkv / wo_a / wo_b, the indexer's wq_b, the shared experts, the MTP
   projections) and of each routed expert's W1 / W3 and W2 goes through `fp8_act`: 1 x 128 tiles along
   the last dim, scale = amax / 448 rounded up to a power of two (ue8m0), values rounded to e4m3. The
   projections that run in fp32 (compressors, the indexer's head weights, the router) are left alone.
2. The lightning indexer's queries and keys are rotated by the 128 x 128 (c_I x c_I) Hadamard matrix,
   normalised (an orthogonal map: q . k is unchanged before rounding), and fake-quantised to MXFP4
   (`hadamard_fp4`), as its FP4 index cache holds them.
3. Every kv vector and compressed entry attended passes through the FP8 kv codec (FP8 non-rope dims with
   power-of-two scales per 64, bf16 rope dims; `dsv4.quant.kv`) before it is attended or stored, so the
   keys a prefill chunk attends are exactly what a later decode step reads back from an FP8 cache (which
   then changes nothing: tests/test_official_quant.py). Prefill and decode still differ where a last-bit
   difference between a batched and a one-token product moves a value to the next FP8 / FP4 code.

All of it is fake quantisation in the model's dtype (quantise, then dequantise), through the model's
transform hooks (Attention.kv_transform / act_transform, Compressor.out_transform, Indexer.q_transform,
Expert(s).act_transform); `disable_official_quant` removes them. With the hooks unset the model is
unchanged (tests compare).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from dsv4.quant.formats import FP8_MAX, fake_mxfp4, pow2_ceil
from dsv4.quant.kv import KVCodec

ACT_TILE = 128


def fp8_act(x: torch.Tensor, tile: int = ACT_TILE) -> torch.Tensor:
    """Fake FP8 e4m3 activations: 1 x tile blocks along the last dim (a shorter last block when the dim is not
    a multiple), each scaled by amax / 448 rounded up to a power of two."""
    d = x.shape[-1]
    pad = -d % tile
    v = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, tile))
    scale = pow2_ceil(v.abs().amax(-1, keepdim=True) / FP8_MAX)
    q = (v / scale).to(torch.float8_e4m3fn).float() * scale
    return q.flatten(-2)[..., :d].to(x.dtype)


@functools.cache
def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal; n a power of two)."""
    if n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_fp4(x: torch.Tensor) -> torch.Tensor:
    """x [..., c] (c a power of two) -> x H, fake-quantised to MXFP4 along c (blocks of 32; a smaller c is one
    block, zero-padded: zeros change no block's amax)."""
    c = x.shape[-1]
    rotated = x.float() @ hadamard(c).to(x.device)
    padded = torch.nn.functional.pad(rotated, (0, -c % 32))
    return fake_mxfp4(padded)[..., :c].to(x.dtype)


def kv_round_trip(width: int, rope_dim: int):
    """v -> decode(encode(v)) through the FP8 kv codec of a width-wide kv vector."""
    codec = KVCodec(width, rope_dim, "fp8")
    return lambda v: codec.decode(codec.encode(v), v.dtype)


def _fp8_act_hook(_mod: nn.Module, args: tuple) -> tuple:
    return (fp8_act(args[0]), *args[1:])


def enable_official_quant(model: nn.Module) -> nn.Module:
    """Install the three transforms above on a Transformer (returns it); safe to call twice."""
    from dsv4.model.attention import Attention
    from dsv4.model.moe import Expert, Experts

    disable_official_quant(model)
    rope = model.cfg.qk_rope_head_dim
    hooks = []
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.kv_transform = kv_round_trip(mod.head_dim, rope)
            mod.act_transform = fp8_act
            linears = [mod.wq_a, mod.wq_b, mod.wkv, mod.wo_b]
            if hasattr(mod, "compressor"):
                mod.compressor.out_transform = kv_round_trip(mod.head_dim, rope)
            if hasattr(mod, "indexer"):
                mod.indexer.q_transform = hadamard_fp4
                mod.indexer.compressor.out_transform = hadamard_fp4
                linears.append(mod.indexer.wq_b)
            hooks += [lin.register_forward_pre_hook(_fp8_act_hook) for lin in linears]
        elif isinstance(mod, (Expert, Experts)):
            mod.act_transform = fp8_act
    for name in ("e_proj", "h_proj"):  # MTP projections (FP8 in the layout)
        hooks += [
            getattr(blk, name).register_forward_pre_hook(_fp8_act_hook) for blk in model.mtp if hasattr(blk, name)
        ]
    model._official_quant_hooks = hooks
    return model


def disable_official_quant(model: nn.Module) -> nn.Module:
    """Remove what enable_official_quant installed (the model computes as before)."""
    from dsv4.model.attention import Attention
    from dsv4.model.moe import Expert, Experts

    for h in getattr(model, "_official_quant_hooks", []):
        h.remove()
    model._official_quant_hooks = []
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.kv_transform = mod.act_transform = None
            if hasattr(mod, "compressor"):
                mod.compressor.out_transform = None
            if hasattr(mod, "indexer"):
                mod.indexer.q_transform = mod.indexer.compressor.out_transform = None
        elif isinstance(mod, (Expert, Experts)):
            mod.act_transform = None
    return model
