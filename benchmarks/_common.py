"""Helpers every benchmark script shares: hardware description, the load other processes put on the
machine during a run, RSS high-water marks, and number formatting."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from pathlib import Path

import torch


def hardware_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        loadavg=load,
        mem_total_gb=mem,
    )


def cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Average number of cores OTHER processes used since construction (or the last `reset`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.busy0, self.self0, self.w0 = cpu_busy_s(), self_cpu_s(), time.perf_counter()

    def other_cores(self) -> float | None:
        busy1, wall = cpu_busy_s(), time.perf_counter() - self.w0
        if self.busy0 is None or busy1 is None or wall <= 0:
            return None
        return max(0.0, (busy1 - self.busy0) - (self_cpu_s() - self.self0)) / wall


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the RSS high-water mark (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim) so a later RSS growth counts every page."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def fmt_tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def fmt_load(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def randomize_(model, seed: int = 0) -> None:
    """Perturb the parameters that start at 0/1 (norms, sinks, ape, mHC gates, router bias), so that checks
    on a random model see them (used by the tests and by gpu_smoke.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ape", "attn_sink", "_base", "_scale")) or "norm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("gate.bias"):
                b.normal_(0, 0.1, generator=g)


def drop_page_cache(directory) -> None:
    """Ask the kernel to forget the cached pages of directory's safetensors files (clean pages: no privilege
    needed), so the next reads of them come from the disk."""
    for f in Path(directory).glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
