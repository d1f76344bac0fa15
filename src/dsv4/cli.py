"""The `dsv4` command. Thin: it parses arguments and calls the library.

  dsv4 --version
  dsv4 info --preset v4-flash | --config path/to/config.json (or a run / checkpoint / model directory)
  dsv4 convert --from-transformers DIR OUT | --to-transformers RUN_DIR OUT | --to-model RUN_DIR OUT
  dsv4 convert --to-official RUN_DIR OUT | --from-official DIR OUT [--dtype bf16|fp32]
  dsv4 demo [--steps N | --minutes M] [--out runs/demo] | dsv4 demo --random [--preset tiny] [--max-new-tokens 16]
  dsv4 train --preset tiny --data PATH --out runs/NAME [--minutes M | --steps N] [--nproc N] [key=value ...]
  dsv4 plan --preset v4-flash --nodes N --gpus-per-node G [--ep E]
  dsv4 generate --ckpt RUN_DIR --prompt TEXT [--max-new-tokens N --temperature T --top-p P --top-k K --seed S]
  dsv4 chat --ckpt RUN_DIR [--system TEXT ...]      (stdin: messages, /reset, /exit)
  dsv4 serve --ckpt RUN_DIR [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 8 --max-waiting 64]
  (generate, chat and serve take --device cpu | cuda | cuda:N; default cpu)
  dsv4 eval indexer-recall --ckpt RUN_DIR | dsv4 eval bpb --ckpt RUN_DIR --data PATH
  dsv4 eval retrieval | needle-recall --ckpt RUN_DIR | dsv4 eval loss-vs-position --ckpt RUN_DIR --data PATH
  dsv4 report RUN_DIR | --ckpt RUN_DIR

Wherever a checkpoint is taken, a run directory means its newest checkpoint. Bad input (an unknown
preset, a missing file, an invalid config or flag value) prints one line `dsv4: error: ...` on stderr
and exits with status 2; a closed stdout (`dsv4 info ... | head`) ends the command quietly (status 141).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from dsv4.config import ConfigError, available_presets

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, RuntimeError)
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def package_version() -> str:
    """The installed distribution's version, else dsv4.__version__ (a source checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4")
    except PackageNotFoundError:
        from dsv4 import __version__

        return __version__


class _Parser(argparse.ArgumentParser):
    """argparse with this command's one-line errors (status 2)."""

    def error(self, message):
        where = self.prog.partition(" ")[2]
        print(f"dsv4: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, low, strict: bool = False, high=None):
    """An argparse type: `kind` (int or float) >= low (> low when strict, <= high when given)."""
    rule = f"{'> ' if strict else '>= '}{low}" + (f" and <= {high}" if high is not None else "")
    name = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {name} {rule}, got {text!r}") from None
        if math.isnan(v) or v < low or (strict and v == low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {name} {rule}, got {text!r}")
        return v

    return parse


COUNT = _number(int, 1)  # steps, tokens per forward, requests, ...
NON_NEGATIVE = _number(int, 0)
MINUTES = _number(float, 0, strict=True)
TEMPERATURE = _number(float, 0)


def _load_config(args):
    from dsv4.config import ModelConfig

    if args.config is None:
        return ModelConfig.preset(args.preset), args.preset
    path = Path(args.config)
    if path.is_dir() and not (path / "config.json").exists():
        from dsv4.run import find_checkpoint

        path = find_checkpoint(path)  # a run directory: its newest checkpoint
    return ModelConfig.from_json(path), str(args.config)


def cmd_info(args) -> int:
    from dsv4.app.info import format_info

    cfg, name = _load_config(args)
    print(format_info(cfg, name))
    return 0


def cmd_plan(args) -> int:
    """`dsv4 plan`: per-rank memory and FLOPs of a torchrun job (dsv4.parallel.plan)."""
    from dsv4.config import ModelConfig
    from dsv4.parallel.plan import Layout, format_plan, plan

    cfg = ModelConfig.preset(args.preset)
    layout = Layout(args.nodes, args.gpus_per_node, args.ep)
    print(format_plan(args.preset, plan(cfg, layout, args.seq_len, args.micro_batch, args.context)))
    return 0


def cmd_convert(args) -> int:
    if args.to_official is not None or args.from_official is not None:
        from dsv4.convert.official import from_official_dir, to_official_dir

        if args.to_official is not None:
            to_official_dir(args.to_official, args.out, args.fp8_block)
        else:
            from_official_dir(args.from_official, args.out, args.dtype)
        print(f"wrote {args.out}")
        return 0
    if args.to_model is not None:  # a checkpoint (one process or torchrun's DCP shards) -> one model directory
        from dsv4.convert.checkpoint import checkpoint_to_model_dir

        print(f"wrote {checkpoint_to_model_dir(args.to_model, args.out)}")
        return 0
    try:
        from dsv4.convert import transformers as conv
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dsv4"):
            raise NotImplementedError(f"conversion is not available in this install ({e})") from None
        raise
    if args.from_transformers is not None:
        conv.convert_from_transformers_dir(args.from_transformers, args.out)
        print(f"wrote {args.out}")
    elif conv.convert_to_transformers_dir(args.to_transformers, args.out) is None:
        print(f"wrote {args.out} (no tokenizer.json beside the checkpoint, so no tokenizer files)")
    else:
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    if args.random:
        from dsv4.app.demo import run_demo

        run_demo(preset=args.preset, seed=args.seed, new_tokens=args.max_new_tokens, temperature=args.temperature)
        return 0
    from dsv4.app.train_demo import run_train_demo

    run_train_demo(out=args.out, steps=args.steps, minutes=args.minutes, overrides=args.overrides)
    return 0


def _check_resume_flags(args) -> None:
    """With --resume: a ConfigError naming each flag or key=value that disagrees with the run's saved
    train_config.json / model_config.json (the trainer continues with the saved settings; only --device and
    --no-progress change on resume). Flags equal to the saved values are fine."""
    from dsv4.config import ModelConfig
    from dsv4.run import RunDir
    from dsv4.train.config import TrainConfig, apply_overrides

    run = Path(args.out)
    if not RunDir(run).is_run():
        return  # the trainer says that this is not a run
    saved = TrainConfig.from_json(RunDir(run).train_config)
    saved_model = ModelConfig.from_json(RunDir(run).model_config)

    def same(given, kept) -> bool:
        return given == kept or (isinstance(kept, str) and Path(given).expanduser().resolve() == Path(kept).resolve())

    flags = {
        "--preset": (args.preset, saved.preset),
        "--data": (args.data, saved.data),
        "--tokenizer": (args.tokenizer, saved.tokenizer),
        "--steps": (args.steps, saved.steps),
        "--minutes": (args.minutes, saved.minutes),
    }
    bad = [
        f"{flag} {given} (saved: {kept if kept is not None else 'not set'})"
        for flag, (given, kept) in flags.items()
        if given is not None and not same(given, kept)
    ]
    new, new_model = apply_overrides(saved, saved_model, args.overrides)
    for item in args.overrides:
        key = item.split("=", 1)[0]
        old, now = (saved, new) if hasattr(saved, key) else (saved_model, new_model)
        if getattr(now, key) != getattr(old, key):
            bad.append(f"{item} (saved: {key}={getattr(old, key)!r})")
    if bad:
        raise ConfigError(
            f"--resume continues {run} with its saved settings (a resumed run keeps its length too); "
            f"these disagree: {', '.join(bad)}; drop them, or train into a new --out"
        )


def cmd_train(args) -> int:
    from dsv4.train.config import TrainConfig
    from dsv4.train.trainer import train

    if args.resume:
        _check_resume_flags(args)
    elif args.steps is None and args.minutes is None:
        raise ConfigError("give --steps N or --minutes M")
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    # --resume without --device continues on the run's own device ("" = keep it)
    device = args.device or ("" if args.resume else "cpu")
    tc = TrainConfig(
        preset=args.preset or "tiny",
        data=args.data,
        out=args.out,
        tokenizer=args.tokenizer,
        steps=args.steps,
        minutes=args.minutes,
        progress=not args.no_progress,
        device=device,
    )
    if device:
        tc.validate_device()
    final = train(tc, args.overrides, resume=args.resume)
    if final.get("xz_bpb") is None:  # another rank of a torchrun job: rank 0 prints the summary
        return 0
    print(f"val bits/byte {final['val_bpb']:.3f} (xz -9 on the same bytes: {final['xz_bpb']:.3f}); run in {args.out}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`dsv4 train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m dsv4 train ...`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "dsv4", *rest])
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with status {failure.exitcode}"
        )
        raise RuntimeError(
            f"the torchrun job stopped: rank {rank} {how}; continue from its last checkpoint with --resume"
        ) from None
    return 0


def _sampling(args, stop=()):
    from dsv4.infer.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=list(stop),
    ).validate()


def _device(args):
    """The checked --device (a one-line ValueError before anything is loaded when it is not usable)."""
    from dsv4.device import resolve_device

    return resolve_device(args.device)


def _engine(args):
    from dsv4.infer.engine import Engine
    from dsv4.run import load_run

    model, tok = load_run(
        args.ckpt,
        device=_device(args),
        keep_quantized=args.keep_quantized,
        max_resident_gb=args.max_resident_gb,
        official_quant=args.official_quant,
    )
    return Engine(model, tok, max_batch=1, max_context=args.max_context, compile=args.compile), tok


def cmd_generate(args) -> int:
    from dsv4.app.terminal import generate_to

    params = _sampling(args)  # bad sampling options fail before the model is loaded
    engine, tok = _engine(args)
    return generate_to(sys.stdout, engine, tok, args.prompt, params)


def cmd_chat(args) -> int:
    from dsv4.app.terminal import chat_repl
    from dsv4.infer.chat import load_template

    _sampling(args)  # bad sampling options fail before the model is loaded
    engine, tok = _engine(args)
    return chat_repl(
        engine,
        tok,
        load_template(args.ckpt),
        lambda stop: _sampling(args, stop),
        args.system,
        args.seed,
        sys.stdin,
        sys.stdout,
    )


def cmd_serve(args) -> int:
    device = _device(args)  # fails before uvicorn is imported
    from dsv4.app.serve import serve

    options = ("api_key", "max_batch", "max_waiting", "max_context", "prefill_chunk", "model_name")
    options += ("default_max_tokens", "host", "port", "log_level", "compile", "keep_quantized", "max_resident_gb")
    options += ("official_quant",)
    serve(args.ckpt, device=device, **{k: getattr(args, k) for k in options})
    return 0


def cmd_eval(args) -> int:
    """`dsv4 eval indexer-recall` (recall_on_run checks --seq-len / --batches before loading the run)."""
    from dsv4.eval.recall import recall_on_run

    rows = recall_on_run(args.ckpt, seq_len=args.seq_len, batches=args.batches)
    print(f"{'layer':>5}  {'kind':4}  {'recall':>7}  {'random':>7}  queries")
    for r in rows:
        print(f"{r['layer']:>5}  {r['kind']:4}  {r['recall']:7.3f}  {r['random']:7.3f}  {r['queries']}")
    return 0


def cmd_eval_bpb(args) -> int:
    from dsv4.eval.text_bpb import cmd_eval_bpb as run

    return run(args)


def cmd_eval_retrieval(args) -> int:
    from dsv4.eval.retrieval import cmd_eval_retrieval as run

    return run(args)


def cmd_eval_loss_vs_position(args) -> int:
    from dsv4.eval.position import cmd_eval_loss_vs_position as run

    return run(args)


def cmd_eval_needle_recall(args) -> int:
    from dsv4.eval.needle import cmd_eval_needle_recall as run

    return run(args)


def cmd_eval_lm_eval(args) -> int:
    try:
        from dsv4.eval.harness import cmd_eval_lm_eval as run
    except ImportError as e:
        raise ConfigError(f"dsv4 eval lm-eval needs lm_eval: pip install -e '.[eval]' ({e})") from None
    return run(args)


def cmd_ablate(args) -> int:
    from dsv4.ablate import cmd_ablate as run

    return run(args)


def _grid_args(p: argparse.ArgumentParser, tasks: list[str], png: str) -> None:
    """The options of the long-context grid commands (`eval retrieval`, `eval needle-recall`)."""
    p.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    p.add_argument("--tasks", nargs="+", default=tasks, metavar="TASK", help=f"(default: {' '.join(tasks)})")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], metavar="N")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D")
    p.add_argument("--samples", type=int, default=2, help="prompts per (task, length, depth) (default: 2)")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per cached forward (default: 4096)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:N, ...")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--plot", default=png, metavar="PNG", help=f"heat maps (default: ./{png})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_report(args) -> int:
    """`dsv4 report RUN_DIR`, or `--ckpt RUN_DIR` like the other commands."""
    from dsv4.eval.report import main_report

    if args.run_dir and args.ckpt and args.run_dir != args.ckpt:
        raise ConfigError(f"two run directories given ({args.run_dir} and --ckpt {args.ckpt}); give one")
    args.run_dir = args.run_dir or args.ckpt
    if args.run_dir is None:
        raise ConfigError("report needs a run directory: dsv4 report RUN_DIR (or --ckpt RUN_DIR)")
    return main_report(args)


CKPT_HELP = "a run directory (its newest checkpoint), a checkpoint directory or a converted model directory"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dsv4", description="DeepSeek-V4 sparse language models in PyTorch.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="parameter counts, layer schedule and KV-cache size of a config",
        description="Count parameters (on the meta device: nothing is allocated), print the "
        "layer schedule and the served KV-cache size.",
    )
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help=f"a built-in preset: {', '.join(available_presets())}")
    src.add_argument(
        "--config",
        metavar="FILE",
        help="a config.json, a directory holding one (ours or transformers'), "
        "or a run directory (its newest checkpoint)",
    )
    info.set_defaults(func=cmd_info)

    pl = sub.add_parser("plan", help="per-rank memory and FLOPs of a torchrun training job of a preset")
    pl.add_argument("--preset", default="v4-flash", metavar="NAME", help="model preset (default: v4-flash)")
    pl.add_argument("--nodes", type=COUNT, default=1, help="machines (default 1)")
    pl.add_argument("--gpus-per-node", type=COUNT, default=8, help="ranks per machine (default 8)")
    pl.add_argument("--ep", type=COUNT, default=1, help="expert-parallel ranks per expert group (default 1)")
    pl.add_argument("--seq-len", type=COUNT, default=4096, help="training sequence length (default 4096)")
    pl.add_argument("--micro-batch", type=COUNT, default=1, help="sequences per rank per step (default 1)")
    pl.add_argument("--context", type=COUNT, default=1 << 20, help="KV cache / decode context (default 1M)")
    pl.set_defaults(func=cmd_plan)

    conv = sub.add_parser("convert", help="convert checkpoints to/from the transformers layout")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-transformers", metavar="DIR", help="a transformers DeepseekV4 checkpoint directory")
    way.add_argument(
        "--to-transformers",
        metavar="DIR",
        help="a dsv4 run directory (its newest checkpoint), checkpoint or model directory",
    )
    way.add_argument(
        "--to-model",
        metavar="RUN",
        help="a run directory or checkpoint (also a torchrun job's sharded one) -> one dsv4 model directory",
    )
    way.add_argument(
        "--to-official",
        metavar="RUN",
        help="a run, checkpoint or model directory -> DeepSeek's shipped layout (FP8 projections, MXFP4 experts)",
    )
    way.add_argument("--from-official", metavar="DIR", help="a directory in DeepSeek's shipped layout -> dsv4")
    conv.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="--from-official: the weights' dtype (default bf16)"
    )
    conv.add_argument(
        "--fp8-block",
        type=int,
        choices=(128, 32),
        default=128,
        help="--to-official: FP8 weight blocks, 128 x 128 (V4, default) or 32 x 32 (V4.1)",
    )
    conv.add_argument("out", metavar="OUT", help="output directory")
    conv.set_defaults(func=cmd_convert)

    demo = sub.add_parser(
        "demo",
        help="the main job: train tiny on the stdlib, report, sample (--random: a "
        "random model's forward pass and generation only)",
    )
    demo.add_argument("--random", action="store_true", help="only run a random model (seconds, no training)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    budget = demo.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=COUNT,
        default=None,
        help="training steps (default: the fixed demo budget, dsv4.app.train_demo.DEMO_STEPS)",
    )
    budget.add_argument(
        "--minutes",
        type=MINUTES,
        default=None,
        help="a wall-clock budget instead (the result then depends on the machine's speed)",
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="training/model overrides")
    demo.add_argument("--preset", default="tiny", metavar="NAME", help="preset to build (default: tiny)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--max-new-tokens", type=NON_NEGATIVE, default=16, help="with --random: tokens to generate (default: 16)"
    )
    demo.add_argument(
        "--tokens", type=NON_NEGATIVE, dest="max_new_tokens", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # old name
    demo.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default), > 0 = sampling")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train a model on text (default: this Python's standard library)")
    tr.add_argument("--preset", default=None, metavar="NAME", help="model preset (default: tiny)")
    tr.add_argument("--data", default=None, metavar="PATH", help="folder, glob, file or .jsonl (default: stdlib)")
    tr.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, metrics, report)")
    tr.add_argument("--tokenizer", default=None, metavar="FILE", help="use this tokenizer.json instead of training one")
    budget = tr.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=COUNT, default=None, help="optimiser steps")
    budget.add_argument("--minutes", type=MINUTES, default=None, help="wall-clock budget")
    tr.add_argument("--resume", action="store_true", help="continue RUN_DIR from its newest checkpoint")
    tr.add_argument(
        "--nproc",
        type=COUNT,
        default=None,
        metavar="N",
        help="train with N processes on this machine (torchrun, FSDP2 data parallel; the global batch is "
        "split across them); many machines: torchrun --nnodes ... -m dsv4.train ...",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="cpu (default, fp32), cuda or cuda:N (bf16 autocast where the GPU has it); with --resume: "
        "continue there (default: the run's own device)",
    )
    tr.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training or model config fields, e.g. lr=1e-3 seq_len=512 hidden_size=128",
    )
    tr.set_defaults(func=cmd_train)

    def device_option(sp):
        sp.add_argument(
            "--device", default="cpu", metavar="DEV", help="where the model runs: cpu (default), cuda, cuda:N, ..."
        )
        sp.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the decode step (pays a compilation per batch size and store size; "
            "faster for long generations)",
        )
        sp.add_argument(
            "--keep-quantized",
            action="store_true",
            help="a checkpoint in DeepSeek's layout keeps its FP8 / MXFP4 weights in memory (a quarter of the "
            "bytes; FP8 dequantised per matmul, MXFP4 experts multiplied from their codes)",
        )
        sp.add_argument(
            "--max-resident-gb",
            type=float,
            default=None,
            metavar="GB",
            help="a checkpoint in DeepSeek's layout leaves its routed experts in the shards: each step reads the "
            "experts it routes to (the next layer's guessed ahead) into a cache of at most GB; for models "
            "larger than RAM",
        )
        sp.add_argument(
            "--official-quant",
            action="store_true",
            help="compute as DeepSeek's own inference does: FP8 activations before FP8/FP4 products, Hadamard + FP4 "
            "indexer queries and keys, FP8 kv round trips",
        )

    def sampling_options(sp, temperature: float, max_new: int):
        sp.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
        device_option(sp)
        sp.add_argument("--max-new-tokens", type=int, default=max_new, help=f"default: {max_new}")
        sp.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
        sp.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
        sp.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter (default)")
        sp.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
        sp.add_argument(
            "--max-context",
            type=COUNT,
            default=None,
            metavar="N",
            help="tokens per request, prompt + output (default: the model's limit)",
        )

    ge = sub.add_parser("generate", help="sample text from a trained run (cached engine, streamed)")
    sampling_options(ge, 0.8, 64)
    ge.add_argument("--prompt", required=True)
    ge.set_defaults(func=cmd_generate)

    ch = sub.add_parser(
        "chat",
        help="chat with a trained run in the terminal (/reset, /exit)",
        description="Reads messages line by line from stdin (a terminal or a pipe), renders the "
        "conversation with the run's chat template and streams each answer. "
        "/reset clears the history, /exit quits.",
    )
    sampling_options(ch, 0.8, 256)
    ch.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    ch.set_defaults(func=cmd_chat)

    se = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    se.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    device_option(se)
    se.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    se.add_argument("--port", type=_number(int, 0, high=65535), default=8000, help="default: 8000 (0: any free port)")
    se.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $DSV4_API_KEY; unset = no key)",
    )
    se.add_argument("--max-batch", type=COUNT, default=8, help="requests decoded together (default: 8)")
    se.add_argument(
        "--max-waiting",
        type=NON_NEGATIVE,
        default=64,
        help="requests that may wait for a row: max-batch + max-waiting are accepted at once, more "
        "get HTTP 503 (default: 64)",
    )
    se.add_argument(
        "--max-context",
        type=COUNT,
        default=None,
        metavar="N",
        help="tokens per request, prompt + output (default: the run's training seq_len, else the model's limit)",
    )
    se.add_argument("--prefill-chunk", type=COUNT, default=2048, help="prompt tokens per forward (default: 2048)")
    se.add_argument("--model-name", default=None, help="the model id clients use (default: the run folder's name)")
    se.add_argument(
        "--default-max-tokens",
        type=COUNT,
        default=256,
        help="chat answer limit when a request gives none (default: 256)",
    )
    se.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    se.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluations of a trained run")
    ev_sub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    rec = ev_sub.add_parser("indexer-recall", help="mass recall of the indexers' top-k against dense attention")
    rec.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    rec.add_argument("--seq-len", type=int, default=1024, help="window length, >= 2 (default: 1024)")
    rec.add_argument("--batches", type=int, default=2, help="validation windows to average over (default: 2)")
    rec.set_defaults(func=cmd_eval)
    bp = ev_sub.add_parser(
        "bpb",
        help="bits per byte of a run on any text, with xz -9 on the same bytes",
        description="Score a run on the text files at PATH with the training run's byte "
        "accounting (dsv4.eval.text_bpb); xz -9 compresses the same bytes.",
    )
    bp.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    bp.add_argument("--data", required=True, metavar="PATH", help="a file, folder or glob (as dsv4 train --data)")
    bp.add_argument("--seq-len", type=int, default=1024, help="window length (default: 1024)")
    bp.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: 4)")
    bp.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score at most N tokens (default: all)")
    bp.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:N, ...")
    bp.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    bp.add_argument("--quiet", action="store_true", help="no progress bars")
    bp.set_defaults(func=cmd_eval_bpb)
    rt = ev_sub.add_parser(
        "retrieval",
        help="synthetic long-context retrieval (passkey, multi-key needles, variable tracking, MQAR) by "
        "context length and needle depth, with a heat map",
    )
    _grid_args(rt, ["passkey", "niah", "vartrack", "mqar"], "retrieval.png")
    rt.set_defaults(func=cmd_eval_retrieval)
    lp = ev_sub.add_parser(
        "loss-vs-position",
        help="mean loss by token position over long documents (the files at PATH joined in order)",
    )
    lp.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    lp.add_argument("--data", required=True, metavar="PATH", help="a file, folder or glob (as dsv4 train --data)")
    lp.add_argument("--seq-len", type=int, default=4096, help="window length (default: 4096)")
    lp.add_argument("--windows", type=int, default=4, help="windows to average over (default: 4)")
    lp.add_argument("--chunk", type=int, default=4096, help="tokens per cached forward (default: 4096)")
    lp.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:N, ...")
    lp.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    lp.add_argument("--plot", default="loss_vs_position.png", metavar="PNG", help="(default: ./loss_vs_position.png)")
    lp.add_argument("--quiet", action="store_true", help="no progress bars")
    lp.set_defaults(func=cmd_eval_loss_vs_position)
    nr = ev_sub.add_parser(
        "needle-recall",
        help="whether each indexer layer's top-k at the question selected the needle, by length and depth",
    )
    _grid_args(nr, ["passkey", "niah"], "needle_recall.png")
    nr.set_defaults(func=cmd_eval_needle_recall)

    ab = sub.add_parser(
        "ablate",
        help="a controlled study at equal active parameters and tokens (sparse, mhc, mtp, muon, engram)",
        description="Train every arm of the study once per seed, evaluate each run, and print mean +- std "
        "with a verdict against twice the standard error (docs/reproductions.md).",
    )
    ab.add_argument(
        "study",
        choices=["sparse", "mhc", "mtp", "muon", "engram"],
        metavar="NAME",
        help="sparse | mhc | mtp | muon | engram",
    )
    ab.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        metavar="M",
        help="wall-clock budget of the whole study (default: the study's documented one)",
    )
    ab.add_argument("--steps", type=int, default=None, help="train every run this many steps (overrides the budget)")
    ab.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S", help="(default: 0 1 2)")
    ab.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    ab.add_argument("--seq-len", type=int, default=256, help="training length (default: 256)")
    ab.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-3; mhc: also 10x it)")
    ab.add_argument("--data", default=None, metavar="PATH", help="corpus (default: the standard library)")
    ab.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens per run (default: 16384)")
    ab.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ab.add_argument("--out", default=None, metavar="DIR", help="(default: runs/ablate_NAME)")
    ab.add_argument("--quiet", action="store_true", help="no progress bars")
    ab.set_defaults(func=cmd_ablate)

    le = ev_sub.add_parser(
        "lm-eval",
        help="any lm-evaluation-harness task against a run (needs the optional extra: pip install -e '.[eval]')",
    )
    le.add_argument("--ckpt", required=True, metavar="RUN_DIR", help=CKPT_HELP)
    le.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="lm-eval task names")
    le.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra task YAML files")
    le.add_argument("--limit", type=int, default=None, metavar="N", help="at most N documents per task")
    le.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="(default: the task's)")
    le.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: 8)")
    le.add_argument("--max-length", type=int, default=4096, help="longest sequence scored (default: 4096)")
    le.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:N, ...")
    le.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    le.set_defaults(func=cmd_eval_lm_eval)

    rep = sub.add_parser("report", help="plots and a markdown summary of a run from RUN_DIR/metrics.jsonl")
    rep.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    rep.add_argument("--ckpt", metavar="RUN_DIR", help="the same, as the other commands take it")
    rep.set_defaults(func=cmd_report)
    return p


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if not isinstance(e, FileNotFoundError) or e.filename is None else f"file not found: {e.filename}"


def _stdout_to_devnull() -> None:
    """After a BrokenPipeError: point stdout at devnull so the exit-time flush cannot fail again (the python
    docs' "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # an in-memory stdout has no file descriptor
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: one `dsv4: warning: ...` line, no source line."""
    print(f"dsv4: warning: {' '.join(str(message).split())}", file=file or sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import warnings

    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # the reader went away: `dsv4 info ... | head -3`
        _stdout_to_devnull()
        return SIGPIPE_STATUS
    except USER_ERRORS as e:
        print(f"dsv4: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"dsv4: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
