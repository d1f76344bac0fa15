"""Opt-in torch.compile for small, fusable hot functions (mHC maps: many tiny elementwise ops).

`enable()` switches every function wrapped with `@fusable` to a torch.compile'd twin; the eager
function stays the reference (tests compare the two, forward and backward). On CPU the twin is
compiled with dsv4.kernels.inductor.cpu_backend, whose few-rows rule turns the mHC stream mixing
(4 x 4 maps applied to every token's 4 streams, forward and backward) into fused reductions instead of
thousands of tiny BLAS calls. Off by default: compiling costs tens of seconds, which pays off in
training runs, not in short scripts.
"""

from __future__ import annotations

import functools

import torch

_ENABLED = False


def enable(flag: bool = True) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED


def _on_cpu(args) -> bool:
    return {a.device.type for a in args if isinstance(a, torch.Tensor)} == {"cpu"}


def fusable(fn):
    compiled = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _ENABLED:
            return fn(*args, **kwargs)
        cpu = _on_cpu(args)
        if cpu not in compiled:  # one twin per kind of device: CPU graphs get the few-rows rule
            from dsv4.kernels.inductor import cpu_backend

            compiled[cpu] = torch.compile(fn, dynamic=False, backend=cpu_backend if cpu else "inductor")
        return compiled[cpu](*args, **kwargs)

    wrapper.eager = fn
    return wrapper
