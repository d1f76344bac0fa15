"""FP4 quantisation-aware training of the routed experts (dsv4.quant.qat)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import corpus_and_tokenizer, randomize_, small_config

from dsv4.convert.official import OfficialReader, save_official
from dsv4.model.moe import Experts
from dsv4.model.transformer import Transformer
from dsv4.quant.formats import dequant_mxfp4, fake_mxfp4, quant_mxfp4
from dsv4.quant.qat import enable_fp4_qat
from dsv4.train.config import TrainConfig
from dsv4.train.trainer import step_loss, train


def explicit(model):
    """A copy whose routed experts hold dequant(quant_mxfp4(w)) explicitly (packed and unpacked)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, Experts):
                for w in (m.w1, m.w2, m.w3):
                    w.copy_(torch.stack([dequant_mxfp4(*quant_mxfp4(x)) for x in w]))
    return out


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = Transformer(small_config())
    randomize_(model)
    ref = explicit(model)
    assert enable_fp4_qat(model) == model.cfg.num_hidden_layers + model.cfg.num_nextn_predict_layers
    return model.train(), ref.train()


def test_the_fake_quantised_forward_is_the_quantised_weights_forward(pair):
    model, ref = pair
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    la, _ = step_loss(model, ids[:, :-1], ids[:, 1:])
    lb, _ = step_loss(ref, ids[:, :-1], ids[:, 1:])
    assert torch.equal(la, lb)


def test_gradients_pass_straight_through_the_quantiser(pair):
    """d loss / d w (QAT, fp32 master weights) = d loss / d w' of the explicitly quantised model."""
    model, ref = pair
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    step_loss(model, ids[:, :-1], ids[:, 1:])[0].backward()
    step_loss(ref, ids[:, :-1], ids[:, 1:])[0].backward()
    ga, gb = dict(model.named_parameters()), dict(ref.named_parameters())
    experts = [n for n in ga if ".experts.w" in n]
    assert experts and all(ga[n].grad is not None and torch.equal(ga[n].grad, gb[n].grad) for n in experts)
    assert all(torch.equal(ga[n].grad, gb[n].grad) for n in ga if ga[n].grad is not None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    corpus, tok = corpus_and_tokenizer(root)
    torch.set_num_threads(1)
    out = {}
    for name, qat in (("plain", False), ("qat", True)):
        tc = TrainConfig(preset="micro", data=str(corpus), out=str(root / name), tokenizer=str(tok), steps=60,
                         progress=False, seq_len=128, batch_size=4, dtype="fp32", ns_dtype="fp32", compile="off",
                         eval_every=1000, final_eval_tokens=8192, fp4_qat=qat)  # fmt: skip
        out[name] = (root / name, train(tc))
    return out


def test_a_run_with_fp4_qat_learns_as_well_and_exports_what_it_trained(runs):
    """Validation loss within 2% of the run without QAT; the official export holds exactly the expert
    weights the training forward used."""
    (_, plain), (run, qat) = runs["plain"], runs["qat"]
    print(f"val loss: without QAT {plain['val_loss']:.4f}, with FP4 QAT {qat['val_loss']:.4f}")
    assert json.loads((run / "train_config.json").read_text())["fp4_qat"] is True
    assert abs(qat["val_loss"] - plain["val_loss"]) <= 0.02 * plain["val_loss"], (qat["val_loss"], plain["val_loss"])
    from dsv4.run import load_weights

    model = load_weights(run)  # the fp32 master weights
    official = save_official(model, run / "official")
    r = OfficialReader(official)
    w = model.layers[1].ffn.experts.w2.detach()
    for e in range(w.shape[0]):
        name = f"layers.1.ffn.experts.{e}.w2"
        shipped = dequant_mxfp4(r.get(name + ".weight"), r.get(name + ".scale"))
        assert torch.equal(shipped, fake_mxfp4(w[e]))
