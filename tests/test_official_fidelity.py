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
