"""dsv4 logits equal transformers' DeepseekV4ForCausalLM (the oracle) on shared random weights."""

import pytest
import torch
from conftest import randomize_, small_config

from dsv4.convert.transformers import from_transformers_state_dict, to_transformers_config, to_transformers_state_dict
from dsv4.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


def build_pair(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomize_(model, seed)
    hf_cfg = to_transformers_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_transformers_state_dict(model.state_dict(), cfg), strict=False)
    assert missing == []
    assert all(k.startswith("mtp.") for k in unexpected)
    return model, hf


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {
    # 300 tokens crosses 18 HCA blocks (m'=16), 75 CSA blocks; top-16 of up to 75 entries is a real choice
    "sqrtsoftplus": dict(cfg={}, T=300),
    "sigmoid-router": dict(cfg=dict(scoring_func="sigmoid", num_hash_layers=2), T=300),
    "no-hash-layers": dict(cfg=dict(num_hash_layers=0), T=157),  # (transformers has no softmax router)
    "short-seq": dict(cfg={}, T=7),  # shorter than window, m and m'; no compressed entry yet
    "hca-first": dict(cfg=dict(compress_ratios=[16, 0, 4, 16], num_nextn_predict_layers=0), T=211),
}


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name):
    case = CASES[name]
    cfg = small_config(**case["cfg"])
    model, hf = build_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, case["T"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(ids).logits
    assert rel_err(ours, ref) < 1e-5


def test_indexer_selection_matters():
    """Guard against a vacuous parity: changing the indexer's weights must change the logits."""
    cfg = small_config()
    model, _ = build_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        model.layers[1].attn.indexer.wq_b.weight.normal_()
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-3


def test_state_dict_round_trip_through_transformers_layout():
    cfg = small_config()
    model = Transformer(cfg)
    sd = model.state_dict()
    back = from_transformers_state_dict(to_transformers_state_dict(sd, cfg), cfg)
    assert sd.keys() == back.keys()
    for k in sd:
        assert torch.equal(sd[k], back[k]), k
