"""FP8 block and MXFP4 formats of official checkpoints, and loading a quantised checkpoint."""

import torch
from conftest import small_config

from dsv4.model.transformer import Transformer
from dsv4.quant.formats import (
    dequant_fp8_block,
    dequant_mxfp4,
    dequant_mxfp4_reference,
    dequantize_state_dict,
    quant_fp8_block,
    quant_mxfp4,
)
from dsv4.weights import load_model, save_state_dict


def test_fp8_block_scales_are_per_128x128_block():
    w = torch.randn(200, 300)
    w[:128, :128] *= 100  # one loud block must not change the others' scales
    q, s = quant_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float8_e8m0fnu
    sf = s.float()
    assert torch.equal(sf, torch.exp2(torch.log2(sf).round()))  # powers of two
    assert sf[0, 0] > 50 * sf[1, 1]
    back = dequant_fp8_block(q, s)
    rel = (back - w).abs() / w.abs().clamp_min(1e-3)
    assert rel.median() < 0.04  # e4m3 has 3 mantissa bits


def test_mxfp4_nibble_order_and_values():
    # one row of 32: even elements in low nibbles. codes: 1 -> 0.5, 0xA -> -1.0, 7 -> 6.0
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = 0x1 | (0xA << 4)
    packed[0, 1] = 0x7
    scale = torch.tensor([[2.0]]).to(torch.float8_e8m0fnu)
    w = dequant_mxfp4(packed, scale)
    assert w.shape == (1, 32)
    assert w[0, :4].tolist() == [1.0, -2.0, 12.0, 0.0]


def test_mxfp4_table_lookup_equals_the_nibble_twin_bit_for_bit():
    """Every byte value, signed zeros included, with scales from 2^-127 to 2^127, in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    packed = torch.cat([torch.arange(256, dtype=torch.uint8), torch.randint(0, 256, (7 * 256,), generator=g).byte()])
    packed = packed.view(4, 2, 256)
    scale = torch.exp2(torch.randint(-127, 128, (4, 2, 16), generator=g).float()).to(torch.float8_e8m0fnu)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = dequant_mxfp4(packed, scale, dtype), dequant_mxfp4_reference(packed, scale, dtype)
        assert a.shape == b.shape == (4, 2, 512) and a.dtype == dtype
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(a.view(bits), b.view(bits))


def test_mxfp4_round_trip_exact_on_grid():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    w = grid[torch.randint(0, 8, (4, 64))] * torch.where(torch.rand(4, 64) < 0.5, -1.0, 1.0)
    w[:, ::32] = 6.0  # amax 6 -> scale 1
    packed, s = quant_mxfp4(w)
    assert torch.equal(dequant_mxfp4(packed, s), w)


def test_quantised_official_checkpoint_loads(tmp_path):
    cfg = small_config()
    model = Transformer(cfg)
    sd = model.state_dict()
    qsd = {}
    for k, v in sd.items():
        if k.endswith("attn.wq_b.weight"):
            qsd[k], qsd[k[:-7] + ".scale"] = quant_fp8_block(v)
        elif ".experts." in k and k.endswith("w1.weight"):
            qsd[k], qsd[k[:-7] + ".scale"] = quant_mxfp4(v)
        else:
            qsd[k] = v
    deq = dequantize_state_dict(qsd)
    assert deq.keys() == sd.keys()
    save_state_dict(qsd, tmp_path)
    cfg.to_json(tmp_path / "config.json")
    loaded = load_model(tmp_path)
    for k in deq:
        assert torch.equal(loaded.state_dict()[k], deq[k]), k
