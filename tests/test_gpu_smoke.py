"""benchmarks/gpu_smoke.py on a machine without a CUDA device: says so and exits 0 (CUDA hidden here); its
training check runs on the CPU through the same trainer code path (batches and autocast follow the device)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_without_cuda_says_so_and_exits_0():
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "no CUDA device"


def test_gpu_smoke_training_check_runs_on_the_cpu():
    import torch
    from conftest import load_benchmark

    smoke = load_benchmark("gpu_smoke")
    checks = smoke.Checks()
    threads = torch.get_num_threads()
    try:
        tok_s = smoke.check_training(torch.device("cpu"), 3, checks)
    finally:
        torch.set_num_threads(threads)
    assert not checks.failed
    assert tok_s and tok_s > 0
