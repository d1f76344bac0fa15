"""MTP (transformers builds none, so it is checked here) and 'a feature switched off equals the baseline'."""

import torch
from conftest import randomize_, small_config

from dsv4.kernels.attention import attention_reference
from dsv4.model.indexer import visible_entries
from dsv4.model.mhc import hc_head
from dsv4.model.norm import rms_norm
from dsv4.model.rope import apply_rope
from dsv4.model.transformer import Transformer

MTP_KEYS = {
    "e_proj.weight",
    "h_proj.weight",
    "enorm.weight",
    "hnorm.weight",
    "norm.weight",
    "hc_head_fn",
    "hc_head_base",
    "hc_head_scale",
    "attn_norm.weight",
    "ffn_norm.weight",
    "hc_attn_fn",
    "hc_ffn_fn",
    "attn.wq_a.weight",
    "attn.wkv.weight",
    "attn.attn_sink",
    "ffn.gate.weight",
    "ffn.gate.bias",
    "ffn.experts.0.w1.weight",
    "ffn.shared_experts.w2.weight",
}


def test_mtp_uses_official_names_and_is_a_learned_router_swa_block():
    cfg = small_config()
    model = Transformer(cfg)
    keys = {k[len("mtp.0.") :] for k in model.state_dict() if k.startswith("mtp.0.")}
    assert keys >= MTP_KEYS
    assert not any("compressor" in k or "indexer" in k or "tid2eid" in k for k in keys)
    assert model.mtp[0].attn.kind == "swa" and not model.mtp[0].ffn.gate.hash


def test_mtp_off_leaves_main_logits_unchanged():
    cfg = small_config()
    torch.manual_seed(0)
    with_mtp = Transformer(cfg).eval()
    randomize_(with_mtp)
    without = Transformer(cfg.replace(num_nextn_predict_layers=0, compress_ratios=cfg.compress_ratios[:4])).eval()
    missing, unexpected = without.load_state_dict(with_mtp.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("mtp.") for k in unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 90))
    with torch.no_grad():
        a = with_mtp(ids, return_mtp=True)
        b = without(ids, return_mtp=True)
    assert torch.equal(a.logits, b.logits)
    assert len(a.mtp_logits) == 1 and a.mtp_logits[0].shape == (2, 89, cfg.vocab_size)
    assert b.mtp_logits == []


def test_mtp_input_combines_next_token_embedding_and_streams():
    """MTP input = e_proj(enorm(Emb(t_{i+1}))) + h_proj(hnorm(X_i)); check via a zeroed h_proj / e_proj."""
    cfg = small_config()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize_(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        base = model(ids, return_mtp=True).mtp_logits[0]
        ids2 = ids.clone()
        ids2[0, 20] = (ids2[0, 20] + 1) % cfg.vocab_size
        changed = model(ids2, return_mtp=True).mtp_logits[0]
        # MTP position 19 reads token 20 through the embedding path (and main stream 19 does not see it)
        model.mtp[0].e_proj.weight.zero_()
        no_e = model(ids, return_mtp=True).mtp_logits[0]
        no_e2 = model(ids2, return_mtp=True).mtp_logits[0]
    assert (base[0, 19] - changed[0, 19]).abs().max() > 1e-4
    assert torch.equal(base[0, :19], changed[0, :19])
    assert torch.allclose(no_e[0, 19], no_e2[0, 19])  # without e_proj, token 20 only enters through X_20


def test_hc_head_of_equal_streams_is_weighted_copy():
    x = torch.randn(2, 5, 1, 8).expand(2, 5, 4, 8)
    fn, scale, base = torch.randn(4, 32), torch.ones(1), torch.zeros(4)
    out = hc_head(x, fn, scale, base, 1e-6, 1e-6)
    flat = rms_norm(x.flatten(-2), 1e-6)
    w = torch.sigmoid(flat @ fn.T) + 1e-6
    torch.testing.assert_close(out, w.sum(-1, keepdim=True) * x[..., 0, :])


def test_indexer_topk_covering_all_entries_equals_dense_compressed_attention():
    """CSA with index_topk >= #entries must equal dense attention over every complete entry."""
    cfg = small_config(index_topk=1000)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize_(model)
    attn = model.layers[1].attn
    assert attn.kind == "csa"
    t = 77
    x = torch.randn(2, t, cfg.hidden_size)
    pos = torch.arange(t)
    cos, sin = model.rope_compress.cos_sin(pos)
    with torch.no_grad():
        out = attn(x, cos, sin, pos)
        c_q = attn.q_norm(attn.wq_a(x))
        q = apply_rope(rms_norm(attn.wq_b(c_q).unflatten(-1, (attn.n_heads, attn.head_dim)), attn.eps), cos, sin)
        kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
        ent = attn.compressor(x, cos, sin)
        mask = visible_entries(pos, ent.shape[1], 4).expand(2, t, -1)
        o = attention_reference(q, kv, attn.attn_sink, attn.scale, attn.window, pos, pos, ent, mask)
        ref = attn.project_out(apply_rope(o, cos, sin, inverse=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
