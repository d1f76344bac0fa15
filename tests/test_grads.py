"""Every trainable parameter learns from the LM loss (+ MTP + balance loss), except the lightning indexer.

The indexer's top-k is not differentiable, so attn.indexer.* get no gradient from the LM loss by design;
they are trained by a separate KL loss (docs/spec.md section 2, "Indexer training").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4 import ModelConfig, Transformer

V = 256


@pytest.fixture(scope="module")
def grads():
    cfg = ModelConfig.preset("tiny").replace(
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
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    out = model(ids, return_mtp=True)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    (mtp,) = out.mtp_logits  # position i predicts token i + 2
    loss = loss + cfg.mtp_loss_weight * F.cross_entropy(mtp[:, :-1].reshape(-1, V), ids[:, 2:].reshape(-1))
    loss = loss + out.aux_loss
    loss.backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _is_indexer(name: str) -> bool:
    return ".attn.indexer." in name


def test_indexer_params_exist_and_get_no_lm_gradient(grads):
    _model, g = grads
    names = [n for n in g if _is_indexer(n)]
    # CSA (layer 1) and DSA (layer 3) layers carry an indexer; the CSA one has its own compressor
    assert any(n.startswith("layers.1.attn.indexer.compressor.") for n in names)
    assert any(n.startswith("layers.3.attn.indexer.") for n in names)
    assert not any(n.startswith(("layers.0.attn.indexer", "layers.2.attn.indexer", "mtp.")) for n in names)
    bad = [n for n in names if g[n] is not None and g[n].abs().sum() > 0]
    assert not bad, f"indexer params got an LM gradient: {bad}"


def test_every_other_param_gets_nonzero_finite_grad(grads):
    _model, g = grads
    missing = [n for n, v in g.items() if not _is_indexer(n) and v is None]
    zero = [n for n, v in g.items() if not _is_indexer(n) and v is not None and not v.any()]
    nonfinite = [n for n, v in g.items() if v is not None and not torch.isfinite(v).all()]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"
    assert not nonfinite, f"non-finite gradient: {nonfinite}"


def test_every_routed_expert_learns(grads):
    """Per expert slice of the stacked weights (tiny config: every expert is routed some token)."""
    _model, g = grads
    for name in g:
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            per_expert = g[name].flatten(1).abs().sum(-1)
            assert (per_expert > 0).all(), (name, per_expert)


def test_routing_buffers_are_not_parameters(grads):
    model, _ = grads
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "layers.0.ffn.gate.tid2eid" in buffers and buffers["layers.0.ffn.gate.tid2eid"].dtype == torch.long
    for i in (1, 2, 3):
        assert f"layers.{i}.ffn.gate.bias" in buffers
    assert "mtp.0.ffn.gate.bias" in buffers
    assert not any(n.endswith(("gate.bias", "tid2eid")) for n in params)
    assert not any(b.requires_grad for b in buffers.values())
    # both are in the state dict (official checkpoint keys)
    sd = model.state_dict()
    assert "layers.0.ffn.gate.tid2eid" in sd and "layers.1.ffn.gate.bias" in sd
