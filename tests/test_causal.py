"""No future leakage through any layer kind (swa, csa m=4, hca m=16, dsa m=1), the MoE and the MTP block."""

from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig, Transformer

T = 40


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny").replace(
        hidden_size=64,
        vocab_size=256,
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
        initializer_range=0.1,
    )
    assert cfg.layer_kinds == ["swa", "csa", "hca", "dsa"]
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial sinks so the softmax denominators matter
        for blk in list(m.layers) + list(m.mtp):
            blk.attn.attn_sink.normal_()
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_out(model, ids):
    with torch.no_grad():
        return model(ids, return_mtp=True)


# p = 1, block edges of m=4 / m=16 (4, 16, 32), inside blocks (5, 17, 23, 31), the window edge (8, 9), T-1
@pytest.mark.parametrize("p", [1, 4, 5, 8, 9, 16, 17, 23, 31, 32, 39])
def test_no_future_leakage(model, ids, base_out, p):
    g = torch.Generator().manual_seed(p)
    pert = ids.clone()
    pert[:, p:] = torch.randint(0, 256, (2, T - p), generator=g)
    assert (pert[:, p:] != ids[:, p:]).any()
    with torch.no_grad():
        out = model(pert, return_mtp=True)
    assert torch.allclose(out.logits[:, :p], base_out.logits[:, :p], atol=1e-6, rtol=0), (
        (out.logits[:, :p] - base_out.logits[:, :p]).abs().max()
    )
    # not vacuous: the perturbed positions do change
    assert (out.logits[:, p:] - base_out.logits[:, p:]).abs().max() > 1e-3
    # MTP at position i sees main state i and token i+1: positions < p-1 only see tokens < p
    (mtp,), (mtp0,) = out.mtp_logits, base_out.mtp_logits
    assert mtp.shape == (2, T - 1, 256)
    q = p - 1
    assert torch.allclose(mtp[:, :q], mtp0[:, :q], atol=1e-6, rtol=0), (mtp[:, :q] - mtp0[:, :q]).abs().max()
    assert (mtp[:, q:] - mtp0[:, q:]).abs().max() > 1e-3


@pytest.mark.parametrize("p", [3, 16, 21, 33])
def test_prefix_forward_matches(model, ids, base_out, p):
    """Running only the first p tokens gives the same logits as the full sequence's first p."""
    with torch.no_grad():
        out = model(ids[:, :p], return_mtp=True)
    assert torch.allclose(out.logits, base_out.logits[:, :p], atol=1e-5, rtol=0), (
        (out.logits - base_out.logits[:, :p]).abs().max()
    )
    (mtp,), (mtp0,) = out.mtp_logits, base_out.mtp_logits
    assert torch.allclose(mtp, mtp0[:, : p - 1], atol=1e-5, rtol=0)


def test_batch_rows_independent(model, ids, base_out):
    """Changing sequence 1 does not touch sequence 0 (no cross-batch mixing, e.g. in routing)."""
    pert = ids.clone()
    pert[1] = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(pert, return_mtp=True)
    assert torch.allclose(out.logits[0], base_out.logits[0], atol=1e-6, rtol=0)
    assert torch.allclose(out.mtp_logits[0][0], base_out.mtp_logits[0][0], atol=1e-6, rtol=0)
