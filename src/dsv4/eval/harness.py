"""lm-evaluation-harness adapter: a dsv4 run as an `lm_eval` model (registered as "dsv4"), so any lm-eval task
runs against it (`dsv4 eval lm-eval --ckpt RUN --tasks ...`, or `lm_eval.simple_evaluate(model=DSV4LM(...))`).

lm_eval is an optional extra (`pip install -e '.[eval]'`); this module imports it, nothing else in dsv4 does.

- loglikelihood: the harness's (context, continuation) token pairs, sorted by length and scored in right-padded
  batches of one forward each (a causal model's real tokens never see the padding after them, and every
  dsv4 layer routes and mixes per token, so each row equals its own unpadded forward); a sequence longer
  than `max_length` keeps its last max_length tokens, as the harness's own models do.
- loglikelihood_rolling: the document in disjoint windows of max_length tokens (lm_eval's rolling windows,
  the end-of-text token first), summed.
- generate_until: the cached engine (dsv4.infer.engine.Engine), whole batches at once, greedy unless the task
  asks to sample; the output stops at the first of the task's `until` strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm


@register_model("dsv4")
class DSV4LM(TemplateLM):
    """pretrained: a dsv4 run directory, checkpoint or converted model directory (dsv4.run.load_run)."""

    def __init__(
        self, pretrained: str, device: str = "cpu", batch_size: int | str = 8, max_length: int = 4096, **_: object
    ) -> None:
        super().__init__()
        from dsv4.run import load_run

        self.model, self.tokenizer = load_run(pretrained, device=device)
        self.model.eval()
        self._device = next(self.model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = min(int(max_length), self.model.cfg.max_position_embeddings)
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 2")

    @property
    def eot_token_id(self) -> int:
        eos = self.model.cfg.eos_token_id
        return 0 if eos is None else int(eos)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(sum of log p(continuation), whether it is the greedy one)]."""
        rows = []
        for ctx, cont in pairs:
            whole = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((whole[:-1], min(len(cont), len(whole) - 1)))  # a too long continuation: its end
        width = max(len(r[0]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (inp, _) in enumerate(rows):
            ids[i, : len(inp)] = torch.tensor(inp)
        logp = self.model(ids.to(self._device)).logits.float().log_softmax(-1).cpu()
        out = []
        for i, ((_, cont), (inp, n)) in enumerate(zip(pairs, rows)):
            lp = logp[i, len(inp) - n : len(inp)]
            target = torch.tensor(cont[len(cont) - n :])
            out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dsv4 loglikelihood", disable=disable_tqdm)
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            for i, r in zip(chunk, self._score([(requests[i][1], requests[i][2]) for i in chunk])):
                results[i] = r
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="dsv4 rolling loglikelihood", disable=disable_tqdm):
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1)
            pairs = [(None, *make_disjoint_window(w)) for w in windows]
            scores = self._loglikelihood_tokens(pairs, disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dsv4.infer.engine import Engine
        from dsv4.infer.sampling import SamplingParams

        prompts, params = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            n = int(kw.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - n) :]
            prompts.append(ids)
            params.append(
                SamplingParams(
                    max_tokens=n,
                    temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                    seed=0,
                    stop=until,
                )
            )
        eng = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_context=self.max_length)
        out = []
        for k in tqdm(range(0, len(prompts), self.batch_size), desc="dsv4 generate", disable=disable_tqdm):
            done = eng.generate(prompts[k : k + self.batch_size], params[k : k + self.batch_size])
            for req, r in zip(requests[k : k + self.batch_size], done):
                text = self.tok_decode(r.output)
                for stop in req.args[1].get("until") or []:
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", req.args, text)
                out.append(text)
        return out


def run_harness(
    run: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 4096,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict:
    """lm_eval.simple_evaluate of the run on `tasks` (task names, or tasks defined in YAML under include_path)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = DSV4LM(run, device=device, batch_size=batch_size, max_length=max_length)
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0
    )
    return {"results": res["results"], "n-samples": res.get("n-samples", {}), "config": {"run": run, "tasks": tasks}}


def format_results(res: dict) -> str:
    lines = []
    for task, metrics in res["results"].items():
        shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k]
        lines.append(f"{task}: " + ", ".join(shown))
    return "\n".join(lines)


def cmd_eval_lm_eval(args) -> int:
    res = run_harness(
        args.ckpt,
        args.tasks,
        args.include_path,
        args.limit,
        args.batch_size,
        args.max_length,
        args.device,
        args.num_fewshot,
    )
    print(format_results(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0
