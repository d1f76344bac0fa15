"""The five controlled studies of `dsv4 ablate NAME` (docs/reproductions.md). Each has equal active parameters
and equal training tokens per arm (dsv4.ablate.runner), at least three seeds by default, and a default budget
that fits in an hour on a 2-core CPU.

- sparse: the V4 layer mix (SWA / CSA / HCA) vs DSA vs dense attention vs window-only, trained on code mixed
  with synthetic retrieval documents; retrieval accuracy and loss-vs-position at 1x, 4x and 16x the training
  length, and the indexer's needle recall beyond the window.
- mhc: 4-stream mHC vs unconstrained hyper-connections (hc_mode=hc) vs a plain residual, at the default
  learning rate and at a high one: final loss, the largest composite gain of the residual maps, loss spikes.
- mtp: with and without the MTP block: main-model bits per byte, and the MTP draft's acceptance rate and
  speculative speed-up at checkpoints through training.
- muon: Muon (V4's optimiser) vs AdamW on every parameter, same learning rate and schedule.
- engram: tiny vs tiny-engram with the expert width cut to pay for Engram's dense parameters.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.ablate.runner import Arm, Run, Settings, match_active, records, summarise, train_runs, write_results
from dsv4.train.config import TrainConfig

HELD_OUT_PACKAGE = "email"  # the sparse study's long held-out documents: this stdlib package, joined in order


@dataclass
class Study:
    name: str
    question: str
    budget_minutes: float  # the documented default
    preset: str
    lower_is_better: dict[str, bool]  # the metrics summarised, in table order
    run: Callable[[Settings], dict]
    train_share: float = 0.75  # of the budget for training; the rest is the study's own evaluations


def base_config(s: Settings, **fields) -> TrainConfig:
    """The training fields every run of a study shares: the study's learning rate (2e-3 unless --lr), no
    periodic evaluation or checkpoint, one checkpoint kept, eager fp32; `fields` change any of them."""
    kw = dict(lr=s.lr or 2e-3, eval_every=10**6, ckpt_every=10**6, keep_last=1, compile="off", dtype="fp32")
    return TrainConfig(**{**kw, **fields})


# ---------------------------------------------------------------------------------------------------- sparse
def sparse_arms(preset: str, seq_len: int) -> list[Arm]:
    """V4 mix (the preset), DSA (top-k of raw tokens = 4x the CSA top-k, the same tokens attended), dense (a
    window covering 16x the training length) and window-only, at the V4 arm's active parameters."""
    v4 = Arm("v4-mix", preset)
    from dsv4.config import ModelConfig

    cfg = ModelConfig.preset(preset)
    n = cfg.num_hidden_layers
    mtp = [0] * cfg.num_nextn_predict_layers
    target = v4.active_params()
    others = [
        Arm("dsa", preset, [f"compress_ratios={[0] + [1] * (n - 1) + mtp}", f"index_topk={4 * cfg.index_topk}"]),
        Arm("dense", preset, [f"compress_ratios={[0] * (n + len(mtp))}", f"sliding_window={16 * seq_len}"]),
        Arm("window", preset, [f"compress_ratios={[0] * (n + len(mtp))}"]),
    ]
    return [v4] + [match_active(a, target) for a in others]


def mixed_corpus(
    out: Path, code_bytes: int, share: float, seq_len: int, code: str | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """(training folder, held-out folder) under out: code (the standard library, or the folder `code`; files in
    sorted order up to code_bytes) plus synthetic retrieval documents (dsv4.eval.retrieval.document, the four
    tasks in turn) making up `share` of the characters, in 16 .jsonl shards. The held-out folder, for
    loss-vs-position, holds the HELD_OUT_PACKAGE package of the standard library (another folder: every
    tenth file), which training never sees."""
    from dsv4.data.corpus import default_corpus, find_files
    from dsv4.eval.retrieval import TASKS, document

    data, held = out / "data", out / "heldout"
    for d in (data, held):
        if d.exists():
            shutil.rmtree(d)
    root = Path(code) if code else default_corpus()
    files = find_files(root) if root.is_dir() else []
    if not files:
        raise ValueError(f"--data {code}: the sparse study needs a folder of code files")
    total = 0
    for k, f in enumerate(files):
        rel = f.relative_to(root)
        out_of_training = rel.parts[0] == HELD_OUT_PACKAGE if code is None else k % 10 == 9
        dest = (held if out_of_training else data / "code") / rel
        if dest.is_relative_to(data):
            if total >= code_bytes:
                continue
            total += f.stat().st_size
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    rng = random.Random(seed)
    synth_chars, i, shards = 0, 0, [[] for _ in range(16)]
    max_para = max(2, seq_len // 40)  # ~ a window's worth: a filler paragraph is ~20-40 tokens
    while synth_chars < total * share / (1 - share):
        text = document(TASKS[i % len(TASKS)], rng.randint(1, max_para), i)
        shards[i % 16].append(json.dumps({"text": text}))
        synth_chars += len(text)
        i += 1
    (data / "retrieval").mkdir(parents=True)
    for k, lines in enumerate(shards):
        (data / "retrieval" / f"shard{k:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return data, held


def sparse_eval(s: Settings, held: Path) -> Callable[[Arm, Run], dict]:
    from dsv4.eval.needle import run_needle_recall
    from dsv4.eval.position import loss_vs_position
    from dsv4.eval.retrieval import run_retrieval

    L = s.seq_len
    depths = (0.1, 0.5, 0.9)

    def evaluate(arm: Arm, run: Run) -> dict:
        m: dict = {}
        res = run_retrieval(run.path, ("passkey", "niah"), (L, 4 * L, 16 * L), depths, 2, progress=False)
        for k in (1, 4, 16):
            m[f"retrieval_{k}x"] = statistics.fmean(
                res["results"][t][str(k * L)][f"{d:g}"] for t in res["results"] for d in depths
            )
        if arm.configs(TrainConfig())[1].has_indexer:
            nr = run_needle_recall(run.path, ("passkey",), (4 * L, 16 * L), depths, 2, progress=False)
            for k in (4, 16):
                for key in ("recall", "chance"):  # {layer: {length: {depth: fraction}}}; chance: a random top-k's
                    per_layer = nr[key].values()
                    m[f"needle_{key}_{k}x"] = statistics.fmean(v for per in per_layer for v in per[str(k * L)].values())
        lp = loss_vs_position(run.path, held, seq_len=16 * L, windows=2, progress=False)
        loss = lp["mean_loss"]
        for a, b, name in ((0, L, "1x"), (L, 4 * L, "4x"), (4 * L, 16 * L, "16x")):
            m[f"loss_{name}"] = statistics.fmean(loss[a : b - 1])
        run.extra.update(loss_vs_position=lp["bins"], retrieval=res["results"])
        return m

    return evaluate


def run_sparse(s: Settings) -> dict:
    data, held = mixed_corpus(s.out, code_bytes=2_000_000, share=0.3, seq_len=s.seq_len, code=s.data)
    s.data = str(data)
    arms = sparse_arms(STUDIES["sparse"].preset, s.seq_len)
    runs = train_runs(arms, s, base_config(s), sparse_eval(s, held))
    return finish(s, "sparse", arms, runs)


# ------------------------------------------------------------------------------------------------------ mhc
def spikes(losses: list[float], window: int = 20, factor: float = 1.15) -> int:
    """Steps whose loss exceeds `factor` x the median of the `window` steps before it (after the first window)."""
    return sum(
        loss > factor * statistics.median(losses[t - window : t]) for t, loss in enumerate(losses) if t >= window
    )


def mhc_eval(arm: Arm, run: Run) -> dict:
    lm = [loss for _, loss in lm_curve(run)]
    gains = [r["mhc_gain_fwd"] for r in records(run.path, "val") if "mhc_gain_fwd" in r]
    return dict(
        max_gain=max(gains) if gains else float("nan"), spikes=spikes(lm), final_train_loss=statistics.fmean(lm[-10:])
    )


def run_mhc(s: Settings) -> dict:
    preset = STUDIES["mhc"].preset
    lrs = [s.lr or 2e-3, 10 * (s.lr or 2e-3)]
    arms = []
    for lr in lrs:
        tag = f"lr{lr:g}"
        arms += [
            Arm(f"mhc-{tag}", preset, [f"lr={lr}"]),
            Arm(f"hc-{tag}", preset, [f"lr={lr}", "hc_mode=hc"]),
            Arm(f"residual-{tag}", preset, [f"lr={lr}", "hc_mode=residual", "hc_mult=1"]),
        ]
    target = arms[0].active_params()
    arms = [a if a.name.startswith("mhc") else match_active(a, target) for a in arms]
    runs = train_runs(arms, s, base_config(s, log_every=1), mhc_eval, quarter=("eval_every",))
    return finish(s, "mhc", arms, runs, refs={f"-lr{lr:g}": f"mhc-lr{lr:g}" for lr in lrs})


# ------------------------------------------------------------------------------------------------------ mtp
PROMPTS = (  # the MTP study's generation prompts (greedy, 64 tokens each)
    "def main():\n    import os\n    for name in os.listdir('.'):\n",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    "import re\n\ndef split_words(text):\n    ",
)


@torch.no_grad()
def draft_agreement(model, ids: torch.Tensor) -> float:
    """Teacher-forced acceptance on text ids [B, T]: the fraction of positions i where the MTP draft of token
    i + 2 (the MTP head at i, given the true token i + 1) is the main model's greedy choice for it (the head at
    i + 1). Greedy speculative decoding accepts a draft exactly then; on real text, not the model's own."""
    out = model(ids, return_mtp=True)
    draft = out.mtp_logits[0].argmax(-1)  # [B, T - 1]: position i predicts token i + 2
    main = out.logits[:, 1:].argmax(-1)  # position i + 1 predicts token i + 2
    return float((draft == main).float().mean())


def held_out_windows(data: str | None, tok, seq_len: int, n: int = 4) -> torch.Tensor:
    """n windows of seq_len tokens from the validation files of `data` (the training run's own split)."""
    from dsv4.data.corpus import find_files, iter_documents, split_files

    _, val = split_files(find_files(data), 0.05)
    ids = tok.encode("\n\n".join(d.text for d in iter_documents(val))).ids[: n * seq_len]
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


def mtp_eval(s: Settings) -> Callable[[Arm, Run], dict]:
    def evaluate(arm: Arm, run: Run) -> dict:
        from dsv4.infer.speculative import compare_speculative
        from dsv4.run import list_checkpoints, load_run

        if arm.name != "mtp":
            return {}
        curve, text = [], None
        for ck in list_checkpoints(run.path):
            model, tok = load_run(ck)
            if text is None:  # one tokenizer for every checkpoint of the run
                text = held_out_windows(s.data, tok, s.seq_len)
            rs = [compare_speculative(model, tok.encode(p).ids, max_tokens=64) for p in PROMPTS]
            curve.append(
                dict(
                    step=int(ck.name.split("-")[-1]),
                    acceptance=statistics.fmean(r["acceptance"] for r in rs),
                    speedup=statistics.fmean(r["speedup"] for r in rs),
                    text_acceptance=draft_agreement(model, text),
                )
            )
        run.extra["acceptance_curve"] = run.extra["text_acceptance"] = curve  # two panels of one curve
        last = curve[-1]
        return dict(text_acceptance=last["text_acceptance"], acceptance=last["acceptance"], speedup=last["speedup"])

    return evaluate


def run_mtp(s: Settings) -> dict:
    preset = STUDIES["mtp"].preset
    from dsv4.config import ModelConfig

    cfg = ModelConfig.preset(preset)
    main = cfg.compress_ratios[: cfg.num_hidden_layers]  # the MTP layer's entry goes with it
    arms = [Arm("mtp", preset), Arm("no-mtp", preset, ["num_nextn_predict_layers=0", f"compress_ratios={main}"])]
    runs = train_runs(arms, s, base_config(s, keep_last=8), mtp_eval(s), quarter=("ckpt_every",))
    return finish(s, "mtp", arms, runs)


# ------------------------------------------------------------------------------------------------------ muon
def run_muon(s: Settings) -> dict:
    preset = STUDIES["muon"].preset
    arms = [Arm("muon", preset), Arm("adamw", preset, ["optimizer=adamw"])]
    runs = train_runs(arms, s, base_config(s, log_every=1), lambda arm, run: {"final_train_loss": _last_loss(run)})
    return finish(s, "muon", arms, runs)


def lm_curve(run: Run) -> list[tuple[int, float]]:
    """(step, language-model loss) of every logged step after the indexer warm-up; kept in run.extra."""
    rs = [r for r in records(run.path, "train") if r.get("stage") != "indexer_warmup"]
    run.extra["lm_loss"] = [(r["step"], r.get("lm_loss", r["loss"])) for r in rs]
    return run.extra["lm_loss"]


def _last_loss(run: Run) -> float:
    return statistics.fmean(loss for _, loss in lm_curve(run)[-10:])


# ---------------------------------------------------------------------------------------------------- engram
def run_engram(s: Settings) -> dict:
    arms = [Arm("engram", "tiny-engram"), Arm("baseline", "tiny")]  # slowest first: it plans the step count
    arms[0] = match_active(arms[0], arms[1].active_params())
    runs = train_runs(arms, s, base_config(s), lambda arm, run: {})
    return finish(s, "engram", arms, runs, refs={"": "baseline"})


# ---------------------------------------------------------------------------------------------------- common
def finish(s: Settings, study: str, arms: list[Arm], runs: list[Run], refs: dict[str, str] | None = None) -> dict:
    """Summaries (against each reference arm: refs maps an arm-name suffix to its reference), the paired
    differences by seed, results.json and the figure."""
    from dsv4.ablate.plots import study_figure
    from dsv4.ablate.runner import format_summary

    st = STUDIES[study]
    refs = refs or {"": arms[0].name}
    summary = {}
    for tag, ref in refs.items():
        part = [r for r in runs if r.arm.endswith(tag)]
        summary[ref] = summarise(part, ref, st.lower_is_better)
        print(format_summary(summary[ref], ref))
    active = {a.name: a.active_params() for a in arms}
    print("active parameters: " + ", ".join(f"{k} {v:,}" for k, v in active.items()))
    extra = dict(
        arms={a.name: dict(preset=a.preset, overrides=a.overrides, active_params=active[a.name]) for a in arms},
        tokens_per_run=runs[0].final["step"] * s.batch_size * s.seq_len,
        extra={f"{r.arm}-seed{r.seed}": r.extra for r in runs},
    )
    path = write_results(s, study, runs, summary, extra)
    fig = study_figure(json.loads(path.read_text()), s.out / f"{study}.png")
    print(f"results: {path}" + (f"\nplot: {fig}" if fig else ""))
    return json.loads(path.read_text())


STUDIES = {
    "sparse": Study(
        "sparse",
        "Does the indexer find the tokens that matter beyond the window?",
        35,
        "micro",
        {
            "val_bpb": True,
            "retrieval_1x": False,
            "retrieval_4x": False,
            "retrieval_16x": False,
            "needle_recall_4x": False,
            "needle_recall_16x": False,
            "needle_chance_4x": False,
            "needle_chance_16x": False,
            "loss_1x": True,
            "loss_4x": True,
            "loss_16x": True,
        },
        run_sparse,
    ),
    "mhc": Study(
        "mhc",
        "Does mHC keep training stable where unconstrained hyper-connections do not?",
        22,
        "micro",
        {"val_bpb": True, "max_gain": True, "spikes": True, "diverged": True},
        run_mhc,
        train_share=0.9,  # its evaluations are the trainer's own (val loss and the composite gain)
    ),
    "mtp": Study(
        "mtp",
        "Does the MTP block draft tokens the model accepts, and what does its loss cost the main model?",
        10,
        "micro",
        {"val_bpb": True, "text_acceptance": False, "acceptance": False, "speedup": False},
        run_mtp,
    ),
    "muon": Study(
        "muon",
        "Does Muon beat AdamW at equal tokens?",
        8,
        "micro",
        {"val_bpb": True, "final_train_loss": True},
        run_muon,
        train_share=0.95,  # no evaluation beyond the trainer's closing one
    ),
    "engram": Study(
        "engram",
        "Does Engram lower the loss at equal active parameters?",
        45,
        "tiny",
        {"val_bpb": True},
        run_engram,
        train_share=1.0,  # only the trainer's closing evaluation, which its plan already counts
    ),
}
