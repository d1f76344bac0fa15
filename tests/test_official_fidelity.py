"""Where an independent check against the official inference code found dsv4 computing otherwise:
MXFP4 rounding, repeated hash-table experts, the MTP aliases of the shared embedding and head (the
softmax router's rule is in tests/test_moe.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from dsv4.model.transformer import Transformer
from dsv4.quant.formats import dequant_mxfp4, quant_mxfp4


def test_mxfp4_rounds_exact_ties_to_even_as_the_official_quantiser():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -3.5, -5.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0, -4.0])
    w = torch.zeros(1, 32)
    w[0, : ties.numel()] = ties
    w[0, -1] = 6.0  # amax 6: the block's scale is exactly 1
    packed, scale = quant_mxfp4(w)
    assert float(scale.float()[0, 0]) == 1.0
    out = dequant_mxfp4(packed, scale)[0]
    assert torch.equal(out[: ties.numel()], want) and out[-1] == 6.0
    # values off a tie still go to the nearest code, and representable values are exact
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4)
    assert torch.equal(dequant_mxfp4(*quant_mxfp4(grid[None]))[0], grid)
    near = torch.tensor([0.74, 0.76, 3.49, 3.51] + [0.0] * 27 + [6.0])
    assert dequant_mxfp4(*quant_mxfp4(near[None]))[0, :4].tolist() == [0.5, 1.0, 3.0, 4.0]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(small_config())


def test_a_hash_table_that_repeats_an_expert_is_refused_when_loaded(model):
    state = model.state_dict()
    key = next(k for k in state if k.endswith("tid2eid"))
    model.load_state_dict(state)  # the model's own table: K distinct experts per token
    bad = dict(state)
    bad[key] = state[key].clone()
    bad[key][7, 1] = bad[key][7, 0]
    with pytest.raises(ValueError, match=rf"{key}: row 7 repeats an expert"):
        model.load_state_dict(bad)
    bad[key] = state[key].clone()
    bad[key][3, 0] = model.cfg.n_routed_experts
    with pytest.raises(ValueError, match="row 3 names expert ids outside"):
        model.load_state_dict(bad)


def test_the_mtp_aliases_of_the_shared_embedding_and_head_load_when_equal(model):
    assert model.cfg.num_nextn_predict_layers >= 1
    state = model.state_dict()
    official = dict(state, **{"mtp.0.embed.weight": state["embed.weight"], "mtp.0.head.weight": state["head.weight"]})
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(official)  # strict: the aliases are accepted, not unexpected
    assert torch.equal(fresh.embed.weight, model.embed.weight) and torch.equal(fresh.head.weight, model.head.weight)
    official["mtp.0.head.weight"] = state["head.weight"] + 1
    with pytest.raises(ValueError, match=r"mtp\.0\.head\.weight differs from head\.weight"):
        fresh.load_state_dict(official)


def test_bf16_experts_round_where_the_official_code_does():
    """The routing weight multiplies W2's input and the experts' outputs are summed in fp32 (then MoE casts
    back), in the grouped, gathered (decode) and reference paths alike."""
    import torch.nn.functional as F

    from dsv4.model.moe import Experts

    torch.manual_seed(0)
    ex = Experts(4, 32, 64, 10.0)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.normal_(0, 0.1)
    ex = ex.to(torch.bfloat16)
    x = torch.randn(6, 32).bfloat16()
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
    wts = torch.rand(6, 2)
    want = torch.zeros(6, 32)
    for t in range(6):
        for j in range(2):
            e = int(idx[t, j])
            h = F.silu(F.linear(x[t], ex.w1[e]).clamp(max=10)) * F.linear(x[t], ex.w3[e]).clamp(-10, 10)
            want[t] += F.linear(h * wts[t, j].to(torch.bfloat16), ex.w2[e]).float()
    with torch.enable_grad():
        grouped = ex(x, idx, wts)
    assert grouped.dtype == torch.float32 and torch.allclose(grouped, want, rtol=0, atol=1e-6)
    assert torch.allclose(ex.forward_reference(x, idx, wts), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(ex.forward_static(x[:2], idx[:2], wts[:2]), want[:2], atol=2e-2)


def test_bf16_mhc_mixes_in_fp32():
    from dsv4.model.mhc import hc_post

    torch.manual_seed(0)
    x, out = torch.randn(2, 3, 4, 16).bfloat16(), torch.randn(2, 3, 16).bfloat16()
    post, res = torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4)
    want = (post.unsqueeze(-1) * out.float().unsqueeze(-2) + torch.matmul(res.transpose(-1, -2), x.float())).bfloat16()
    got = hc_post(out, x, post, res)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_bf16_compressor_pool_rounds_before_its_norm():
    """In a bf16 model the fp32 pool is cast to bf16 and then normalised, as the official code does; in fp32
    nothing changes."""
    from dsv4.model.compressor import Compressor

    torch.manual_seed(0)
    comp = Compressor(32, 16, 4, overlap=False, eps=1e-6)
    h, cos, sin = torch.randn(2, 8, 32), torch.ones(8, 4), torch.zeros(8, 4)  # rope on 8 dims: the identity
    with torch.no_grad():
        kv, gate = comp.project(h)
        pooled = comp.pool(kv.unflatten(1, (2, 4)), gate.unflatten(1, (2, 4)))
        assert torch.equal(comp(h, cos, sin), comp.norm(pooled))  # fp32: as before
        comp = comp.to(torch.bfloat16)
        kv, gate = comp.project(h.bfloat16())
        pooled = comp.pool(kv.unflatten(1, (2, 4)), gate.unflatten(1, (2, 4)))
        got = comp(h.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16 and torch.equal(got, comp.norm(pooled.bfloat16()))
