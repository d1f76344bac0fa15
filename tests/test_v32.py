"""The DeepSeek-V3.2 family (dsv4.model.v32, dsv4.model.mla, dsv4.convert.v32): logits and indexer selections
equal transformers' DeepseekV32ForCausalLM (the oracle) on shared random weights, cached decode equals the full
forward, the plain expanded-latent twin equals the absorbed path (forward and backward), V3 group-limited
routing equals transformers' router, names convert exactly, the shipped FP8 layout loads by name, and
`dsv4 info --preset v3.2` gives the published totals."""

import dataclasses

import pytest
import torch

from dsv4.config import ConfigError, ModelConfig
from dsv4.convert.v32 import from_hub_state_dict, load_hub, save_hub, to_hub_state_dict
from dsv4.model import build_model
from dsv4.model.v32 import V32Transformer

transformers = pytest.importorskip("transformers")

YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def v32_config(**overrides) -> ModelConfig:
    """A tiny V3.2 config: 16 indexer heads (so top-k boundaries do not tie), top-8 of every earlier token,
    4 expert groups of 2 with 2 kept, one dense first layer."""
    d = dict(
        model_type="deepseek_v32",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=24,
        qk_nope_head_dim=24,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        index_topk=8,
        index_head_dim=32,
        index_n_heads=16,
        max_position_embeddings=5120,
        num_nextn_predict_layers=0,
        torch_dtype="float32",
        rope_scaling=dict(YARN),
    )
    d.update(overrides)
    return ModelConfig.from_dict(d)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights and LayerNorm biases away from 1 / 0 and a nonzero routing bias, so that every parameter
    matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias") or name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return model


def pair(cfg: ModelConfig, seed: int = 0):
    """(transformers model, dsv4 model) with the same random weights (mapped by dsv4.convert.v32)."""
    from dsv4.convert.v32 import to_transformers_config

    torch.manual_seed(seed)
    ours = randomized(build_model(cfg).eval(), seed)
    hc = to_transformers_config(cfg)
    hc._attn_implementation = "eager"
    hf = transformers.DeepseekV32ForCausalLM(hc).eval()
    missing, unexpected = hf.load_state_dict(to_hub_state_dict(ours.state_dict(), cfg, fuse_experts=True), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf, ours


CASES = {
    "groups-dense-first": dict(cfg={}, T=40),
    "no-groups": dict(cfg=dict(n_group=1, topk_group=1, first_k_dense_replace=0), T=33),
    "short-rows": dict(cfg=dict(index_topk=64), T=24),  # every earlier token selected
    "no-yarn": dict(cfg=dict(rope_scaling=None), T=40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    case = CASES[name]
    hf, ours = pair(v32_config(**case["cfg"]))
    ids = torch.randint(0, 512, (2, case["T"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        for impl in ("sparse", "chunked", "reference"):
            ours.set_attention_impl(impl)
            got = ours(ids).logits
            err = (got - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-5, (impl, err)


def test_indexer_selections_equal_transformers():
    cfg = v32_config()
    hf, ours = pair(cfg)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.indexer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i, layer in enumerate(hf.model.layers)
    ]
    mine: dict[int, torch.Tensor] = {}
    ours.set_attention_impl("reference")  # the masked path returns the selection it attends

    def keep(i):
        def hook(m, args, out):
            mine[i] = out[0]

        return hook

    hooks += [blk.attn.indexer.register_forward_hook(keep(i)) for i, blk in enumerate(ours.layers)]
    with torch.no_grad():
        hf(ids)
        ours(ids)
    for h in hooks:
        h.remove()
    t = torch.arange(40)
    for i in range(cfg.num_hidden_layers):
        theirs, ours_idx = seen[i].long(), mine[i]
        for q in range(40):
            a = sorted(x for x in theirs[:, q].flatten().tolist() if x <= q)  # transformers pads with masked ids
            b0 = sorted(x for x in ours_idx[0, q].tolist() if x >= 0)
            a0 = sorted(x for x in theirs[0, q].tolist() if x <= q)
            assert a0 == b0, (i, q)
            b1 = sorted(x for x in ours_idx[1, q].tolist() if x >= 0)
            a1 = sorted(x for x in theirs[1, q].tolist() if x <= q)
            assert a1 == b1, (i, q)
            assert len(b0) == min(cfg.index_topk, int(t[q]) + 1) and a
    assert any(len(set(mine[0][0, q].tolist())) < q + 1 for q in range(10, 40))  # the selection bites


def test_cached_decode_equals_full_forward():
    from dsv4.infer.cache import ModelCache

    cfg = v32_config(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = randomized(build_model(cfg).eval())
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = ModelCache(model, batch=2, capacity=16)  # stores grow in pages past the capacity
        parts = [model(ids[:, :17], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(17, 30)]
        parts.append(model(ids[:, 30:], cache=cache).logits)
        assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
        cache = ModelCache(model, batch=2, capacity=64)  # rows at different lengths in one decode step
        model(ids[:1, :20], cache=cache, rows=[0])
        model(ids[1:, :12], cache=cache, rows=[1])
        step = model(torch.stack([ids[0, 20:21], ids[1, 12:13]]), cache=cache).logits
        assert (step[0, 0] - full[0, 20]).abs().max().item() < 1e-5
        assert (step[1, 0] - full[1, 12]).abs().max().item() < 1e-5


def test_expanded_twin_equals_absorbed_forward_and_backward():
    cfg = v32_config()
    torch.manual_seed(0)
    model = randomized(build_model(cfg))
    attn = model.layers[1].attn
    x = torch.randn(2, 40, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(40)
    cos, sin = model.ropes(pos)["main"]
    outs, grads = [], []
    for fn in (lambda: attn(x, cos, sin, pos), lambda: attn.forward_expanded(x, cos, sin, pos)):
        x.grad = None
        attn.zero_grad()
        y = fn()
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in (attn.wq_b.weight, attn.wkv_b.weight, attn.wo.weight)])
    assert (outs[0] - outs[1]).abs().max() < 1e-5 * outs[1].abs().max()
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()


def test_group_limited_routing_equals_transformers_router():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = v32_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = build_model(cfg).layers[1].ffn.gate
    router = DeepseekV3TopkRouter(
        transformers.DeepseekV3Config(
            **{
                "num_local_experts": 16,
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 4,
                "topk_group": 2,
                "hidden_size": cfg.hidden_size,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
            }
        )
    )
    with torch.no_grad():
        gate.bias.normal_(0, 0.05)
        router.weight.copy_(gate.weight)
        router.e_score_correction_bias.copy_(gate.bias)
    x = torch.randn(300, cfg.hidden_size)
    w, idx, _ = gate(x)
    _, hw, hidx = router(x)
    order, horder = idx.argsort(-1), hidx.argsort(-1)
    assert torch.equal(idx.gather(1, order), hidx.gather(1, horder))
    assert torch.allclose(w.gather(1, order), hw.gather(1, horder), atol=1e-6)
    groups = idx // 4
    assert all(len(set(r)) <= 2 for r in groups.tolist())  # at most topk_group groups per token


def test_names_round_trip_exactly():
    cfg = v32_config(num_nextn_predict_layers=1)
    model = randomized(build_model(cfg))
    sd = model.state_dict()
    hub = to_hub_state_dict(sd, cfg)
    assert "model.layers.3.eh_proj.weight" in hub and "model.layers.1.mlp.experts.7.down_proj.weight" in hub
    assert "model.layers.0.mlp.gate_proj.weight" in hub and "model.layers.0.mlp.gate.weight" not in hub
    back = from_hub_state_dict(hub, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    fused = to_hub_state_dict(sd, cfg, fuse_experts=True)  # transformers' layout: no MTP block
    back = from_hub_state_dict(fused, cfg)
    main = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    assert set(back) == set(main) and all(torch.equal(back[k], main[k]) for k in main)


def test_shipped_fp8_layout_loads_by_name(tmp_path):
    from dsv4.quant.formats import dequant_fp8_block, quant_fp8_block

    cfg = v32_config(num_nextn_predict_layers=1)
    model = randomized(build_model(cfg))
    out = save_hub(model, tmp_path / "v32")
    from dsv4.weights import load_state_dict

    shipped = load_state_dict(out)
    w = shipped["model.layers.1.self_attn.kv_b_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn and "model.layers.1.self_attn.kv_b_proj.weight_scale_inv" in shipped
    assert shipped["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert shipped["model.layers.3.embed_tokens.weight"].shape == (512, 64)  # the MTP layer's copy
    loaded = load_hub(out)
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        if (
            t.dim() == 2
            and name not in ("embed.weight", "head.weight")
            and "gate.weight" not in name
            and ("weights_proj" not in name)
        ):
            want = dequant_fp8_block(*quant_fp8_block(t, 128), 128)
        elif name.endswith("gate.bias"):
            want = t
        else:
            want = t.to(torch.bfloat16).float()
        assert torch.equal(got, want), name
    bad = tmp_path / "bad"
    save_hub(model, bad)
    cfg_bad = dataclasses.replace(cfg, num_hidden_layers=4, compress_ratios=[])
    cfg_bad.to_json(bad / "config.json")
    with pytest.raises(ValueError, match="missing"):
        load_hub(bad)


def test_transformers_folder_converts_both_ways(tmp_path):
    from dsv4.convert.transformers import convert_from_transformers_dir, convert_to_transformers_dir
    from dsv4.weights import save_model

    cfg = v32_config()
    hf, ours = pair(cfg)
    save_model(ours, tmp_path / "ours")
    convert_to_transformers_dir(tmp_path / "ours", tmp_path / "hf")
    loaded = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)
    back_cfg = convert_from_transformers_dir(tmp_path / "hf", tmp_path / "back")
    assert back_cfg.is_v32 and back_cfg.head_dim == cfg.head_dim and back_cfg.n_group == cfg.n_group
    back = load_hub(tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_config_names_and_validation():
    cfg = ModelConfig.preset("v3.2")
    d = cfg.to_dict()
    assert d["model_type"] == "deepseek_v32" and d["qk_nope_head_dim"] == 128 and "head_dim" not in d
    assert not {"compress_ratios", "hc_mult", "o_groups", "sliding_window"} & set(d)
    assert ModelConfig.from_dict(d) == cfg and cfg.head_dim == 192 and cfg.kv_dim == 576
    assert cfg.layer_kinds == ["dsa"] * 61
    v4 = ModelConfig.preset("tiny").to_dict()
    assert "model_type" not in v4 and "kv_lora_rank" not in v4  # V4 configs are written as before
    with pytest.raises(ConfigError, match="topk_group"):
        v32_config(topk_group=5)
    with pytest.raises(ConfigError, match="n_group"):
        v32_config(n_group=3)
    with pytest.raises(ConfigError, match="model_type"):
        v32_config(model_type="deepseek_v5")


def test_info_gives_the_published_totals():
    from dsv4.app.info import format_info

    text = format_info(ModelConfig.preset("v3.2"), "v3.2")
    assert "671.03B total / 36.63B active" in text  # published: 671B / 37B
    assert "indexer_params: 851524864" in text
    assert "656 B per token per layer" in text and "132 B per FP8 indexer key" in text


def test_no_future_leakage_and_gradients_reach_what_learns():
    cfg = v32_config(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = randomized(build_model(cfg))
    assert isinstance(model, V32Transformer)
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        a = model(ids).logits
        ids2 = ids.clone()
        ids2[0, 20] = (ids2[0, 20] + 1) % 512
        b = model(ids2).logits
    # the prefix equal up to rounding (the MoE groups tokens by expert, which reorders sums), the rest moved
    assert (a[:, :20] - b[:, :20]).abs().max() < 1e-6 and (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3
    out = model(ids, return_mtp=True, indexer_mode="dense")
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    loss = loss + torch.nn.functional.cross_entropy(out.mtp_logits[0][0, :-1], ids[0, 2:]) + out.indexer_loss
    loss = loss + out.aux_loss
    loss.backward()
    ix = model.layers[1].attn.indexer
    for p in (ix.wq_b.weight, ix.wk.weight, ix.k_norm.bias, ix.weights_proj.weight, model.mtp[0].eh_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name


@pytest.fixture(scope="module")
def mtp_model():
    cfg = v32_config(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    return randomized(build_model(cfg).eval())


def test_engine_batched_and_speculative_equal_the_reference(mtp_model):
    from dsv4.infer.engine import Engine
    from dsv4.infer.reference import generate
    from dsv4.infer.sampling import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 37, 12, 21)]
    ref = [generate(mtp_model, p, max_new_tokens=12, temperature=0, stop_at_eos=False) for p in prompts]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [r.output for r in Engine(mtp_model, max_batch=3, prefill_chunk=16).generate(prompts, greedy)] == ref
    eng = Engine(mtp_model, max_batch=2, prefill_chunk=16, speculative=True)
    assert [r.output for r in eng.generate(prompts, greedy)] == ref and eng.stats["drafted"] > 0


def test_mtp_cached_equals_full(mtp_model):
    from dsv4.infer.cache import ModelCache

    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = mtp_model(ids, return_mtp=True).mtp_logits[0]
        c = ModelCache(mtp_model)
        o1 = mtp_model(ids[:, :25], cache=c)
        l1 = mtp_model.mtp_forward(o1.hidden[:, :24], ids[:, 1:25], c)
        o2 = mtp_model(ids[:, 25:], cache=c)
        l2 = mtp_model.mtp_forward(torch.cat([o1.hidden[:, 24:], o2.hidden[:, :-1]], 1), ids[:, 25:], c)
    got = torch.cat([l1, l2], 1)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_compiled_decode_equals_full_forward(mtp_model):
    from dsv4.infer.cache import ModelCache
    from dsv4.infer.compiled import CompiledDecoder

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(5))
    lens = [27, 36]
    with torch.no_grad():
        full = mtp_model(ids).logits
        cache = ModelCache(mtp_model, batch=2, capacity=48, page=16)
        for r, n in enumerate(lens):
            mtp_model(ids[r : r + 1, :n], cache=cache, rows=[r])
        dec = CompiledDecoder(mtp_model)
        for s in range(6):
            tok = torch.stack([ids[r, n + s] for r, n in enumerate(lens)])[:, None]
            got = dec(tok, cache)
            for r, n in enumerate(lens):
                want = full[r, n + s]
                assert ((got[r] - want).abs().max() / want.abs().max()).item() < 1e-5
