"""Long-context evaluation (issue 17): the cached chunked scoring equals a plain uncached forward, the retrieval
prompts hold their answer exactly once at the stated depth, and `dsv4 eval retrieval` / `loss-vs-position`
run end to end on a toy run (JSON, PNG, table)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import every_kind_model, small_config

from dsv4.data import train_tokenizer
from dsv4.eval.cached import greedy_matches, position_losses
from dsv4.eval.retrieval import TASKS, make_sample


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [Path(json.__file__).read_text(), Path(json.decoder.__file__).read_text()]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json", show_progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    from dsv4.model.transformer import Transformer
    from dsv4.train.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(small_config(max_position_embeddings=4096))
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return run


def test_position_losses_equal_the_uncached_forward():
    model = every_kind_model()
    ids = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    got = position_losses(model, ids, chunk=16)  # 5 chunks through the cache
    assert got.shape == (69,) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_matches_equal_the_uncached_argmax():
    model = every_kind_model()
    ids = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = model(ids).logits[0].argmax(-1)
    ids[0, 41:44] = pred[40:43]  # a span the model gets right (teacher-forced greedy), and one it gets wrong
    ids[0, 51:53] = (pred[50:52] + 1) % 512
    with torch.no_grad():
        pred2 = model(ids).logits[0].argmax(-1)
    want = [bool(torch.equal(pred2[a - 1 : b - 1], ids[0, a:b])) for a, b in ((41, 44), (51, 53))]
    assert greedy_matches(model, ids, [(41, 44), (51, 53)], chunk=16) == want
    assert want[1] is False
    with pytest.raises(ValueError, match="spans"):
        greedy_matches(model, ids, [(0, 3)])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_retrieval_prompt_holds_the_answer_once_at_its_depth(tok, task, depth):
    from dsv4.eval.retrieval import FILLER

    s = make_sample(task, tok, 1500, depth, seed=3)
    assert 1300 < len(s.ids) <= 1500
    prompt = s.ids[: s.answers[0][0]]
    a, b = s.needle
    # the queried value stands in its needle and nowhere else before its answer
    assert s.value in tok.decode(prompt[a:b])
    assert s.value not in tok.decode(prompt[:a]) and s.value not in tok.decode(prompt[b:])
    # at the stated depth: after round(depth * P) of the P filler paragraphs (other needles may precede it)
    para, n_para = len(tok.encode(FILLER).ids), s.extra["paragraphs"]
    before = a - round(depth * n_para) * para
    assert 0 <= before <= len(s.ids) - n_para * para - (b - a)
    assert tok.decode(prompt[a - para : a]) == FILLER or a < para or before > 0
    for a0, b0 in s.answers:
        assert a0 < b0 <= len(s.ids)
        assert tok.decode(s.ids[a0:b0]).strip().rstrip(".,").isdigit()


def test_retrieval_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", tok, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        make_sample("niah", tok, 40, 0.5, 0)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        make_sample("needle", tok, 1000, 0.5, 0)


def test_eval_retrieval_and_loss_vs_position_commands(run, tmp_path, capsys):
    from dsv4.cli import main

    out = tmp_path / "r.json"
    main(
        ["eval", "retrieval", "--ckpt", str(run), "--lengths", "300", "600", "--depths", "0", "1", "--samples", "1"]
        + ["--chunk", "128", "--json", str(out), "--plot", str(tmp_path / "r.png"), "--quiet"]
    )
    res = json.loads(out.read_text())
    assert set(res["results"]) == set(TASKS) and (tmp_path / "r.png").stat().st_size > 0
    assert all(0 <= v <= 1 for per in res["results"].values() for row in per.values() for v in row.values())
    assert "passkey: accuracy" in capsys.readouterr().out
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.py", "b.py"):
        (data / name).write_text(Path(json.__file__).read_text())
    main(
        ["eval", "loss-vs-position", "--ckpt", str(run), "--data", str(data), "--seq-len", "256", "--windows", "2"]
        + ["--chunk", "64", "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"), "--quiet"]
    )
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["windows"] == 2 and len(p["mean_loss"]) == 255 and p["bins"][-1]["end"] == 255
    assert (tmp_path / "p.png").stat().st_size > 0 and "mean loss" in capsys.readouterr().out


def test_needle_selected_reads_the_indexers_choice():
    """needle_selected's verdict per layer equals the one read from the uncached forward's own selections."""
    from dsv4.eval.needle import entry_tokens, needle_selected

    model = every_kind_model()
    ids = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(4))
    needle, query = (12, 16), 89
    got = needle_selected(model, ids[0].tolist(), needle, query, chunk=32)
    with torch.no_grad():
        recs = model(ids, return_stats=True).stats["indexer"]
    assert sorted(got) == sorted(r["layer"] for r in recs) and len(got) >= 2
    for r in recs:
        attn = model.layers[r["layer"]].attn
        sel = r["idx"][0, query]
        first, end = entry_tokens(attn.kind, attn.ratio, sel[sel >= 0])
        want = bool(((first < needle[1]) & (end > needle[0])).any())
        assert (got[r["layer"]] == "selected") == want, r["layer"]


def test_eval_needle_recall_command(run, tmp_path, capsys):
    from dsv4.cli import main

    out = tmp_path / "n.json"
    main(
        ["eval", "needle-recall", "--ckpt", str(run), "--lengths", "400", "--depths", "0", "0.5", "--samples", "1"]
        + ["--chunk", "128", "--json", str(out), "--plot", str(tmp_path / "n.png"), "--quiet"]
    )
    res = json.loads(out.read_text())
    assert set(res["kinds"].values()) <= {"csa", "dsa"} and res["recall"]
    assert all(0 <= v <= 1 for per in res["recall"].values() for row in per.values() for v in row.values())
    assert set(res["chance"]) == set(res["recall"])
    assert all(0 <= v <= 1 for per in res["chance"].values() for row in per.values() for v in row.values())
    out = capsys.readouterr().out
    assert (tmp_path / "n.png").stat().st_size > 0 and "needle selected" in out and "random top-k" in out


def test_selection_chance_is_the_random_top_k_baseline():
    from math import comb

    from dsv4.eval.needle import selection_chance

    # CSA, m = 4: query 15 sees entries 0..3; entries 1 ([0, 8)) and 2 ([4, 12)) hold token 5
    assert selection_chance("csa", 4, 0, 2, 15, (5, 6)) == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    # DSA, window 4: query 11 ranks the tokens 0..7; the needle [2, 4) is two of them
    assert selection_chance("dsa", 1, 4, 3, 11, (2, 4)) == pytest.approx(1 - comb(6, 3) / comb(8, 3))
    assert selection_chance("dsa", 1, 4, 3, 11, (9, 11)) == 0.0  # inside the window: never a candidate
    assert selection_chance("csa", 4, 0, 8, 15, (5, 6)) == 1.0  # top-k covers every entry
