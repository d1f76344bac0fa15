"""bf16: the tiny model runs after model.to(torch.bfloat16) and stays close to fp32.

Measured on this config (seed 0, B=2, T=40, init std 0.02): max |logit diff| ~0.07 with max |logit|
~0.68, relative L2 error ~3.6%, max prob diff ~4e-4, argmax agreement ~95%. Tolerances below are
about 2-3x those numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dsv4 import ModelConfig, Transformer
from dsv4.model.moe import MoE

V = 256


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        hidden_size=64,
        vocab_size=V,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_hash_layers=1,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=3,
        sliding_window=8,
        compress_ratios=[0, 4, 16, 1, 0],
        num_nextn_predict_layers=1,
    )
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    m32 = Transformer(tiny_cfg()).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    return m32, m16


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))


def test_bf16_forward_finite(models, ids):
    _, m16 = models
    with torch.no_grad():
        out = m16(ids, return_mtp=True)
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (2, 40, V)
    assert torch.isfinite(out.logits).all()
    (mtp,) = out.mtp_logits
    assert mtp.dtype == torch.bfloat16 and torch.isfinite(mtp).all()


def test_bf16_close_to_fp32(models, ids):
    m32, m16 = models
    with torch.no_grad():
        a = m32(ids, return_mtp=True)
        b = m16(ids, return_mtp=True)
    la, lb = a.logits, b.logits.float()
    max_abs = (la - lb).abs().max().item()
    rel = ((la - lb).norm() / la.norm()).item()
    prob = (la.softmax(-1) - lb.softmax(-1)).abs().max().item()
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    assert rel < 0.1, rel
    assert max_abs < 0.2 * la.abs().max().item(), max_abs
    assert prob < 2e-3, prob
    assert agree > 0.8, agree
    ma, mb = a.mtp_logits[0], b.mtp_logits[0].float()
    assert ((ma - mb).norm() / ma.norm()).item() < 0.1


def test_bf16_train_step_finite(models, ids):
    _, m16 = models
    m = copy.deepcopy(m16).train()
    out = m(ids, return_mtp=True)
    loss = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1)) + out.aux_loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n


def test_rope_frequencies_survive_bf16_cast():
    torch.manual_seed(0)
    cfg = tiny_cfg(qk_rope_head_dim=16)
    m32 = Transformer(cfg)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    pos = torch.tensor([0, 1, 37, 1000, 65535])
    for kind in ("main", "compress"):
        c32, s32 = m32.ropes(pos)[kind]
        c16, s16 = m16.ropes(pos)[kind]
        assert torch.allclose(c16.float(), c32, atol=1e-3) and torch.allclose(s16.float(), s32, atol=1e-3), kind


def test_balancing_bias_update_survives_bf16_cast():
    cfg = tiny_cfg()
    moe = MoE(cfg, layer_id=2).to(torch.bfloat16)
    with torch.no_grad():
        moe.gate.bias.fill_(0.6)
        moe.load.copy_(torch.tensor([1000.0, 1.0, 1.0, 1.0]))  # expert 0 overloaded
    moe.update_bias(1e-3)
    want = torch.tensor([0.599, 0.601, 0.601, 0.601])
    assert torch.allclose(moe.gate.bias.float(), want, atol=1e-5), moe.gate.bias


def test_precision_critical_tensors_stay_fp32_after_cast():
    """Norm weights, mHC maps, sinks, ape, gate bias and RoPE frequencies stay fp32 (official layout)."""
    m = Transformer(tiny_cfg()).to(torch.bfloat16)
    fp32 = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.dtype == torch.float32]
    assert any(n.endswith("attn_norm.weight") for n in fp32) and any(n.endswith("hc_attn_fn") for n in fp32)
    assert any(n.endswith("attn_sink") for n in fp32) and any(n.endswith("gate.bias") for n in fp32)
    assert "hc_head_fn" in fp32 and "rope_compress.inv_freq" in fp32
    assert m.layers[0].attn.wq_a.weight.dtype == torch.bfloat16


def test_bf16_autocast_train_step_of_an_fp32_model(models, ids):
    """dtype=bf16 training (what dtype=auto picks where bf16 matmuls are faster): an fp32 model under CPU
    autocast. The indexer's selection runs in fp32 inside it (it once wrote bf16 products into fp32 out=)."""
    m32, _ = models
    m = copy.deepcopy(m32).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, return_mtp=True)
        loss = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
