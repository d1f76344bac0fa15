"""The lm-evaluation-harness adapter (issue 17): its scores equal a plain forward of the model, and lm_eval runs
end to end offline on local tasks of all three request kinds (multiple choice, rolling perplexity, generation)."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install -e '.[eval]' (in the test extra)")

from conftest import randomize_, small_config

from dsv4.data import train_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dsv4.model.transformer import Transformer
    from dsv4.train.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    texts = [json.__doc__ * 20, "The capital of France is Paris. The sky is blue. 1 2 3 4 5 6 7 8 9 10 " * 40]
    train_tokenizer(texts, 512, run / "tokenizer.json", show_progress=False)
    torch.manual_seed(0)
    model = Transformer(small_config(max_position_embeddings=4096)).eval()
    randomize_(model)
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return run


class Req:  # the one field of lm_eval's Instance the adapter reads
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_equals_a_plain_forward(run):
    from dsv4.eval.harness import DSV4LM

    lm = DSV4LM(str(run), batch_size=3, max_length=24)
    reqs = [("The sky is", " blue."), ("1 2 3", " 4 5"), ("The capital of France is", " Paris. The sky"), ("x", "y")]
    reqs.append(("long " * 40, " tail"))  # longer than max_length: the last 24 tokens are scored as context
    got = lm.loglikelihood([Req(*r) for r in reqs], disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        c, x = lm._encode_pair(ctx, cont)
        whole = (c + x)[-25:]
        ids = torch.tensor([whole[:-1]])
        with torch.no_grad():
            logp = lm.model(ids).logits.float().log_softmax(-1)[0, -len(x) :]
        want = logp.gather(-1, torch.tensor(x)[:, None]).sum().item()
        assert lp == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(x)).all())
    # rolling: disjoint windows of max_length, summed = the whole document's log-likelihood when it fits one
    text = "The sky is blue. The capital of France is Paris."
    (roll,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    assert len(ids) <= 25
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids[:-1]])).logits.float().log_softmax(-1)[0]
    assert roll == pytest.approx(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), rel=1e-5)


def test_generate_until_equals_the_engine_and_stops(run):
    from dsv4.eval.harness import DSV4LM
    from dsv4.infer.reference import generate

    lm = DSV4LM(str(run), batch_size=2)
    prompts = ["The sky is", "1 2 3", "The capital of"]
    outs = lm.generate_until([Req(p, {"until": ["\n"], "max_gen_toks": 6}) for p in prompts], disable_tqdm=True)
    for p, out in zip(prompts, outs):
        ids = lm.tok_encode(p)
        want = generate(lm.model, ids, 6, temperature=0.0)  # greedy, stops before EOS
        assert out == lm.tok_decode(want).split("\n")[0]


def test_lm_eval_runs_end_to_end_offline(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dsv4.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    mc = [{"q": "The sky is", "choices": ["blue.", "green.", "Paris."], "label": i % 3} for i in range(4)]
    (docs / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    text = [{"text": "The capital of France is Paris. The sky is blue. 1 2 3 4 5"} for _ in range(2)]
    (docs / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in text))
    gen = [{"prompt": "1 2 3", "answer": " 4"}, {"prompt": "The sky is", "answer": " blue."}]
    (docs / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    tasks = tmp_path / "tasks"
    tasks.mkdir()

    def task(name: str, data: str, body: str) -> None:
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs / data}\n"
        (tasks / f"{name}.yaml").write_text(head + "test_split: test\n" + body)

    task(
        "toy_mc",
        "mc.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n",
    )
    task(
        "toy_ppl",
        "ppl.jsonl",
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    )
    task(
        "toy_gen",
        "gen.jsonl",
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    out = tmp_path / "res.json"
    argv = ["eval", "lm-eval", "--ckpt", str(run), "--tasks", "toy_mc", "toy_ppl", "toy_gen"]
    assert main([*argv, "--include-path", str(tasks), "--batch-size", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"toy_mc", "toy_ppl", "toy_gen"}
    assert 0.0 <= res["toy_mc"]["acc,none"] <= 1.0
    bpb = res["toy_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0
    assert res["toy_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert "toy_mc: acc" in capsys.readouterr().out
    # the multiple-choice accuracy is the model's own: recompute it from the adapter's scores
    from dsv4.eval.harness import DSV4LM

    lm = DSV4LM(str(run))
    right = 0
    for d in mc:
        reqs = [Req(d["q"], " " + c) for c in d["choices"]]  # the harness's target delimiter is one space
        scores = [s for s, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        right += max(range(3), key=lambda i: scores[i]) == d["label"]
    assert res["toy_mc"]["acc,none"] == pytest.approx(right / len(mc))
