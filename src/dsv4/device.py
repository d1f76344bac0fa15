"""Device names from the command line: `resolve_device("cuda:0")` -> torch.device, or a one-line ValueError
that says why the device cannot be used here (no CUDA device, an index past the last GPU, a bad name)."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The torch.device named by `spec` (default "cpu"), checked to exist on this machine.
    ValueError: "<flag> <spec>: <why>" in one line."""
    if spec is None or isinstance(spec, torch.device):
        dev = torch.device(spec or "cpu")
    else:
        try:
            dev = torch.device(str(spec).strip())
        except RuntimeError:
            raise ValueError(f"{flag} {spec}: not a device name (examples: cpu, cuda, cuda:0)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: no CUDA device on this machine")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{flag} {spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{flag} {spec}: no MPS device on this machine")
        return dev
    try:  # other backends (xpu, ...): usable iff a tensor can be made there
        torch.empty(1, device=dev)
    except Exception:
        raise ValueError(f"{flag} {spec}: no {dev.type} device on this machine") from None
    return dev
