"""Indexer KL losses (dense warm-up, sparse stage) and the mass-recall metric."""

import pytest
import torch
from conftest import randomize_, small_config

from dsv4.eval.recall import indexer_recall
from dsv4.model.indexer import indexer_kl
from dsv4.model.transformer import Transformer


def test_kl_is_zero_iff_indexer_matches_attention():
    p = torch.tensor([[[0.0, 0.2, 0.6, 0.2]]])
    allowed = torch.tensor([[[False, True, True, True]]])
    match = torch.log(torch.tensor([[[1.0, 0.2, 0.6, 0.2]]]))
    assert indexer_kl(match, p, allowed).abs() < 1e-6
    assert indexer_kl(torch.zeros(1, 1, 4), p, allowed) > 0.05
    # nothing allowed -> no contribution, no NaN
    assert indexer_kl(torch.zeros(1, 1, 4), p, torch.zeros_like(allowed)) == 0


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_loss_trains_only_the_indexer(mode):
    cfg = small_config(compress_ratios=[0, 4, 16, 1, 0], index_topk=8)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    randomize_(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 96))
    out = model(ids, indexer_mode=mode)
    assert out.indexer_loss is not None and out.indexer_loss > 0
    out.indexer_loss.backward()
    for n, p in model.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        if (".attn.indexer." in n and not n.endswith(("wgate.weight", "ape"))) or n.endswith(
            "indexer.compressor.wkv.weight"
        ):
            assert has, n
        elif ".attn.indexer." not in n:
            assert not has, n


def test_dense_mode_attends_every_visible_entry():
    """In the warm-up the CSA layer's attention equals top-k >= #entries (dense over compressed entries)."""
    cfg = small_config(index_topk=4)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize_(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 80))
    with torch.no_grad():
        dense = model(ids, indexer_mode="dense").logits
        wide = Transformer(cfg.replace(index_topk=1000)).eval()
        wide.load_state_dict(model.state_dict())
        ref = wide(ids).logits
        sparse = model(ids).logits
    torch.testing.assert_close(dense, ref)
    assert (dense - sparse).abs().max() > 1e-4


def test_recall_of_random_model_near_random_and_perfect_when_k_covers_all():
    cfg = small_config(index_topk=8)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 160))
    rec = indexer_recall(model, ids)
    assert set(rec) == {1, 3}
    for layer in rec.values():
        assert 0 < layer["recall"] <= 1 and 0 < layer["random"] <= 1 and layer["queries"] > 0
    wide = Transformer(cfg.replace(index_topk=10_000))
    wide.load_state_dict(model.state_dict())
    assert all(v["queries"] == 0 for v in indexer_recall(wide, ids).values())


def test_warmup_raises_recall_above_random():
    """A short dense warm-up (indexer-only KL, lr 1e-3 as in the DSA paper's scale) lifts mass recall."""
    cfg = small_config(
        index_topk=8, compress_ratios=[0, 4, 0], num_hidden_layers=2, num_nextn_predict_layers=1, index_n_heads=4
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    randomize_(model)
    g = torch.Generator().manual_seed(1)
    # structured data so attention has something to find: repeated random motifs
    motifs = torch.randint(0, cfg.vocab_size, (6, 8), generator=g)

    def batch():
        return motifs[torch.randint(0, 6, (4, 24), generator=g)].flatten(1)

    val = batch()
    before = indexer_recall(model, val)[1]
    params = [p for n, p in model.named_parameters() if ".indexer." in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(60):
        loss = model(batch(), indexer_mode="dense").indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = indexer_recall(model, val)[1]
    assert after["recall"] > before["recall"] + 0.02
    assert after["recall"] > after["random"] + 0.05


@pytest.mark.parametrize("packed", [False, True])
def test_sparse_stage_on_the_gather_kernels_equals_the_masked_twin(packed, monkeypatch):
    """The sparse stage (indexer_mode="sparse") of CSA and DSA layers runs Attention.sparse_indexer_core
    (no [B,T,N] tensor) under the default impl; the masked chunked kernel is its reference. Output,
    indexer KL and every gradient agree, with and without document masks."""
    from conftest import every_kind_model

    from dsv4.model import attention

    monkeypatch.setattr(attention, "SPARSE_STAGE_MIN_ENTRIES", 0)  # the gather path at any length
    model = every_kind_model().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3))
    seg = torch.cumsum((torch.arange(90) % 37 == 36).long(), 0).expand(2, -1).contiguous() if packed else None
    results = []
    for impl in ("sparse", "chunked"):
        model.set_attention_impl(impl)
        model.zero_grad()
        out = model(ids, indexer_mode="sparse", segment_ids=seg)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss + out.indexer_loss
        loss.backward()
        results.append(
            (
                out.logits.detach(),
                out.indexer_loss.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (lo_s, kl_s, g_s), (lo_c, kl_c, g_c) = results
    torch.testing.assert_close(lo_s, lo_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_s, kl_c, rtol=1e-5, atol=1e-6)
    assert kl_s > 0 and g_s.keys() == g_c.keys()
    for n in g_c:
        torch.testing.assert_close(g_s[n], g_c[n], rtol=1e-4, atol=1e-5, msg=n)
