"""`dsv4 ablate` (issue 17): the controls it compares (hc_mode, optimizer=adamw), the study machinery (equal
active parameters, verdicts, spikes, the mixed retrieval corpus) and a toy-size run of every study."""

import json
import math

import pytest
import torch
from conftest import copy_corpus, small_config

from dsv4.ablate.runner import Arm, Run, match_active, summarise
from dsv4.ablate.studies import mixed_corpus, sparse_arms, spikes
from dsv4.config import ConfigError
from dsv4.model.mhc import composite_gain, hc_head, hc_post, hc_pre
from dsv4.model.transformer import Transformer


def _maps(mode: str, hc: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, hc, 16, generator=g)
    fn = torch.randn((2 + hc) * hc, hc * 16, generator=g)
    scale = torch.tensor([1.0, 1.0, 1.0])
    base = torch.randn((2 + hc) * hc, generator=g)
    return x, hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6, mode)


def test_residual_mode_is_a_plain_residual():
    x, (u, post, res) = _maps("residual", hc=1)
    assert torch.equal(u, x[..., 0, :])
    out = torch.randn_like(u)
    assert torch.allclose(hc_post(out, x, post, res)[..., 0, :], x[..., 0, :] + out)
    assert torch.equal(hc_head(x, None, None, None, 1e-6, 1e-6, "residual"), x[..., 0, :])
    with pytest.raises(ConfigError, match="hc_mult=1"):
        small_config(hc_mode="residual")


def test_hc_mode_is_unconstrained_and_mhc_is_doubly_stochastic():
    _, (_, _, res_mhc) = _maps("mhc")
    _, (_, post, res_hc) = _maps("hc")
    assert torch.allclose(res_mhc.sum(-2), torch.ones(1), atol=1e-4)  # Sinkhorn ends on a column pass
    assert torch.allclose(res_mhc.sum(-1), torch.ones(1), atol=0.05)  # rows: within 20 iterations' reach
    assert (res_hc.sum(-2) - 1).abs().max() > 0.1 and (res_hc < 0).any()  # no projection, signs free
    assert composite_gain([res_hc.flatten(0, 1)] * 8)[0] > composite_gain([res_mhc.flatten(0, 1)] * 8)[0]
    # at init hc's maps are the plain residual's: pre = 1/hc, post = 1, res = I (up to the 0.01 tanh gates)
    m = Transformer(small_config(hc_mode="hc"))
    blk = m.layers[0]
    x = torch.randn(1, 3, 4, m.cfg.hidden_size)
    u, post, res = blk._hc("attn", x)
    assert torch.allclose(post, torch.ones(1), atol=0.011) and torch.allclose(res, torch.eye(4), atol=0.011)
    assert torch.allclose(u, x.mean(-2), atol=0.05)


@pytest.mark.parametrize("mode,hc", [("hc", 4), ("residual", 1)])
def test_controls_train_causally_and_feature_off_is_baseline(mode, hc):
    cfg = small_config(hc_mode=mode, hc_mult=hc)
    assert cfg.to_dict()["hc_mode"] == mode and "hc_mode" not in small_config().to_dict()
    torch.manual_seed(0)
    m = Transformer(cfg)
    ids = torch.randint(0, 512, (2, 24))
    out = m(ids).logits
    ids2 = ids.clone()
    ids2[:, 12:] = (ids2[:, 12:] + 1) % 512
    assert torch.allclose(m(ids2).logits[:, :12], out[:, :12], atol=1e-5)  # no future leakage
    out.float().logsumexp(-1).mean().backward()
    used = [n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(".hc_attn_fn" in n for n in used) == (mode == "hc")  # the residual arm has no maps to learn
    assert any("wq_a" in n for n in used) and any("experts" in n or "w1" in n for n in used)


def test_adamw_matrices_take_every_parameter():
    from dsv4.optim.groups import assign_param_groups, build_optimizer

    m = Transformer(small_config())
    plan = assign_param_groups(m, matrices="adamw")
    assert {a.algorithm for a in plan.values()} == {"adamw"}
    muon = assign_param_groups(m)
    assert all(plan[n].weight_decay == a.weight_decay for n, a in muon.items())  # the same decay rules
    opt = build_optimizer(m, 1e-3, matrices="adamw")
    assert all(g["algorithm"] == "adamw" for g in opt.param_groups)
    with pytest.raises(ValueError, match="matrices"):
        assign_param_groups(m, matrices="sgd")


def test_match_active_and_the_sparse_arms():
    arms = sparse_arms("micro", 64)
    target = arms[0].active_params()
    assert [a.name for a in arms] == ["v4-mix", "dsa", "dense", "window"]
    for a in arms:
        assert abs(a.active_params() / target - 1) < 0.01, a
    assert "sliding_window=1024" in arms[2].overrides
    narrow = match_active(Arm("w", "micro", ["compress_ratios=[0, 0, 0, 0, 0]"]), target - 20000)
    assert narrow.active_params() < target - 15000


def _run(arm, seed, **metrics):
    return Run(arm, seed, None, {"step": 1}, 0.0, metrics)


def test_summary_verdicts_use_twice_the_standard_error():
    runs = [_run("ref", s, loss=v) for s, v in enumerate([1.0, 1.1, 0.9])]
    runs += [_run("good", s, loss=v) for s, v in enumerate([0.5, 0.6, 0.4])]
    runs += [_run("same", s, loss=v) for s, v in enumerate([1.05, 0.85, 1.2])]
    runs += [_run("bad", s, loss=v) for s, v in enumerate([2.0, 2.1, 1.9])]
    runs += [_run("nan", s, loss=math.inf) for s in range(3)]
    t = summarise(runs, "ref", {"loss": True})["loss"]
    assert t["ref"]["mean"] == pytest.approx(1.0) and t["ref"]["std"] == pytest.approx(0.1)
    assert (
        t["good"]["verdict"] == "better" and t["bad"]["verdict"] == "worse" and t["same"]["verdict"] == "no difference"
    )
    assert t["good"]["two_se"] == pytest.approx(2 * math.sqrt(0.01 / 3 + 0.01 / 3))
    assert "nan" not in t  # diverged runs are counted by their own metric, not averaged as inf
    assert summarise(runs, "ref", {"loss": False})["loss"]["good"]["verdict"] == "worse"
    # paired by seed: "good" is 0.5 lower in every pair; "same" moves both ways
    assert t["good"]["paired_mean"] == pytest.approx(-0.5) and t["good"]["paired_verdict"] == "better"
    assert t["same"]["paired_verdict"] == "no difference"
    assert summarise(runs[:1] + runs[3:4], "ref", {"loss": True})["loss"]["good"]["verdict"] == "one seed"


def test_spikes_count_jumps_over_the_recent_median():
    smooth = [5 - 0.01 * t for t in range(100)]
    assert spikes(smooth) == 0
    bumpy = list(smooth)
    bumpy[50], bumpy[80] = 9.0, 6.0
    assert spikes(bumpy) == 2


def test_mixed_corpus_holds_code_and_the_share_of_retrieval_documents(tmp_path):
    from dsv4.eval.retrieval import FILLER, document

    code = copy_corpus(tmp_path / "code", 20)
    data, held = mixed_corpus(tmp_path / "out", 10**6, 0.3, 128, code=str(code))
    code_chars = sum(len(p.read_text()) for p in (data / "code").rglob("*.py"))
    docs = [
        json.loads(line)["text"] for p in (data / "retrieval").glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    synth = sum(map(len, docs))
    assert 0.3 <= synth / (synth + code_chars) < 0.35
    assert len(list(held.rglob("*.py"))) == 2 and not set(held.rglob("*.py")) & set((data / "code").rglob("*.py"))
    d = document("passkey", 5, seed=7)
    assert d.count(FILLER.strip()) == 5
    v = d.split("The pass key is ")[1].split(".")[0]
    assert d.count(v) == 3  # twice in the needle, once as the answer, nowhere else
    assert d.endswith(f"The pass key is {v}.")


@pytest.mark.parametrize("study", ["sparse", "mhc", "mtp", "muon", "engram"])
def test_every_study_runs_at_toy_size(study, tmp_path, capsys):
    from dsv4.cli import main

    code = copy_corpus(tmp_path / "code", 30 if study == "sparse" else 12)
    seq = "192" if study == "sparse" else "32"
    seeds = ["0"] if study in ("sparse", "mtp") else ["0", "1"]  # their evaluations are the slow part
    argv = ["ablate", study, "--steps", "2", "--seeds", *seeds, "--batch-size", "2", "--seq-len", seq]
    argv += ["--eval-tokens", "256", "--data", str(code), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / f"{study}.png").stat().st_size > 10_000
    arms = res["arms"]
    assert len(res["runs"]) == len(seeds) * len(arms) and all(r["steps"] == 2 for r in res["runs"])
    act = [a["active_params"] for a in arms.values()]
    assert max(act) / min(act) < 1.01  # equal active parameters
    summary = next(iter(res["summary"].values()))
    assert all(row["n"] == len(seeds) for row in summary["val_bpb"].values())
    out = capsys.readouterr().out
    assert "val_bpb (mean +- std" in out and "results:" in out
    if study == "sparse":
        assert {"retrieval_16x", "needle_recall_16x", "needle_chance_16x", "loss_16x"} <= set(res["runs"][0])
    if study == "mtp":
        assert res["extra"]["mtp-seed0"]["acceptance_curve"][-1]["step"] == 2
        assert 0 <= res["runs"][0]["text_acceptance"] <= 1 and "text_acceptance" not in res["runs"][1]
