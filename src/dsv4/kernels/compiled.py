"""Opt-in torch.compile for small, fusable hot functions (mHC maps: many tiny elementwise ops).

`enable()` switches every function wrapped with `@fusable` to a torch.compile'd twin; the eager
function stays the reference (tests compare the two, forward and backward). Off by default: compiling
costs tens of seconds, which pays off in training runs, not in short scripts.
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


def fusable(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if not _ENABLED:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
