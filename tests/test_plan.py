"""`dsv4 plan`: per-rank bytes and FLOPs of a torchrun job, checked against the model and the reports."""

from __future__ import annotations

import pytest
import torch

from dsv4.cli import main
from dsv4.config import ModelConfig
from dsv4.flops import flops_per_token
from dsv4.model.transformer import Transformer
from dsv4.parallel.plan import Layout, activation_elements_per_token, decode_flops_per_token, optimizer_split, plan
from dsv4.train.trainer import step_loss


@pytest.fixture(scope="module")
def flash():
    return ModelConfig.preset("v4-flash")


def test_sharded_bytes_add_up_to_the_model(flash):
    p1, p8 = plan(flash, Layout(1, 8)), plan(flash, Layout(2, 8))
    assert p1["bytes"]["parameters"] * 8 == pytest.approx(4 * p1["params_with_mtp"])
    assert p8["bytes"]["optimizer"] * 2 == pytest.approx(p1["bytes"]["optimizer"])  # 1/world each
    muon, adamw = optimizer_split(flash)
    assert muon + adamw == p1["params_with_mtp"] and muon > 10 * adamw  # matrices dominate
    ep = plan(flash, Layout(2, 8, ep=16))
    assert ep["bytes"]["gathered_blocks"] < p8["bytes"]["gathered_blocks"] / 4  # experts are not gathered
    assert p1["bytes"]["activations_checkpointed"] < p1["bytes"]["activations"] / 5


def test_the_counts_match_the_published_figures(flash):
    """V4 report: V4-Flash 284B total / 13B active, V4-Pro 1.6T / 49B."""
    f, p = plan(flash, Layout(1, 8)), plan(ModelConfig.preset("v4-pro"), Layout(16, 8, ep=8))
    assert round(f["params_total"] / 1e9) == 284 and round(f["params_active"] / 1e9) == 13
    assert round(p["params_total"] / 1e11) == 16 and round(p["params_active"] / 1e9) == 49


def test_decode_flops_are_the_last_positions_share(flash):
    cfg = ModelConfig.preset("micro")
    assert decode_flops_per_token(cfg, 1) == pytest.approx(flops_per_token(cfg, 1, training=False, include_mtp=False))
    short, long = decode_flops_per_token(flash, 4096), decode_flops_per_token(flash, 1 << 20)
    assert short < long < 20 * short  # sparse attention: far less than the 256x more keys of dense


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_the_activation_estimate_matches_what_a_training_step_saves(preset):
    """Every floating tensor the autograd graph keeps (parameters aside), per token, within 15%."""
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    t = 512  # per-sequence parts (rope tables, window buffers) fade at training lengths
    ids = torch.randint(0, cfg.vocab_size, (1, t + 1))
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        step_loss(model, ids[:, :-1], ids[:, 1:])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params) / t
    assert measured == pytest.approx(activation_elements_per_token(cfg), rel=0.15)


def test_the_command_prints_the_plan_and_rejects_a_bad_layout(capsys):
    assert main(["plan", "--preset", "v4-flash", "--nodes", "2", "--gpus-per-node", "8", "--ep", "16"]) == 0
    out = capsys.readouterr().out
    assert "16 ranks, ep 16" in out and "optimiser state" in out and "KV cache" in out
    assert main(["plan", "--ep", "3"]) == 2
    assert capsys.readouterr().err.strip() == "dsv4: error: --ep 3 must divide the 8 ranks"
