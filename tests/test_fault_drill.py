"""benchmarks/fault_drill.py in small: a torchrun job whose rank 1 is killed mid-run stops within seconds
with a one-line error, and --resume continues it bit for bit as if nothing had happened."""

from __future__ import annotations

from conftest import copy_corpus, load_benchmark

from dsv4.data import find_files, iter_documents, split_files, train_tokenizer


def test_a_killed_rank_stops_the_job_and_resume_is_exact(tmp_path):
    corpus = copy_corpus(tmp_path / "corpus")
    tok = tmp_path / "tokenizer.json"
    train_files, _ = split_files(find_files(corpus), 0.05)
    train_tokenizer((d.text for d in iter_documents(train_files)), 512, tok, show_progress=False)
    drill = load_benchmark("fault_drill")
    res = drill.drill(tmp_path / "runs", str(corpus), str(tok), steps=12, kill_after=7, ckpt_every=5, nproc=2)
    assert res["killed_after_step"] >= 7 and res["resumed_from_step"] in (5, 10)
    assert res["exit_status"] != 0 and res["stop_seconds"] < 30
    assert res["message"].startswith("dsv4: error: the torchrun job stopped: rank 1 was killed by SIGKILL")
    assert res["losses_equal"] and res["exact"]
