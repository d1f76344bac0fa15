import importlib.util
import shutil
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from dsv4 import ModelConfig

warnings.filterwarnings("ignore", message="config: keeping unknown fields")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def small_config(**overrides) -> ModelConfig:
    """The micro preset (every main layer kind: swa, csa, hca m'=16, csa; both router kinds), overridden."""
    return ModelConfig.preset("micro").replace(**overrides)


def copy_corpus(dst: Path, n: int = 30) -> Path:
    """n small (1.5-5 KB) stdlib .py files, flattened into dst; sorted, so the same on every run."""
    std = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        p for p in std.rglob("*.py") if not skip & set(p.relative_to(std).parts) and 1500 < p.stat().st_size < 5000
    )
    assert len(files) >= n, f"only {len(files)} small stdlib files under {std}"
    dst.mkdir(parents=True, exist_ok=True)
    for p in files[:n]:
        shutil.copy(p, dst / "_".join(p.relative_to(std).parts))
    return dst


def corpus_and_tokenizer(root: Path, n: int = 30) -> tuple[Path, Path]:
    """copy_corpus(root / "corpus", n) and a 512-token BPE trained on its training split (root / tokenizer.json)."""
    from dsv4.data import find_files, iter_documents, split_files, train_tokenizer

    corpus = copy_corpus(root / "corpus", n)
    tok = root / "tokenizer.json"
    train_files, _ = split_files(find_files(corpus), 0.05)
    train_tokenizer((d.text for d in iter_documents(train_files)), 512, tok, show_progress=False)
    return corpus, tok


@pytest.fixture
def small_cfg():
    return small_config()


def every_kind_model(**overrides):
    """A small random eval model with every layer kind: swa, csa (m=4), hca (m=8), dsa (m=1), csa + an
    SWA MTP block; window 8, top-6 (so selections and windows bite at short lengths)."""
    from dsv4.model.transformer import Transformer

    cfg = small_config(
        num_hidden_layers=5, compress_ratios=[0, 4, 8, 1, 4, 0], sliding_window=8, index_topk=6, **overrides
    )
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    randomize_(m)
    return m


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


randomize_ = load_benchmark("_common").randomize_  # one copy, shared with benchmarks/gpu_smoke.py
