"""The `dsv4` command. Thin: it parses arguments and calls the library.

  dsv4 info --preset v4-flash | --config path/to/config.json
  dsv4 convert --from-transformers DIR OUT | --to-transformers DIR OUT
  dsv4 demo [--minutes 8] [--out runs/demo] | dsv4 demo --random [--preset tiny] [--tokens 16]
  dsv4 train --preset tiny --data PATH --out runs/NAME [--minutes M | --steps N] [key=value ...]
  dsv4 generate --ckpt RUN_DIR --prompt TEXT [--max-new-tokens N --temperature T --top-p P --seed S]
  dsv4 report RUN_DIR

Bad input (an unknown preset, a missing file, an invalid config) prints one line
`dsv4: error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from dsv4.config import ConfigError, available_presets

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, RuntimeError)


def _load_config(args):
    from dsv4.config import ModelConfig

    if args.config is not None:
        return ModelConfig.from_json(args.config), str(args.config)
    return ModelConfig.preset(args.preset), args.preset


def cmd_info(args) -> int:
    from dsv4.info import format_info

    cfg, name = _load_config(args)
    print(format_info(cfg, name))
    return 0


def cmd_convert(args) -> int:
    try:
        from dsv4.convert import transformers as conv
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dsv4"):
            raise NotImplementedError(f"conversion is not available in this install ({e})") from None
        raise
    if args.from_transformers is not None:
        conv.convert_from_transformers_dir(args.from_transformers, args.out)
    else:
        conv.convert_to_transformers_dir(args.to_transformers, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    if args.random:
        from dsv4.demo import run_demo

        run_demo(preset=args.preset, seed=args.seed, new_tokens=args.tokens, temperature=args.temperature)
        return 0
    from dsv4.train_demo import run_train_demo

    run_train_demo(out=args.out, minutes=args.minutes, overrides=args.overrides)
    return 0


def cmd_train(args) -> int:
    from dsv4.train.config import TrainConfig
    from dsv4.train.trainer import train

    if args.resume and (args.steps is not None or args.minutes is not None or args.overrides):
        raise ConfigError("--resume continues a run with its saved settings; drop --steps/--minutes/overrides")
    if not args.resume and args.steps is None and args.minutes is None:
        raise ConfigError("give --steps N or --minutes M")
    tc = TrainConfig(preset=args.preset, data=args.data, out=args.out, tokenizer=args.tokenizer,
                     steps=args.steps, minutes=args.minutes, progress=not args.no_progress)
    final = train(tc, args.overrides, resume=args.resume)
    print(f"val bits/byte {final['val_bpb']:.3f} (xz -9 on the same bytes: {final['xz_bpb']:.3f}); "
          f"run in {args.out}")
    return 0


def cmd_generate(args) -> int:
    from dsv4.generate import generate_text

    print(generate_text(args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed))
    return 0


def cmd_eval(args) -> int:
    from dsv4.eval.recall import recall_on_run

    rows = recall_on_run(args.ckpt, seq_len=args.seq_len, batches=args.batches)
    print(f"{'layer':>5}  {'kind':4}  {'recall':>7}  {'random':>7}  queries")
    for r in rows:
        print(f"{r['layer']:>5}  {r['kind']:4}  {r['recall']:7.3f}  {r['random']:7.3f}  {r['queries']}")
    return 0


def cmd_report(args) -> int:
    from dsv4.eval.report import main_report

    return main_report(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 sparse language models in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameter counts, layer schedule and KV-cache size of a config",
                          description="Count parameters (on the meta device: nothing is allocated), print the "
                                      "layer schedule and the served KV-cache size.")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help=f"a built-in preset: {', '.join(available_presets())}")
    src.add_argument("--config", metavar="FILE", help="a config.json (or a directory holding one)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert checkpoints to/from the transformers layout")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-transformers", metavar="DIR", help="a transformers DeepseekV4 checkpoint directory")
    way.add_argument("--to-transformers", metavar="DIR", help="a dsv4 (official layout) checkpoint directory")
    conv.add_argument("out", metavar="OUT", help="output directory")
    conv.set_defaults(func=cmd_convert)

    demo = sub.add_parser("demo", help="the main job: train tiny on the stdlib, report, sample (--random: a "
                                       "random model's forward pass and generation only)")
    demo.add_argument("--random", action="store_true", help="only run a random model (seconds, no training)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--minutes", type=float, default=8.0, help="training budget (default: 8)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="training/model overrides")
    demo.add_argument("--preset", default="tiny", metavar="NAME", help="preset to build (default: tiny)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--tokens", type=int, default=16, help="tokens to generate (default: 16)")
    demo.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 = sampling")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train a model on text (default: this Python's standard library)")
    tr.add_argument("--preset", default="tiny", metavar="NAME", help="model preset (default: tiny)")
    tr.add_argument("--data", default=None, metavar="PATH", help="folder, glob, file or .jsonl (default: stdlib)")
    tr.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, metrics, report)")
    tr.add_argument("--tokenizer", default=None, metavar="FILE", help="use this tokenizer.json instead of training one")
    budget = tr.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    tr.add_argument("--resume", action="store_true", help="continue RUN_DIR from its newest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="training or model config fields, e.g. lr=1e-3 seq_len=512 hidden_size=128")
    tr.set_defaults(func=cmd_train)

    ge = sub.add_parser("generate", help="sample text from a trained run")
    ge.add_argument("--ckpt", required=True, metavar="RUN_DIR", help="a run directory or checkpoint directory")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-p", type=float, default=0.95)
    ge.add_argument("--seed", type=int, default=0)
    ge.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluations of a trained run")
    ev_sub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    rec = ev_sub.add_parser("indexer-recall", help="mass recall of the indexers' top-k against dense attention")
    rec.add_argument("--ckpt", required=True, metavar="RUN_DIR")
    rec.add_argument("--seq-len", type=int, default=1024)
    rec.add_argument("--batches", type=int, default=2, help="validation windows to average over")
    rec.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="plots and a markdown summary of a run from RUN_DIR/metrics.jsonl")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    rep.set_defaults(func=cmd_report)
    return p


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if not isinstance(e, FileNotFoundError) or e.filename is None else f"file not found: {e.filename}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"dsv4: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"dsv4: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
