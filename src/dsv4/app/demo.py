"""`dsv4 demo`: a randomly initialised small model, one forward pass and a short generation.

Nothing here is trained: the loss of a random model is about ln(vocab) and the generated ids are
noise. The point is to show the whole model running end to end on a CPU in a few seconds.
Generation is the reference generator (dsv4.infer.reference): it re-runs the full forward for every new
token (no KV cache), so it is slow by design.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from dsv4.app.info import human
from dsv4.config import ModelConfig
from dsv4.flops import count_params
from dsv4.infer.reference import generate


def run_demo(
    preset: str = "tiny",
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 64,
    prompt_len: int = 8,
    new_tokens: int = 16,
    temperature: float = 0.0,
    print_fn=print,
) -> dict:
    from dsv4.model import build_model

    cfg = ModelConfig.preset(preset)
    torch.manual_seed(seed)
    pc = count_params(cfg)
    print_fn(
        f"model: preset {preset!r}, {cfg.num_hidden_layers} layers {cfg.layer_kinds}, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}"
    )
    print_fn(
        f"params: {pc['total']:,} ({human(pc['total'])}) total, {pc['active']:,} ({human(pc['active'])}) "
        f"active per token; MTP block +{pc['mtp']:,}"
    )
    t0 = time.perf_counter()
    model = build_model(cfg).eval()
    print_fn(f"built and randomly initialised in {time.perf_counter() - t0:.2f}s (seed {seed})")

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, return_mtp=cfg.num_nextn_predict_layers > 0)
    dt = time.perf_counter() - t0
    v = cfg.vocab_size
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1)).item()
    print_fn(f"forward: input_ids {tuple(ids.shape)} -> logits {tuple(out.logits.shape)} in {dt:.2f}s")
    for k, ml in enumerate(out.mtp_logits, start=1):
        print_fn(f"  mtp depth {k}: logits {tuple(ml.shape)} (position i predicts token i+{k + 1})")
    print_fn(f"  next-token loss of the random model: {loss:.3f} nats (ln(vocab) = {math.log(v):.3f})")

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, v, (1, prompt_len), generator=gen)
    t0 = time.perf_counter()
    new = generate(model, prompt[0].tolist(), new_tokens, temperature, 1.0, stop_at_eos=False, generator=gen)
    dt = time.perf_counter() - t0
    mode = "greedy" if temperature <= 0 else f"sampled at temperature {temperature}"
    print_fn(f"generate ({mode}, no KV cache): prompt {prompt[0].tolist()}")
    print_fn(f"  new ids: {new}")
    print_fn(
        f"  {new_tokens} tokens in {dt:.2f}s = {new_tokens / max(dt, 1e-9):.1f} tokens/s "
        "(random weights: the ids are meaningless)"
    )
    return {
        "loss": loss,
        "logits_shape": tuple(out.logits.shape),
        "generated": new,
        "params": pc,
    }
