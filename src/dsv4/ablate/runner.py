"""The controlled-study loop of `dsv4 ablate`: every arm trains the same number of steps on the same batches
shape, data split and tokenizer, once per seed; each run is evaluated by its study; the summary gives each
metric's mean and sample standard deviation over seeds, and each arm's verdict against the reference arm.

Verdict rule (docs/reproductions.md): the difference of the means d = mean_arm - mean_ref is called real when
|d| > 2 * SE, SE = sqrt(s_arm^2 / n_arm + s_ref^2 / n_ref) (Welch's standard error of the difference);
otherwise "no difference beyond the seed noise" (also when |d| is below 1e-4 of the reference's mean).

Budget: with --budget-minutes M and no --steps, the step count is planned once, before any run, for
M * train_share / runs minutes of training per run: the trainer of the first arm (listed slowest first) times
a step of each stage and plans as a --minutes run would (dsv4.train.trainer.Trainer.probe_seconds and
_plan_steps), and every run then trains exactly that many steps, so all arms see equal tokens and the same
schedule however busy the machine gets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsv4.config import ModelConfig
from dsv4.flops import count_params
from dsv4.run import RunDir
from dsv4.train.config import TrainConfig, apply_overrides


@dataclass
class Arm:
    """One arm: a preset plus key=value overrides (training or model fields, as `dsv4 train` takes them)."""

    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)

    def configs(self, base: TrainConfig) -> tuple[TrainConfig, ModelConfig]:
        return apply_overrides(base, ModelConfig.preset(self.preset), self.overrides)

    def active_params(self) -> int:
        return count_params(self.configs(TrainConfig())[1])["active"]


def match_active(arm: Arm, target: int, knob: str = "moe_intermediate_size") -> Arm:
    """The arm with `knob` (an integer model field) set so its active parameter count is nearest `target`."""
    base = getattr(arm.configs(TrainConfig())[1], knob)

    def count(v: int) -> int:
        return Arm(arm.name, arm.preset, [*arm.overrides, f"{knob}={v}"]).active_params()

    lo, hi = 1, 4 * base
    while hi - lo > 1:  # active parameters grow with the knob: bisect for the last value <= target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    best = min((lo, hi), key=lambda v: abs(count(v) - target))
    return Arm(arm.name, arm.preset, [*arm.overrides, f"{knob}={best}"])


@dataclass
class Settings:
    """What every run of a study shares (the `dsv4 ablate` options)."""

    out: Path
    seeds: list[int]
    steps: int | None = None  # None = planned from budget_minutes once, before any run (plan_steps)
    budget_minutes: float = 30.0
    train_share: float = 0.75  # of the budget for training (the study's Study.train_share)
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None  # None = the study's default
    data: str | None = None
    threads: int = 0
    eval_tokens: int = 16384
    progress: bool = True


@dataclass
class Run:
    arm: str
    seed: int
    path: Path
    final: dict
    wall_s: float
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # a study's curves (kept in results.json, drawn in the figure)


def records(run: Path, kind: str) -> list[dict]:
    """The run's metrics.jsonl lines of one kind ("train", "val", "final")."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def run_config(arm: Arm, s: Settings, base: TrainConfig, out: Path, seed: int, **fields) -> TrainConfig:
    """The TrainConfig of one run of `arm` (base's study fields, the shared settings, then `fields`)."""
    shared = dict(preset=arm.preset, data=s.data, out=str(out), batch_size=s.batch_size, seq_len=s.seq_len)
    shared.update(seed=seed, progress=s.progress, threads=s.threads, final_eval_tokens=s.eval_tokens)
    return TrainConfig(**{**base.__dict__, **shared, **fields})


def plan_steps(arm: Arm, s: Settings, base: TrainConfig, shared: Path, n_runs: int) -> int:
    """s.steps, or the steps that fit s.budget_minutes * s.train_share / n_runs minutes of `arm`'s training.
    Either way the tokenizer and the tokenized corpus are made once, in `shared`."""
    from dsv4.train.trainer import Trainer

    minutes = s.budget_minutes * s.train_share / n_runs
    tc = run_config(arm, s, base, shared, 0, steps=None, minutes=minutes, progress=False)
    tr = Trainer.create(tc, arm.overrides)
    if s.steps is not None:
        return s.steps
    t_sparse = tr.probe_seconds(warmup=False)
    t_warm = tr.probe_seconds(warmup=True) if tr.has_indexer else t_sparse
    steps = tr._plan_steps(minutes * 60, 0.0, t_warm, t_sparse)
    print(f"planned {steps} steps per run ({t_sparse:.2f} s per step, {minutes:.2f} minutes of training per run)")
    return steps


def train_runs(
    arms: list[Arm],
    s: Settings,
    base: TrainConfig,
    evaluate: Callable[[Arm, Run], dict],
    quarter: tuple[str, ...] = (),
) -> list[Run]:
    """Train and evaluate every (seed, arm); runs land in s.out/ARM-seedN. `base` holds the study's training
    fields (lr, eval cadence, ...); the fields named in `quarter` (eval_every, ckpt_every) are set to a quarter
    of the planned steps. A run that diverges (the trainer's TrainingError: max_bad_steps non-finite losses
    in a row) is kept with val_bpb = inf and metric "diverged" = 1."""
    from dsv4.train.trainer import TrainingError, train

    runs: list[Run] = []
    shared = s.out / "_shared"  # the tokenizer and the tokenized corpus every run copies
    if shared.exists():
        shutil.rmtree(shared)
    steps = plan_steps(arms[0], s, base, shared, len(arms) * len(s.seeds))
    base = dataclasses.replace(base, **{k: max(1, steps // 4) for k in quarter})
    for seed in s.seeds:
        for arm in arms:
            path = s.out / f"{arm.name}-seed{seed}"
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            shutil.copy(RunDir(shared).tokenizer, RunDir(path).tokenizer)
            shutil.copytree(RunDir(shared).cache, RunDir(path).cache)
            tc = run_config(arm, s, base, path, seed, steps=steps, minutes=None)
            t0 = time.perf_counter()
            try:
                final = train(tc, arm.overrides)
            except TrainingError as e:
                print(f"  {arm.name} seed {seed}: diverged ({e})", flush=True)
                final = {"step": steps, "val_bpb": math.inf, "diverged": True}
            run = Run(arm.name, seed, path, final, time.perf_counter() - t0)
            run.metrics = {"val_bpb": final["val_bpb"], "diverged": int(bool(final.get("diverged")))}
            if not final.get("diverged"):
                run.metrics.update(evaluate(arm, run))
            runs.append(run)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in run.metrics.items() if isinstance(v, (int, float)))
            print(f"  {arm.name} seed {seed}: {shown} ({run.wall_s:.0f} s train, {steps} steps)", flush=True)
    return runs


def summarise(runs: list[Run], ref: str, lower_is_better: dict[str, bool]) -> dict:
    """{metric: {arm: {mean, std, n, values, seeds, diff, two_se, verdict, paired...}}} over seeds, verdicts
    against arm `ref`. Paired by seed (the same seed gives every arm the same batch order): the mean and std of
    the per-seed differences, called real when |mean| > 2 std / sqrt(n)."""
    out: dict = {}
    for metric, lower in lower_is_better.items():
        per: dict = {}
        for r in runs:
            v = r.metrics.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                per.setdefault(r.arm, {})[r.seed] = float(v)
        table = {}
        for arm, by_seed in per.items():
            vals = list(by_seed.values())
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            table[arm] = dict(mean=statistics.fmean(vals), std=sd, n=len(vals), values=vals, seeds=list(by_seed))
        base = table.get(ref)
        for arm, row in table.items():
            if base is None or arm == ref:
                continue
            d = row["mean"] - base["mean"]
            se = math.sqrt(row["std"] ** 2 / row["n"] + base["std"] ** 2 / base["n"])
            enough = row["n"] > 1 and base["n"] > 1
            row.update(diff=d, two_se=2 * se, verdict=_verdict(d, se, lower, base["mean"]) if enough else "one seed")
            pairs = [per[arm][k] - per[ref][k] for k in per[arm] if k in per[ref]]
            if len(pairs) > 1:
                pm, ps = statistics.fmean(pairs), statistics.stdev(pairs)
                row.update(
                    paired_mean=pm,
                    paired_std=ps,
                    paired_verdict=_verdict(pm, ps / len(pairs) ** 0.5, lower, base["mean"]),
                )
        out[metric] = table
    return out


def _verdict(d: float, se: float, lower: bool, ref: float) -> str:
    """better / worse when |d| > 2 se (and d is not float noise, |d| > 1e-4 |ref|), else no difference."""
    real = abs(d) > 2 * se and abs(d) > 1e-4 * abs(ref)
    return ("better" if (d < 0) == lower else "worse") if real else "no difference"


def format_summary(summary: dict, ref: str) -> str:
    lines = []
    for metric, table in summary.items():
        lines.append(f"{metric} (mean +- std over seeds; verdict vs {ref} at 2 x standard error)")
        for arm, row in table.items():
            tail = "" if "diff" not in row else f"  diff {row['diff']:+.4g} (2SE {row['two_se']:.3g}): {row['verdict']}"
            if "paired_mean" in row:
                tail += f"; paired {row['paired_mean']:+.4g} +- {row['paired_std']:.3g}: {row['paired_verdict']}"
            lines.append(f"  {arm:18s} {row['mean']:.4f} +- {row['std']:.4f}  (n={row['n']}){tail}")
    return "\n".join(lines)


def write_results(s: Settings, study: str, runs: list[Run], summary: dict, extra: dict) -> Path:
    """s.out/results.json: the command, every run's metrics and the summary."""
    res = dict(
        study=study,
        command="dsv4 " + " ".join(sys.argv[1:]),
        settings={k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
        runs=[dict(arm=r.arm, seed=r.seed, wall_s=r.wall_s, steps=r.final["step"], **r.metrics) for r in runs],
        summary=summary,
        **extra,
    )
    path = s.out / "results.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    return path
