"""`dsv4 eval retrieval`: synthetic long-context retrieval, generated offline from a run's tokenizer.

Every prompt is a haystack of one repeated filler paragraph (RULER's repeated-sentence haystack: it holds
no digits) with needles inserted at paragraph boundaries, then a question; the answer follows and is
scored teacher-forced: a sample is right when the model's greedy choice at every answer token is that
token (dsv4.eval.cached.greedy_matches, the cached chunked forward). Tasks:
- passkey: one needle "The pass key is N", asked at the end;
- niah: multi-key needle in a haystack, the queried key-value needle at the stated depth and three
  distractor needles (other keys, other values) at random depths;
- vartrack: variable tracking, "VAR A = N" at the stated depth and a chain "VAR B = VAR A", ... after it;
  the question asks the last variable's value;
- mqar: multi-query associative recall, a block of key-value pairs at the stated depth, then every key
  asked in turn (the score is the fraction of its answers right).
The depth d places the queried needle after round(d * P) of the P filler paragraphs. Values are distinct
random numbers, so the queried value stands exactly once before its answer (tests/test_eval_long.py).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4.eval.cached import greedy_matches
from dsv4.eval.plots import heat_maps

TASKS = ("passkey", "niah", "vartrack", "mqar")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "saddle", "tunnel")
VARS = ("QX", "RB", "TM", "WD", "ZK", "HP", "LN", "VC")


@dataclass
class Sample:
    """One prompt: ids = haystack with needles + question + answers; spans are [start, end) token ranges."""

    task: str
    length: int  # the requested context length in tokens
    depth: float  # where the queried needle stands, in [0, 1]
    ids: list[int]
    answers: list[tuple[int, int]]  # the token spans scored (mqar: one per query)
    needle: tuple[int, int]  # the queried needle's token span
    value: str  # the queried value (mqar: the first pair's)
    extra: dict = field(default_factory=dict)


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text).ids


def _needles(task: str, rng: random.Random) -> tuple[list[str], int, str, list[tuple[str, str]]]:
    """(needle texts, index of the queried one, queried value, [(question, answer)] in order)."""
    if task == "passkey":
        v = str(rng.randrange(10000, 100000))
        return (
            [f" The pass key is {v}. Remember it. {v} is the pass key."],
            0,
            v,
            [(" What is the pass key? The pass key is", f" {v}.")],
        )
    if task == "niah":
        keys = rng.sample(WORDS, 4)
        vals = [str(x) for x in rng.sample(range(1000000, 10000000), 4)]
        texts = [f" One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
        q = f" What is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:"
        return texts, 0, vals[0], [(q, f" {vals[0]}.")]
    if task == "vartrack":
        names = rng.sample(VARS, 4)
        v = str(rng.randrange(10000, 100000))
        texts = [f" VAR {names[0]} = {v}."] + [f" VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        return texts, 0, v, [(f" What is the value of VAR {names[-1]}? VAR {names[-1]} =", f" {v}.")]
    if task == "mqar":
        keys = rng.sample(WORDS, 6)
        vals = [str(x) for x in rng.sample(range(100, 1000), 6)]
        block = " Remember these pairs:" + "".join(f" {k} {v}," for k, v in zip(keys, vals))
        order = rng.sample(range(6), 6)
        return [block], 0, vals[0], [(f" {keys[i]}", f" {vals[i]},") for i in order]
    raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")


def _slots(task: str, n_needles: int, n_para: int, depth: float, rng: random.Random) -> list[int]:
    """The paragraph index each needle stands before: the queried one (first) after round(depth * n_para)."""
    at = round(depth * n_para)
    if task == "vartrack":  # the chain's later hops after the first assignment, in order
        return [at] + sorted(rng.randint(at, n_para) for _ in range(n_needles - 1))
    return [at] + [rng.randint(0, n_para) for _ in range(n_needles - 1)]  # distractors anywhere


def document(task: str, paragraphs: int, seed: int) -> str:
    """A training document of the task: the same layout as make_sample's prompts (needles in `paragraphs`
    filler paragraphs at a random depth, then the questions and their answers), as text; its values come
    from a different random stream from the evaluation prompts' (seeded "doc/...")."""
    rng = random.Random(f"doc/{task}/{paragraphs}/{seed}")
    texts, _, _, qa = _needles(task, rng)
    slots = _slots(task, len(texts), paragraphs, rng.random(), rng)
    parts: list[str] = []
    for p in range(paragraphs + 1):
        parts += [t for t, s in zip(texts, slots) if s == p]
        if p < paragraphs:
            parts.append(FILLER)
    return "".join(parts + [q + a for q, a in qa]).lstrip()


def make_sample(task: str, tok, length: int, depth: float, seed: int) -> Sample:
    """A prompt of about `length` tokens (never more) with the queried needle at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1]")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    texts, qi, value, qa = _needles(task, rng)
    needles = [_enc(tok, t) for t in texts]
    qa_ids = [(_enc(tok, q), _enc(tok, a)) for q, a in qa]
    para = _enc(tok, FILLER)
    room = length - sum(map(len, needles)) - sum(len(q) + len(a) for q, a in qa_ids)
    n_para = room // len(para)
    if n_para < 1:
        raise ValueError(f"length={length} is too short for a {task} prompt ({length - room} tokens of needles)")
    slots = _slots(task, len(needles), n_para, depth, rng)
    ids: list[int] = []
    needle = (0, 0)
    for p in range(n_para + 1):
        for j in [j for j, s in enumerate(slots) if s == p]:
            if j == qi:
                needle = (len(ids), len(ids) + len(needles[j]))
            ids += needles[j]
        if p < n_para:
            ids += para
    spans = []
    for q, a in qa_ids:
        ids += q
        spans.append((len(ids), len(ids) + len(a)))
        ids += a
    return Sample(task, length, depth, ids, spans, needle, value, {"paragraphs": n_para})


def score(model, s: Sample, chunk: int = 4096) -> float:
    """Fraction of the sample's answers the model gets exactly right (teacher-forced greedy)."""
    hits = greedy_matches(model, torch.tensor([s.ids]), s.answers, chunk)
    return sum(hits) / len(hits)


def run_retrieval(
    run: str | Path,
    tasks=TASKS,
    lengths=(1024, 4096, 16384),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 2,
    chunk: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """{"results": {task: {length: {depth: accuracy}}}, ...} of the run's model, `samples` prompts per cell."""
    from tqdm.auto import tqdm

    model, tok = load_for_grid(run, tasks, samples, lengths, depths, device)
    cells = [(t, n, d) for t in tasks for n in sorted(lengths) for d in sorted(depths)]
    results: dict = {t: {} for t in tasks}
    bar = tqdm(total=len(cells) * samples, unit="prompt", desc="retrieval", disable=not progress)
    for t, n, d in cells:
        accs = []
        for i in range(samples):
            accs.append(score(model, make_sample(t, tok, n, d, i), chunk))
            bar.update(1)
        results[t].setdefault(str(n), {})[f"{d:g}"] = sum(accs) / len(accs)
    bar.close()
    return dict(run=str(run), samples=samples, lengths=sorted(lengths), depths=sorted(depths), results=results)


def format_table(res: dict) -> str:
    depths = [f"{d:g}" for d in res["depths"]]
    out = []
    for task, per in res["results"].items():
        out.append(f"{task}: accuracy by context length (rows) and needle depth (columns)")
        out.append(f"  {'length':>7}  " + "  ".join(f"{d:>5}" for d in depths) + "   mean")
        for n, row in per.items():
            vals = [row[d] for d in depths]
            out.append(f"  {int(n):>7}  " + "  ".join(f"{v:5.2f}" for v in vals) + f"  {sum(vals) / len(vals):5.2f}")
    return "\n".join(out)


def plot_heatmaps(res: dict, path: str | Path) -> Path | None:
    """One depth x length heat map per task (the long-context literature's picture)."""
    return heat_maps(res["results"], res["depths"], path, "accuracy")


def load_for_grid(run: str | Path, tasks, samples: int, lengths, depths, device: str):
    """(model, tokenizer) of the run, after the one check of a (tasks, lengths, depths, samples) grid."""
    from dsv4.run import load_run

    bad = [t for t in tasks if t not in TASKS]
    if bad or samples < 1 or not lengths or not depths:
        raise ValueError(f"tasks {bad} unknown (choose from {TASKS}), or no lengths / depths / samples")
    model, tok = load_run(run, device=device)
    limit = model.cfg.max_position_embeddings
    if max(lengths) > limit:
        raise ValueError(f"length {max(lengths)} exceeds the model's max_position_embeddings ({limit})")
    return model, tok


def cmd_eval_retrieval(args) -> int:
    res = run_retrieval(
        args.ckpt,
        tasks=args.tasks,
        lengths=args.lengths,
        depths=args.depths,
        samples=args.samples,
        chunk=args.chunk,
        device=args.device,
        progress=not args.quiet,
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        print(f"plot: {plot_heatmaps(res, args.plot)}")
    return 0
