"""DeepSeekMoE (docs/spec.md section 3): stacked experts vs the per-token loop, balancing bias, hash routing,
router weight normalisation and the sequence-wise balance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4 import ModelConfig, Transformer
from dsv4.model.moe import Experts, Gate, MoE


def moe_config(**kw) -> ModelConfig:
    base = dict(
        hidden_size=32,
        vocab_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        moe_intermediate_size=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_hash_layers=1,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        sliding_window=8,
        compress_ratios=[0, 0, 0],
    )
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)


# ----------------------------------------------------------------------------- experts fast path
@pytest.mark.parametrize("limit", [10.0, 0.5, 0.0])
@pytest.mark.parametrize("n_tok,k,used", [(37, 2, 6), (50, 3, 3), (1, 1, 1), (64, 6, 8)])
def test_experts_fast_path_matches_reference(limit, n_tok, k, used):
    torch.manual_seed(n_tok * 10 + k)
    n_exp, d, inter = 8, 16, 24
    ex = Experts(n_exp, d, inter, limit)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.normal_(0, 0.5)
    allowed = torch.randperm(n_exp)[:used]  # some experts unused
    idx = torch.stack([allowed[torch.randperm(used)[:k]] for _ in range(n_tok)])
    x = torch.randn(n_tok, d) * 2
    weights = torch.rand(n_tok, k)
    dy = torch.randn(n_tok, d)

    def run(fn):
        ex.zero_grad(set_to_none=True)
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = fn(xx, idx, ww)
        (y * dy).sum().backward()
        return y.detach(), xx.grad, ww.grad, ex.w1.grad.clone(), ex.w2.grad.clone(), ex.w3.grad.clone()

    fast, ref = run(ex.forward), run(ex.forward_reference)
    for name, a, b in zip(("y", "dx", "dweights", "dw1", "dw2", "dw3"), fast, ref):
        err, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
        assert err <= 2e-6 * scale, (name, err, scale)  # fp32 summation order only
    unused = torch.ones(n_exp, dtype=torch.bool)
    unused[allowed] = False
    assert not fast[3][unused].any()  # experts nobody routes to get zero gradient
    if limit == 0.5:  # the clamp really bites in this case
        assert (F.linear(x, ex.w1[allowed[0]]).abs() > limit).any()


def test_experts_swiglu_formula():
    torch.manual_seed(0)
    ex = Experts(3, 8, 12, 1.0)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.normal_(0, 1)
    x = torch.randn(5, 8)
    idx = torch.tensor([[2], [0], [2], [1], [0]])
    w = torch.rand(5, 1)
    y = ex(x, idx, w)
    for i in range(5):
        e = idx[i, 0]
        gate = (ex.w1[e] @ x[i]).clamp(max=1.0)
        up = (ex.w3[e] @ x[i]).clamp(-1.0, 1.0)
        want = w[i, 0] * (ex.w2[e] @ (F.silu(gate) * up))
        assert torch.allclose(y[i], want, atol=1e-5)


# ----------------------------------------------------------------------------- balancing bias
def test_update_bias_moves_load_toward_uniform():
    cfg = moe_config(num_hash_layers=0)
    torch.manual_seed(0)
    moe = MoE(cfg, layer_id=1).train()
    d = cfg.hidden_size
    u = F.normalize(torch.randn(d), dim=0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[:2] += 3.0 * u  # experts 0, 1 strongly preferred along u
        moe.gate.bias.zero_()
        for p in list(moe.experts.parameters()) + list(moe.shared_experts.parameters()):
            p.normal_(0, 0.05)
    x = (torch.randn(4, 64, d) * 0.5 + 2.0 * u).detach()
    vios = []
    with torch.no_grad():
        for _ in range(150):
            moe(x)
            vios.append(moe.max_violation())
            moe.update_bias(0.02)
    assert (moe.load == 0).all()  # update_bias consumes the counter
    first, last = vios[0], sum(vios[-20:]) / 20
    assert first > 1.0, first  # skewed: ~3 (all tokens on 2 of 8 experts)
    assert last < first / 2, (first, last)
    assert last < 0.5, last
    assert moe.gate.bias[:2].max() < moe.gate.bias[2:].min()  # preferred experts were pushed down


def test_update_bias_sign_rule_and_hash_layers_untouched():
    cfg = moe_config()
    moe = MoE(cfg, layer_id=1)
    moe.load.copy_(torch.tensor([10.0, 0, 2, 2, 2, 2, 2, 4]))  # mean 3
    moe.update_bias(0.5)
    assert moe.gate.bias.tolist() == [-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]
    h = MoE(cfg, layer_id=0)
    assert h.gate.hash and "bias" not in dict(h.gate.named_buffers())
    h.load.fill_(3.0)
    h.update_bias(0.5)
    assert (h.load == 0).all()


def test_max_violation():
    moe = MoE(moe_config(), layer_id=1)
    assert moe.max_violation(torch.tensor([1.0, 1, 1, 1])) == pytest.approx(0.0)
    assert moe.max_violation(torch.tensor([4.0, 0, 0, 0])) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- hash routing
def test_hash_routing_uses_tid2eid_rows():
    cfg = moe_config(num_hash_layers=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    moe = model.layers[0].ffn
    assert moe.gate.hash and not model.layers[1].ffn.gate.hash
    table = moe.gate.tid2eid
    assert table.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert ((table >= 0) & (table < cfg.n_routed_experts)).all()
    for row in table.tolist():
        assert len(set(row)) == len(row), row  # distinct ids per row
    assert len({tuple(r) for r in table.tolist()}) > 1  # not all rows the same

    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    x = torch.randn(2, 9, cfg.hidden_size)
    w, idx, s = moe.gate(x.reshape(-1, cfg.hidden_size), ids)
    assert torch.equal(idx, table[ids.reshape(-1)])
    want_w = s.gather(1, idx)
    want_w = want_w / want_w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w, want_w, atol=1e-6)
    # the whole layer: routed experts on the table's ids + shared expert
    moe.eval()
    with torch.no_grad():
        y, aux = moe(x, ids)
        flat = x.reshape(-1, cfg.hidden_size)
        want = moe.experts.forward_reference(flat, idx, want_w) + moe.shared_experts(flat)
    assert aux is None
    assert torch.allclose(y.reshape(-1, cfg.hidden_size), want, atol=1e-5)
    # routing ignores the router's preference: shifting the router does not move the experts
    with torch.no_grad():
        moe.gate.weight.add_(torch.randn_like(moe.gate.weight))
    _, idx2, _ = moe.gate(flat, ids)
    assert torch.equal(idx, idx2)
    with pytest.raises(ValueError):
        moe.gate(flat, None)


# ----------------------------------------------------------------------------- routers
@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_router_weights_follow_the_official_normalisation(func):
    cfg = moe_config(scoring_func=func, routed_scaling_factor=2.5, num_experts_per_tok=3)
    torch.manual_seed(1)
    gate = Gate(cfg, hash_routed=False)
    with torch.no_grad():
        gate.weight.normal_(0, 1)
        gate.bias.copy_(torch.randn(cfg.n_routed_experts))
    x = torch.randn(40, cfg.hidden_size)
    w, idx, s = gate(x)
    assert w.dtype == torch.float32 and w.shape == (40, 3)
    if func != "softmax":
        assert torch.allclose(w.sum(-1), torch.full((40,), 2.5), atol=1e-5)
    logits = x @ gate.weight.T
    want_s = {"sqrtsoftplus": F.softplus(logits).sqrt(), "sigmoid": logits.sigmoid(), "softmax": logits.softmax(-1)}[
        func
    ]
    assert torch.allclose(s, want_s, atol=1e-6)
    # selection uses s + bias, weights use the unbiased s
    want_idx = (s + gate.bias).topk(3, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
    ww = s.gather(1, idx)
    if func == "softmax":  # the official rule: softmax top-k weights are not renormalised
        assert torch.allclose(w, ww * 2.5, atol=1e-6) and (w.sum(-1) < 2.5).all()
    else:
        assert torch.allclose(w, ww / ww.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def test_router_without_normalisation():
    cfg = moe_config(scoring_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.0)
    gate = Gate(cfg, hash_routed=False)
    with torch.no_grad():
        gate.weight.normal_(0, 1)
    x = torch.randn(10, cfg.hidden_size)
    w, idx, s = gate(x)
    assert torch.allclose(w, s.gather(1, idx) * 2.0)


def test_bias_changes_selection_not_weights():
    cfg = moe_config()
    gate = Gate(cfg, hash_routed=False)
    with torch.no_grad():
        gate.weight.normal_(0, 1)
    x = torch.randn(30, cfg.hidden_size)
    _, _idx0, s = gate(x)
    with torch.no_grad():
        gate.bias[7] = 100.0
    w, idx, _ = gate(x)
    assert (idx == 7).any(-1).all()
    ww = s.gather(1, idx)
    assert torch.allclose(w, ww / ww.sum(-1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)


# ----------------------------------------------------------------------------- balance loss
def test_sequence_balance_loss_hand_computation():
    cfg = moe_config(seq_aux_loss_alpha=0.01, num_experts_per_tok=3)
    torch.manual_seed(2)
    moe = MoE(cfg, layer_id=1).train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1)
        for p in list(moe.experts.parameters()) + list(moe.shared_experts.parameters()):
            p.normal_(0, 0.1)
    b, t, n_exp, k = 3, 11, cfg.n_routed_experts, 3
    x = torch.randn(b, t, cfg.hidden_size)
    _, aux = moe(x)
    _, idx, s = moe.gate(x.reshape(-1, cfg.hidden_size))
    idx, s = idx.view(b, t, k).tolist(), s.view(b, t, n_exp)
    total = 0.0
    for bi in range(b):
        seq = 0.0
        for i in range(n_exp):
            count = sum(1 for tt in range(t) for e in idx[bi][tt] if e == i)
            f_i = n_exp / (k * t) * count
            p_i = sum((s[bi, tt, i] / s[bi, tt].sum()).item() for tt in range(t)) / t
            seq += f_i * p_i
        total += seq
    want = 0.01 * total / b  # per-sequence losses averaged over the batch
    assert aux is not None and aux.ndim == 0
    assert aux.item() == pytest.approx(want, rel=1e-5)
    # perfectly balanced routing (token t -> experts t, t+1, t+2 mod E: f_i = 1) and uniform scores
    # (P_i = 1/E) give exactly alpha per sequence
    idx_bal = (torch.arange(n_exp)[:, None] + torch.arange(k)[None, :]) % n_exp
    idx_bal = idx_bal.unsqueeze(0)
    uni = torch.ones(1, n_exp, n_exp)
    assert moe.balance_loss(idx_bal, uni).item() == pytest.approx(0.01)
    # eval mode: no aux loss and no load accounting
    moe.eval()
    moe.load.zero_()
    _, aux = moe(x)
    assert aux is None and (moe.load == 0).all()


def test_balance_loss_gradient_reaches_router_only_through_scores():
    cfg = moe_config(seq_aux_loss_alpha=1.0)
    moe = MoE(cfg, layer_id=1).train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1)
    x = torch.randn(2, 7, cfg.hidden_size)
    _, aux = moe(x)
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad is None
