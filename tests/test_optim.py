"""V4 optimiser (docs/spec.md section 8): hybrid Newton-Schulz, Muon step math, AdamW groups, grouping, resume,
schedule."""

import io
import itertools
import math

import pytest
import torch
from conftest import small_config
from torch import nn

from dsv4.model.transformer import Transformer
from dsv4.optim import Muon, assign_param_groups, build_optimizer, clip_grad_norm, hybrid_newton_schulz, lr_at, set_lr

GAMMA = 0.18


def polar(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u @ vh).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


# ------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (7, 200)])
@pytest.mark.parametrize("bf16", [False, True])
def test_ns_orthogonalises(shape, bf16):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = hybrid_newton_schulz(g, dtype=torch.bfloat16 if bf16 else torch.float32)
    s = torch.linalg.svdvals(o.float())
    assert s.min() > 0.6 and s.max() < 1.2, (s.min(), s.max())
    assert cosine(o.float(), polar(g)) > 0.9
    if not bf16:  # fp32 hybrid schedule lands on the polar factor almost exactly
        assert (s - 1).abs().max() < 0.01
        assert cosine(o, polar(g)) > 0.999


def test_ns_batched_equals_per_matrix_each_normalised_separately():
    gen = torch.Generator().manual_seed(1)
    for shape in [(6, 24, 40), (6, 40, 24)]:
        m = torch.randn(shape, generator=gen) * (10.0 ** torch.arange(-3, 3)).view(-1, 1, 1)  # scales 1e-3..1e2
        batched = hybrid_newton_schulz(m)
        for e in range(shape[0]):
            torch.testing.assert_close(batched[e], hybrid_newton_schulz(m[e]), atol=1e-5, rtol=1e-5)
            s = torch.linalg.svdvals(batched[e])
            assert (s - 1).abs().max() < 0.01  # a joint Frobenius norm would leave the small experts ~0


def test_ns_zero_matrix_gives_zero():
    out = hybrid_newton_schulz(torch.zeros(3, 8, 5))
    assert torch.isfinite(out).all() and (out == 0).all()


# ------------------------------------------------------------------ Muon step math
def muon_step(p0: torch.Tensor, grads, lr=0.1, wd=0.0, **kw) -> tuple[torch.Tensor, Muon]:
    p = nn.Parameter(p0.clone())
    opt = Muon([p], lr=lr, weight_decay=wd, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (128, 48)])
def test_update_rms_matches_v4_scale(shape):
    gen = torch.Generator().manual_seed(2)
    p0, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    p1, _ = muon_step(p0, [g], lr=1.0)
    upd = p0 - p1
    ns = hybrid_newton_schulz(g)  # first step: Nesterov input (1 + mu) g, NS is scale-invariant
    assert rms(upd) == pytest.approx(GAMMA * math.sqrt(max(shape)) * rms(ns), rel=1e-4)
    assert rms(upd) == pytest.approx(GAMMA, rel=0.05)  # orthogonal n x m: RMS = 1/sqrt(max(n, m))


def test_update_rms_comparable_to_adamw():
    """AdamW's steady-state update RMS on noisy gradients is ~0.2 (Moonlight); Muon's is 0.18 by design."""
    gen = torch.Generator().manual_seed(3)
    shape = (64, 80)
    p_adam = nn.Parameter(torch.zeros(shape))
    adam = torch.optim.AdamW([p_adam], lr=1.0, betas=(0.9, 0.95), weight_decay=0.0)
    p_muon = nn.Parameter(torch.zeros(shape))
    muon = Muon([p_muon], lr=1.0, weight_decay=0.0)
    rms_adam, rms_muon = [], []
    for _ in range(60):
        g = torch.randn(shape, generator=gen)
        for p, opt, out in ((p_adam, adam, rms_adam), (p_muon, muon, rms_muon)):
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            out.append(rms(p.detach() - before))
    a, m = sum(rms_adam[-20:]) / 20, sum(rms_muon[-20:]) / 20
    assert 0.15 < a < 0.4 and m == pytest.approx(GAMMA, rel=0.05)
    assert 0.5 < m / a < 2.0


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_nesterov_by_hand(nesterov):
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(12, 20, generator=gen)
    g1, g2 = torch.randn(12, 20, generator=gen), torch.randn(12, 20, generator=gen)
    lr, wd, mu = 0.05, 0.1, 0.95
    p, _ = muon_step(p0, [g1, g2], lr=lr, wd=wd, momentum=mu, nesterov=nesterov)
    scale = GAMMA * math.sqrt(20)
    w, m = p0.clone(), torch.zeros_like(p0)
    for g in (g1, g2):
        m = mu * m + g  # M_t = mu M_{t-1} + G_t
        u = g + mu * m if nesterov else m
        w = w * (1 - lr * wd) - lr * scale * hybrid_newton_schulz(u)
    torch.testing.assert_close(p, w, atol=1e-6, rtol=1e-6)


def test_three_d_parameter_is_per_expert():
    gen = torch.Generator().manual_seed(5)
    p0, g = torch.randn(4, 16, 24, generator=gen), torch.randn(4, 16, 24, generator=gen)
    g[0] *= 1e3  # one expert with a huge gradient must not shrink the others' updates
    p, _ = muon_step(p0, [g], lr=1.0)
    for e in range(4):
        pe, _ = muon_step(p0[e], [g[e]], lr=1.0)
        torch.testing.assert_close(p[e], pe, atol=1e-5, rtol=1e-5)
        assert rms(p0[e] - p[e]) == pytest.approx(GAMMA, rel=0.05)


def test_row_blocks_are_independent_matrices():
    gen = torch.Generator().manual_seed(6)
    p0, g = torch.randn(2 * 8, 24, generator=gen), torch.randn(2 * 8, 24, generator=gen)
    p, _ = muon_step(p0, [g], lr=1.0, blocks=2)
    for b in range(2):
        pb, _ = muon_step(p0[8 * b : 8 * b + 8], [g[8 * b : 8 * b + 8]], lr=1.0)
        torch.testing.assert_close(p[8 * b : 8 * b + 8], pb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["muon", "adamw"])
def test_weight_decay_is_decoupled(algorithm):
    gen = torch.Generator().manual_seed(7)
    p0, g = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    lr, wd = 0.02, 0.1
    p_wd, _ = muon_step(p0, [g], lr=lr, wd=wd, algorithm=algorithm)
    p_no, _ = muon_step(p0, [g], lr=lr, wd=0.0, algorithm=algorithm)
    # W (1 - lr wd) - lr U: the gradient-driven part U does not see wd (no L2 term in the gradient)
    torch.testing.assert_close(p_wd - p_no, -lr * wd * p0, atol=1e-6, rtol=1e-5)
    if algorithm == "muon":  # zero gradient: only the decay acts
        p_z, _ = muon_step(p0, [torch.zeros_like(g)], lr=lr, wd=wd)
        torch.testing.assert_close(p_z, p0 * (1 - lr * wd), atol=0, rtol=0)


def test_adamw_groups_match_torch_adamw():
    gen = torch.Generator().manual_seed(8)
    p0 = torch.randn(10, 6, generator=gen)
    ours, ref = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt = Muon([ours], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, algorithm="adamw")
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(5):
        g = torch.randn(10, 6, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([nn.Parameter(torch.zeros(5))])


# ------------------------------------------------------------------ grouping on the real model
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(vocab_size=256))


def test_grouping_on_transformer():
    model = tiny_model()
    plan = assign_param_groups(model)
    algo = {n: a.algorithm for n, a in plan.items()}
    adamw = [
        "embed.weight",
        "head.weight",
        "norm.weight",
        "hc_head_base",
        "hc_head_scale",
        "layers.0.hc_attn_base",
        "layers.0.hc_ffn_scale",
        "layers.0.attn.attn_sink",
        "layers.0.attn.q_norm.weight",
        "layers.0.attn_norm.weight",
        "layers.1.attn.compressor.ape",
        "layers.1.attn.indexer.compressor.ape",
        "mtp.0.enorm.weight",
        "mtp.0.hc_head_base",
    ]
    muon = [
        "layers.0.attn.wq_a.weight",
        "layers.0.attn.wq_b.weight",
        "layers.0.attn.wkv.weight",
        "layers.0.attn.wo_a.weight",
        "layers.0.attn.wo_b.weight",
        "layers.0.ffn.gate.weight",
        "layers.0.ffn.experts.w1",
        "layers.0.ffn.experts.w2",
        "layers.0.ffn.experts.w3",
        "layers.0.ffn.shared_experts.w1.weight",
        "layers.1.attn.compressor.wkv.weight",
        "layers.1.attn.compressor.wgate.weight",
        "layers.1.attn.indexer.wq_b.weight",
        "layers.1.attn.indexer.weights_proj.weight",
        "mtp.0.e_proj.weight",
        "mtp.0.h_proj.weight",
        "layers.0.hc_attn_fn",
        "hc_head_fn",
    ]
    for n in adamw:
        assert algo[n] == "adamw", n
    for n in muon:
        assert algo[n] == "muon", n
    for n, a in plan.items():
        p = model.get_parameter(n)
        if a.algorithm == "muon":
            assert p.ndim >= 2 and a.weight_decay == 0.1
        elif p.ndim < 2 or n.endswith("ape"):
            assert a.weight_decay == 0.0, n
    assert plan["embed.weight"].weight_decay == plan["head.weight"].weight_decay == 0.1
    assert plan["layers.0.attn.wo_a.weight"].blocks == model.cfg.o_groups
    assert all(
        a.algorithm == "adamw"
        for n, a in plan.items()
        if n.rsplit(".", 1)[-1].startswith("hc_") and not n.endswith("_fn")
    )
    fn_adamw = assign_param_groups(model, hc_fn="adamw")
    assert fn_adamw["layers.0.hc_attn_fn"].algorithm == "adamw" and fn_adamw["hc_head_fn"].weight_decay == 0.1


def test_every_trainable_param_in_exactly_one_group():
    model = tiny_model()
    model.layers[0].attn.wq_a.weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model, lr=1e-3)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(set(seen)) == len(trainable) and set(seen) == set(trainable)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert set(names) == set(assign_param_groups(model))
    for g in opt.param_groups:
        assert g["algorithm"] in ("muon", "adamw") and "lr_mult" in g
        if g["algorithm"] == "adamw":
            assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8


def test_lr_mult_groups_and_set_lr():
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-3, lr_mult={"layers.0.": 5.0, "layers.0.ffn.": 2.0})
    plan = assign_param_groups(model, lr_mult={"layers.0.": 5.0, "layers.0.ffn.": 2.0})
    assert plan["layers.0.ffn.experts.w1"].lr_mult == 2.0  # longest prefix wins
    assert plan["layers.0.attn.wq_a.weight"].lr_mult == 5.0 and plan["layers.1.attn.wq_a.weight"].lr_mult == 1.0
    set_lr(opt, 2e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_mult"])
        for n in g["param_names"]:
            assert plan[n].lr_mult == g["lr_mult"]
    assert {g["lr_mult"] for g in opt.param_groups} == {1.0, 2.0, 5.0}


# ------------------------------------------------------------------ resume and training
def synthetic_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01


def run_steps(model, opt, steps):
    for s in steps:
        set_lr(opt, lr_at(s, 1e-2, warmup=2, total=10))
        synthetic_grads(model, s)
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_is_bitwise():
    model = tiny_model(0)
    opt = build_optimizer(model, lr=1e-2, lr_mult={"layers.1.": 3.0})
    run_steps(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(model, opt, range(3, 8))

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = tiny_model(1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    with pytest.raises(ValueError):  # a different grouping (no lr_mult groups) does not silently load
        build_optimizer(resumed, lr=1e-2).load_state_dict(ckpt["opt"])
    opt2 = build_optimizer(resumed, lr=123.0, lr_mult={"layers.1.": 3.0})  # lr comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ckpt["opt"]["param_groups"]]
    run_steps(resumed, opt2, range(3, 8))
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_regression_loss_decreases():
    """Least squares y = x W^T + b (W: Muon, b: AdamW) and per-expert z_e = x_e V_e^T (3-D Muon)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(256, 32, generator=gen)
    xe = torch.randn(3, 64, 16, generator=gen)
    w_true, b_true = torch.randn(16, 32, generator=gen) / 32**0.5, torch.randn(16, generator=gen) * 0.3
    v_true = torch.randn(3, 16, 16, generator=gen) / 4
    y, z = x @ w_true.T + b_true, xe @ v_true.mT

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 16)
            self.experts = nn.Parameter(torch.randn(3, 16, 16) * 0.02)

        def loss(self):
            return (self.proj(x) - y).pow(2).mean() + (xe @ self.experts.mT - z).pow(2).mean()

    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, lr=0.05, weight_decay=0.0)
    assert {g["algorithm"] for g in opt.param_groups} == {"muon", "adamw"}
    losses = []
    for s in range(80):
        set_lr(opt, lr_at(s, 0.05, warmup=5, total=80))
        loss = net.loss()
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(net.parameters(), 10.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses[::10]


def test_tiny_transformer_overfits_a_batch():
    model = tiny_model()
    opt = build_optimizer(model, lr=3e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(10))
    losses = []
    for _ in range(6):
        out = model(ids)
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------ schedule
def test_schedule_values():
    max_lr, warmup, total = 1e-3, 100, 1000
    assert lr_at(0, max_lr, warmup, total) == pytest.approx(max_lr / warmup)
    assert lr_at(warmup - 1, max_lr, warmup, total) == pytest.approx(max_lr)
    assert lr_at(warmup, max_lr, warmup, total) == pytest.approx(max_lr)
    assert lr_at((warmup + total) // 2, max_lr, warmup, total) == pytest.approx(0.55 * max_lr)
    assert lr_at(total, max_lr, warmup, total) == pytest.approx(0.1 * max_lr)
    assert lr_at(10 * total, max_lr, warmup, total) == pytest.approx(0.1 * max_lr)
    assert lr_at(0, max_lr, 0, total) == pytest.approx(max_lr)
    lrs = [lr_at(s, max_lr, warmup, total, min_ratio=0.0) for s in range(total + 1)]
    assert all(a <= b for a, b in itertools.pairwise(lrs[:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :])) and lrs[-1] == 0.0
    assert clip_grad_norm is torch.nn.utils.clip_grad_norm_


def test_batched_newton_schulz_across_parameters_equals_one_by_one():
    """Small same-shaped parameters share one batched Newton-Schulz; each must get its own update."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(16, 24), (16, 24), (3, 16, 24), (24, 16), (16, 24)]
    p0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (100.0 if i == 1 else 1.0) for s in shapes] for i in range(2)]
    together = [nn.Parameter(x.clone()) for x in p0]
    opt = Muon(together, lr=0.1, weight_decay=0.1)
    for gs in grads:
        for p, g in zip(together, gs):
            p.grad = g.clone()
        opt.step()
    for k, x in enumerate(p0):
        alone, _ = muon_step(x, [gs[k] for gs in grads], lr=0.1, wd=0.1)
        torch.testing.assert_close(together[k].detach(), alone, atol=1e-6, rtol=1e-6)
