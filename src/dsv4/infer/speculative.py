"""MTP speculative decoding (docs/spec.md section 5; Leviathan et al. 2023 / Chen et al. 2023 acceptance rule).

State of a request: the main cache holds positions 0..L-1, token t_L is sampled but not fed; the MTP
cache holds the positions whose next token is known. One step:
  1. draft: the MTP block catches up on positions up to L-1 (main streams x_i with token t_{i+1}) and
     its last output q gives a draft d ~ q for t_{L+1} (sampled with the request's parameters);
  2. verify: ONE main forward of [t_L, d] at positions L, L+1 gives p_L (for t_{L+1}) and p_{L+1};
  3. accept d with probability min(1, p_L(d) / q(d)), then also emit a bonus token ~ p_{L+1};
     otherwise emit r ~ normalise(max(p_L - q, 0)) and roll the main cache back by one position.
The emitted tokens are distributed exactly as plain sampling from the main model; with temperature 0
(one-hot p and q) this reduces to "accept iff argmax p_L == d", so greedy output is token-identical.
Verification forwards run per request (their positions differ); the gain is largest at batch 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.infer.sampling import probabilities, sample

if TYPE_CHECKING:
    from dsv4.infer.engine import Engine, Event, Request
    from dsv4.model.transformer import ModelOutput


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator) -> tuple[bool, int]:
    """Standard speculative acceptance for one draft token: p, q target / draft distributions [V].
    Returns (accepted, token): the draft itself, or a resample from normalise(max(p - q, 0))."""
    pd, qd = float(p[draft]), float(q[draft])
    if qd <= 0:
        raise ValueError("the draft token has zero draft probability")
    if pd >= qd or float(torch.rand((), generator=gen)) < pd / qd:
        return True, draft
    resid = (p - q).clamp_min(0)
    if float(resid.sum()) <= 0:  # p == q up to rounding: the draft was rejected by a hair
        resid = p
    return False, int(torch.multinomial(resid / resid.sum(), 1, generator=gen))


class MTPSpeculator:
    """Attached to an Engine (Engine(speculative=True)); uses the model's first MTP block."""

    def __init__(self, engine: Engine) -> None:
        if not engine.model.mtp:
            raise ValueError("speculative decoding needs an MTP block (num_nextn_predict_layers >= 1)")
        self.engine = engine
        self.model, self.cache = engine.model, engine.cache
        self.pending_x: dict[int, torch.Tensor] = {}  # request id -> main streams the MTP has not seen

    def _seq(self, req: Request) -> list[int]:
        return req.prompt + req.output

    def _catch_up(self, req: Request, upto: int, logits: bool) -> torch.Tensor | None:
        """Feed the MTP block the positions it has not seen, below `upto` (their next token is known)."""
        xs = self.pending_x.get(req.id)
        assert req.row is not None  # a running request owns a row
        start = int(self.cache.mtp_lengths[req.row])
        n = upto - start
        if xs is None or n <= 0:
            return None
        seq = self._seq(req)
        nxt = torch.tensor([seq[start + 1 : start + 1 + n]], device=self.engine.device)
        out = self.model.mtp_forward(xs[:, :n], nxt, self.cache, rows=[req.row], compute_logits=logits, last_only=True)
        self.pending_x[req.id] = xs[:, n:]
        return out

    def _push_x(self, req: Request, x: torch.Tensor) -> None:
        old = self.pending_x.get(req.id)
        self.pending_x[req.id] = x if old is None or old.shape[1] == 0 else torch.cat([old, x], 1)

    def after_prefill(self, req: Request, chunk: list[int], out: ModelOutput) -> None:
        if req.fed == 0:
            self.pending_x.pop(req.id, None)
        assert out.hidden is not None  # a forward always returns its final streams
        self._push_x(req, out.hidden)
        self._catch_up(req, req.fed + len(chunk) - 1, logits=False)  # the chunk's last next-token is unknown

    def step(self, reqs: list[Request], events: list[Event]) -> None:
        e = self.engine
        for req in reqs:
            assert req.row is not None and req.gen is not None  # a running request; make_request set gen
            length = int(self.cache.lengths[req.row])
            q_out = self._catch_up(req, length, logits=True)
            assert q_out is not None  # the MTP cache is behind the main one (after_prefill leaves it 1 back)
            q_logits = q_out[0, -1].cpu()  # sampled on the CPU
            p = req.params
            q = probabilities(q_logits, p)
            draft = sample(q_logits, p, req.gen)
            if p.temperature > 0 and float(q[draft]) <= 0:  # sampled off the filtered support (cannot happen)
                draft = int(q.argmax())
            out = self.model(
                torch.tensor([[req.pending, draft]], device=self.engine.device), cache=self.cache, rows=[req.row]
            )
            logits = out.logits[0].cpu()
            e.stats["decode_tokens"] += 1
            e.stats["drafted"] += 1
            ok, tok = accept_draft(probabilities(logits[0], p), q, draft, req.gen)
            if ok:
                e.stats["accepted"] += 1
                self._push_x(req, out.hidden)
                new = [draft, sample(logits[1], p, req.gen)]
            else:
                self.cache.rollback([req.row], 1)
                self._push_x(req, out.hidden[:, :1])
                new = [tok]
            req.pending = None
            e.accept(req, new, events)
            if req.finished:
                self.pending_x.pop(req.id, None)


def compare_speculative(model, prompt: list[int], max_tokens: int = 64) -> dict:
    """Greedy generation of max_tokens from one prompt, plain and with MTP drafts (batch 1, after a short
    warm-up of each): acceptance = accepted drafts / drafts, speed-up = speculative tok/s / plain tok/s."""
    import time

    from dsv4.infer.engine import Engine
    from dsv4.infer.sampling import SamplingParams

    out: dict[str, dict] = {}
    for name, spec in (("plain", False), ("mtp", True)):
        Engine(model, max_batch=1, speculative=spec).generate(
            [prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        )
        eng = Engine(model, max_batch=1, speculative=spec)
        t0 = time.perf_counter()
        r = eng.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
        dt = time.perf_counter() - t0
        out[name] = dict(tok_s=len(r.output) / dt, tokens=r.output, stats=dict(eng.stats))
    st = out["mtp"]["stats"]
    return dict(
        acceptance=st["accepted"] / max(st["drafted"], 1),
        speedup=out["mtp"]["tok_s"] / out["plain"]["tok_s"],
        plain_tok_s=out["plain"]["tok_s"],
        mtp_tok_s=out["mtp"]["tok_s"],
        identical=out["plain"]["tokens"] == out["mtp"]["tokens"],
    )
