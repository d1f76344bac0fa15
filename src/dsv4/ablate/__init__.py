"""`dsv4 ablate NAME`: controlled reproductions of the V4 ideas at equal active parameters and equal tokens
(dsv4.ablate.studies; the write-up is docs/reproductions.md)."""

from __future__ import annotations

from pathlib import Path


def cmd_ablate(args) -> int:
    from dsv4.ablate.runner import Settings
    from dsv4.ablate.studies import STUDIES

    st = STUDIES[args.study]
    if args.seeds is not None and len(args.seeds) < 1:
        raise ValueError("--seeds needs at least one seed")
    if (args.steps is not None and args.steps < 1) or (args.budget_minutes is not None and args.budget_minutes <= 0):
        raise ValueError("--steps and --budget-minutes must be positive")
    s = Settings(
        out=Path(args.out or f"runs/ablate_{st.name}"),
        seeds=args.seeds or [0, 1, 2],
        steps=args.steps,
        budget_minutes=args.budget_minutes or st.budget_minutes,
        train_share=st.train_share,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        data=args.data,
        threads=args.threads,
        eval_tokens=args.eval_tokens,
        progress=not args.quiet,
    )
    print(f"{st.name}: {st.question}")
    st.run(s)
    return 0
