"""benchmarks/fault_drill.py in small: a torchrun job whose rank 1 is killed mid-run stops within seconds
with a one-line error, and --resume continues it bit for bit as if nothing had happened."""

from __future__ import annotations

import pytest
from conftest import corpus_and_tokenizer, load_benchmark


@pytest.mark.slow  # about 40 s: two torchrun jobs and a resume (make test-slow)
def test_a_killed_rank_stops_the_job_and_resume_is_exact(tmp_path):
    corpus, tok = corpus_and_tokenizer(tmp_path)
    drill = load_benchmark("fault_drill")
    res = drill.drill(tmp_path / "runs", str(corpus), str(tok), steps=12, kill_after=7, ckpt_every=5, nproc=2)
    assert res["killed_after_step"] >= 7 and res["resumed_from_step"] in (5, 10)
    assert res["exit_status"] != 0 and res["stop_seconds"] < 30
    assert res["message"].startswith("dsv4: error: the torchrun job stopped: rank 1 was killed by SIGKILL")
    assert res["losses_equal"] and res["exact"]
