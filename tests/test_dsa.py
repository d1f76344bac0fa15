"""DSA mode (compress ratio 1, docs/spec.md section 2) against a brute-force per-query reference.

The reference below is written from the spec, not from dsv4's code: for each query t it scores every
raw token s <= t with the lightning indexer (using the module's own weights), takes the top-k with
the rule "higher score first, then lower position" among the tokens OUTSIDE the window (s <= t - n_win;
window tokens are always attended, so selecting them would waste slots), forms the key set
window (t - n_win, t] UNION selected (disjoint), and runs one softmax with the per-head sink, in float64
with plain loops.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig
from dsv4.kernels.topk import topk_indices
from dsv4.model.attention import Attention
from dsv4.model.rope import Rotary

WINDOW, TOPK = 4, 6


def dsa_config(**kw) -> ModelConfig:
    base = dict(
        hidden_size=48,
        vocab_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=24,
        o_groups=2,
        o_lora_rank=16,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_hash_layers=0,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=TOPK,
        sliding_window=WINDOW,
        compress_ratios=[1],
        num_nextn_predict_layers=0,
    )
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)


def make_attention(cfg: ModelConfig, seed: int) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(cfg, 0)
    with torch.no_grad():  # move away from trivial init: random sinks and norm weights
        attn.attn_sink.copy_(torch.randn(cfg.num_attention_heads))
        for mod in attn.modules():
            if type(mod).__name__ == "RMSNorm":
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape))
    return attn


# ----------------------------------------------------------------------------- reference
def _rms(x, w=None, eps=1e-6):
    y = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rope(x, cos, sin, inverse=False):
    """Interleaved pairs on the last 2*len(cos) dims; x [..., D], cos/sin [r/2] for one position."""
    r = 2 * cos.numel()
    d = x.shape[-1]
    s = -sin if inverse else sin
    y = x.clone()
    a, b = x[..., d - r :: 2], x[..., d - r + 1 :: 2]
    y[..., d - r :: 2] = a * cos - b * s
    y[..., d - r + 1 :: 2] = a * s + b * cos
    return y


def reference_dsa(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, window: int, topk: int):
    """x [B, T, d] -> (out [B, T, d] float64, key sets [B][T] -> sorted list, scores [B][T] -> [t+1])."""
    W = {k: v.detach().double() for k, v in attn.state_dict().items()}
    cos, sin = cos.double(), sin.double()
    b, t_len, _ = x.shape
    h, c = attn.n_heads, attn.head_dim
    n_i, c_i = attn.indexer.n_heads, attn.indexer.head_dim
    g = attn.groups
    x = x.double()
    out = torch.zeros(b, t_len, x.shape[-1], dtype=torch.float64)
    key_sets, all_scores = [], []
    for bi in range(b):
        kv = [_rope(_rms(x[bi, s] @ W["wkv.weight"].T, W["kv_norm.weight"]), cos[s], sin[s]) for s in range(t_len)]
        k_i = [
            _rope(
                _rms(x[bi, s] @ W["indexer.compressor.wkv.weight"].T, W["indexer.compressor.norm.weight"]),
                cos[s],
                sin[s],
            )
            for s in range(t_len)
        ]
        sets_b, scores_b = [], []
        for t in range(t_len):
            cq = _rms(x[bi, t] @ W["wq_a.weight"].T, W["q_norm.weight"])
            q = _rope(_rms((cq @ W["wq_b.weight"].T).view(h, c)), cos[t], sin[t])
            q_i = _rope((cq @ W["indexer.wq_b.weight"].T).view(n_i, c_i), cos[t], sin[t])
            w_i = (x[bi, t] @ W["indexer.weights_proj.weight"].T) * n_i**-0.5 * c_i**-0.5
            scores = []
            for s in range(t + 1):
                scores.append(sum(w_i[j] * torch.relu(q_i[j] @ k_i[s]) for j in range(n_i)).item())
            chosen = sorted(range(max(0, t - window + 1)), key=lambda s: (-scores[s], s))[:topk]
            keys = sorted(set(range(max(0, t - window + 1), t + 1)) | set(chosen))
            sets_b.append(keys)
            scores_b.append(scores)
            heads = []
            for hh in range(h):
                logits = torch.stack([q[hh] @ kv[s] for s in keys]) * c**-0.5
                denom = logits.exp().sum() + W["attn_sink"][hh].exp()
                p = logits.exp() / denom
                o = sum(p[i] * kv[s] for i, s in enumerate(keys))
                heads.append(_rope(o, cos[t], sin[t], inverse=True))
            per_group = h // g
            olr = W["wo_a.weight"].shape[0] // g
            z = []
            for gi in range(g):
                og = torch.cat(heads[gi * per_group : (gi + 1) * per_group])
                z.append(og @ W["wo_a.weight"][gi * olr : (gi + 1) * olr].T)
            out[bi, t] = torch.cat(z) @ W["wo_b.weight"].T
        key_sets.append(sets_b)
        all_scores.append(scores_b)
    return out, key_sets, all_scores


def run_module(attn: Attention, x: torch.Tensor, cos, sin):
    positions = torch.arange(x.shape[1])
    with torch.no_grad():
        y, ix = attn.forward_indexer(x, (cos, sin), positions, collect=True)
        y_plain = attn(x, cos, sin, positions)
    d = ix.record
    scores, visible, entry_mask = d["scores"], d["visible"], d["entry_mask"]
    return y, y_plain, scores, visible, entry_mask


@pytest.mark.parametrize("t_len", [1, 3, 5, 6, 7, 13, 24])
def test_dsa_attention_matches_bruteforce(t_len):
    cfg = dsa_config()
    assert cfg.layer_kind(0) == "dsa"
    attn = make_attention(cfg, seed=t_len)
    assert attn.kind == "dsa" and not hasattr(attn, "compressor")
    g = torch.Generator().manual_seed(100 + t_len)
    x = torch.randn(2, t_len, cfg.hidden_size, generator=g)
    rot = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
    cos, sin = rot.cos_sin(torch.arange(t_len))

    y, y_plain, scores, visible, entry_mask = run_module(attn, x, cos, sin)
    ref, key_sets, ref_scores = reference_dsa(attn, x, cos, sin, WINDOW, TOPK)

    # indexer scores of every visible (s <= t) token
    for bi in range(2):
        for t in range(t_len):
            assert visible[bi, t].tolist() == [s <= t - WINDOW for s in range(t_len)]
            got = scores[bi, t, : t + 1].double()
            assert torch.allclose(got, torch.tensor(ref_scores[bi][t], dtype=torch.float64), atol=1e-5)
    # key sets: module's window U selected entries == reference's
    pos = torch.arange(t_len)
    window = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < WINDOW)
    outside = 0
    for bi in range(2):
        for t in range(t_len):
            got_keys = sorted(((entry_mask[bi, t] | window[t]).nonzero().flatten()).tolist())
            assert got_keys == key_sets[bi][t], (bi, t)
            # the module's entry mask never repeats a window key (union, each key once)
            assert not (entry_mask[bi, t] & window[t]).any()
            outside += sum(1 for s in key_sets[bi][t] if s <= t - WINDOW)
    if t_len > WINDOW:
        assert outside > 0  # selection really adds keys outside the window
    assert torch.allclose(y, y_plain, rtol=1e-5, atol=1e-6)  # collect path (chunked) vs sparse kernel
    err = (y.double() - ref).abs().max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("t_len", [1, 6, 13, 24])
def test_dsa_v32_rule_matches_bruteforce(t_len):
    """dsa_rule="v3.2": no window, the indexer's top-k of every s <= t (V3.2's selection rule), the sink kept;
    the brute-force reference with window 0 says exactly that."""
    cfg = dsa_config(dsa_rule="v3.2")
    attn = make_attention(cfg, seed=t_len)
    assert attn.window == 0 and attn.indexer.exclude_window == 0
    x = torch.randn(2, t_len, cfg.hidden_size, generator=torch.Generator().manual_seed(200 + t_len))
    rot = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
    cos, sin = rot.cos_sin(torch.arange(t_len))
    y, y_plain, _, visible, entry_mask = run_module(attn, x, cos, sin)
    ref, key_sets, _ = reference_dsa(attn, x, cos, sin, 0, TOPK)
    for bi in range(2):
        for t in range(t_len):
            assert visible[bi, t].tolist() == [s <= t for s in range(t_len)]
            assert sorted(entry_mask[bi, t].nonzero().flatten().tolist()) == key_sets[bi][t]
            assert len(key_sets[bi][t]) == min(TOPK, t + 1)
    assert torch.allclose(y, y_plain, rtol=1e-5, atol=1e-6)
    assert (y.double() - ref).abs().max().item() < 2e-5
    assert cfg.to_dict()["dsa_rule"] == "v3.2" and "dsa_rule" not in dsa_config().to_dict()


def test_dsa_v32_rule_cached_decode_equals_forward():
    from conftest import randomize_, small_config

    from dsv4.infer.cache import ModelCache
    from dsv4.model.transformer import Transformer

    cfg = small_config(num_hidden_layers=3, compress_ratios=[1, 4, 1, 0], sliding_window=8, index_topk=6)
    torch.manual_seed(0)
    model = Transformer(cfg.replace(dsa_rule="v3.2")).eval()
    randomize_(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = ModelCache(model, batch=2, capacity=16, page=16)
        parts = [model(ids[:, :19], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(19, 40)]
    assert ((torch.cat(parts, 1) - full).abs().max() / full.abs().max()).item() < 1e-5


def test_dsa_topk_beyond_context_is_dense_causal():
    """index_topk >= T: every past token is attended exactly once (a double-counted window key
    would change the softmax), i.e. DSA == dense causal attention with the sink."""
    t_len = 9
    cfg = dsa_config(index_topk=64)
    attn = make_attention(cfg, seed=0)
    x = torch.randn(1, t_len, cfg.hidden_size)
    rot = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
    cos, sin = rot.cos_sin(torch.arange(t_len))
    y, *_ = run_module(attn, x, cos, sin)
    ref, key_sets, _ = reference_dsa(attn, x, cos, sin, WINDOW, 64)
    assert all(key_sets[0][t] == list(range(t + 1)) for t in range(t_len))
    assert (y.double() - ref).abs().max().item() < 2e-5


def test_dsa_indexer_gets_no_lm_gradient():
    cfg = dsa_config()
    attn = make_attention(cfg, seed=1)
    x = torch.randn(1, 10, cfg.hidden_size)
    rot = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
    cos, sin = rot.cos_sin(torch.arange(10))
    attn(x, cos, sin, torch.arange(10)).square().sum().backward()
    for name, p in attn.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- top-k rule
def test_topk_ties_higher_score_then_lower_position():
    s = torch.tensor([[1.0, 3.0, 0.0, 3.0, 1.0, 0.0, 3.0]])
    assert topk_indices(s, 2).tolist() == [[1, 3]]
    assert topk_indices(s, 4).tolist() == [[1, 3, 6, 0]]
    assert topk_indices(s, 7).tolist() == [[1, 3, 6, 0, 4, 2, 5]]
    zeros = torch.zeros(2, 5)  # ReLU exact-zero ties: lowest positions win
    assert topk_indices(zeros, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    neg = torch.tensor([[-1.0, 0.0, -1.0, 0.0]])
    assert topk_indices(neg, 3).tolist() == [[1, 3, 0]]


def test_topk_tie_rule_independent_of_layout():
    """Same scores as a slice of a bigger, non-contiguous tensor: same answer (torch.topk may differ)."""
    base = torch.tensor([2.0, 0.0, 2.0, 0.0, 0.0, 1.0, 2.0, 0.0])
    big = torch.zeros(3, 16)
    big[1, ::2] = base
    view = big[1, ::2]
    assert not view.is_contiguous()
    assert topk_indices(view, 5).tolist() == topk_indices(base.clone(), 5).tolist() == [0, 2, 6, 5, 1]


def test_topk_pads_with_minus_one_when_few_visible():
    scores = torch.tensor([[0.5, 2.0, 1.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 5.0, 4.0]])
    visible = torch.tensor(
        [[True, True, True, False, False], [True, False, False, False, False], [True, True, True, True, True]]
    )
    idx = topk_indices(scores, 4, visible)
    assert idx.tolist() == [[1, 2, 0, -1], [0, -1, -1, -1], [3, 4, 0, 2]]
    # k larger than N: all entries (min(k, N) columns), invisible ones as -1
    idx = topk_indices(scores, 10, visible)
    assert idx.shape == (3, 5)
    assert idx[1].tolist() == [0, -1, -1, -1, -1]
    # nothing visible: all -1
    idx = topk_indices(scores, 2, torch.zeros_like(visible))
    assert (idx == -1).all()


def test_topk_visible_with_minus_inf_scores():
    """A visible entry whose score is -inf is still a visible entry; an invisible one never is."""
    scores = torch.tensor([[float("-inf"), 1.0, 5.0]])
    visible = torch.tensor([[True, True, False]])
    assert topk_indices(scores, 3, visible).tolist() == [[1, 0, -1]]
