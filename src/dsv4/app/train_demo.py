"""`make demo` / `dsv4 demo`: the main job end to end on the embedded default.

Trains the tiny preset on this interpreter's standard library for a fixed budget of DEMO_STEPS steps
of DEMO_CONFIG (so the result does not depend on the machine's speed or load: two runs on one machine
end at the same bpb, see docs/training.md), writes the report (PNG plots + summary.md), samples code
from the prompts "def " and "import ", and prints the validation bits per byte next to what `xz -9` achieves on the same
bytes. The budget and settings come from the sweeps in docs/training.md ("Choosing the demo").
"""

from __future__ import annotations

from pathlib import Path

from dsv4.train.checkpoint import latest_checkpoint
from dsv4.train.config import TrainConfig

DEMO_STEPS = 240  # ~7 min of training on an idle 2-core AMD EPYC (fp32), the slowest machine measured
# fp32 pinned (not dtype=auto / ns_dtype=auto, which pick bf16 where it is faster): every machine runs the
# same arithmetic
DEMO_CONFIG = {
    "batch_size": 8,
    "seq_len": 512,
    "lr": 8e-3,
    "dtype": "fp32",
    "ns_dtype": "fp32",
    "compile": "on",
    "eval_every": 50,
    "eval_batches": 4,
    "ckpt_every": 100,
    "log_every": 5,
    "indexer_warmup_steps": 10,
    "final_eval_tokens": 131072,
}
# the tiny preset without its MTP block (1.5x the tokens per second, no worse per step) and with experts
# of width 64 instead of 256 (1.9x the tokens per second again: a fixed budget buys more steps); the sweep
DEMO_MODEL = ["num_nextn_predict_layers=0", "compress_ratios=[0,4,16,4]", "moe_intermediate_size=64"]


def run_train_demo(
    out: str = "runs/demo",
    steps: int | None = None,
    minutes: float | None = None,
    overrides: list[str] = (),
    fresh: bool = True,
    print_fn=print,
) -> dict:
    """Train the demo (DEMO_STEPS steps unless `steps` or a wall-clock `minutes` budget is given), report,
    sample, and print the bpb line."""
    from dsv4.eval.report import write_report
    from dsv4.infer.reference import generate_text
    from dsv4.train.trainer import train

    run = Path(out)
    if fresh and latest_checkpoint(run) is not None:
        import shutil

        print_fn(f"removing the previous demo run in {run}")
        shutil.rmtree(run)
    if steps is None and minutes is None:
        steps = DEMO_STEPS
    tc = TrainConfig(out=str(run), steps=steps, minutes=minutes, **DEMO_CONFIG)
    final = train(tc, [*DEMO_MODEL, *overrides])
    summary = write_report(run)
    samples = {
        p: generate_text(run, p, max_new_tokens=80, temperature=0.8, top_p=0.95, seed=0) for p in ("def ", "import ")
    }
    line = "-" * 72
    print_fn(line)
    for p, text in samples.items():
        print_fn(f"sample from {p!r}:\n{text}\n{line}")
    gap = final["val_bpb"] - final["xz_bpb"]
    print_fn(
        f"validation bits per byte: {final['val_bpb']:.3f}   xz -9 on the same {final['val_bytes']:,} bytes: "
        f"{final['xz_bpb']:.3f}   ({'beats xz' if gap < 0 else f'{gap:.3f} bpb above xz'})"
    )
    if final.get("tok_per_s"):
        print_fn(
            f"throughput: {final['tok_per_s']:.0f} tokens/s, MFU {100 * final['mfu']:.1f}% of a measured "
            f"{final['peak_flops'] / 1e9:.0f} GFLOP/s matmul peak; {final['step']} steps in {final['wall_s']:.0f} s"
        )
    print_fn(f"run directory:   {run}/ (checkpoints ckpt-*/, tokenizer.json, metrics.jsonl)")
    print_fn(f"report:          {summary}")
    print_fn(f"plots:           {summary.parent}/*.png")
    print_fn(f"generate more:   dsv4 generate --ckpt {run} --prompt 'class '")
    return {**final, "samples": samples, "report": str(summary)}
