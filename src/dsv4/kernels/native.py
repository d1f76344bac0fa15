"""Optional C++ kernels, built on first use with torch.utils.cpp_extension (gcc + ninja, ~1 min once;
cached per source and CPU under ~/.cache/torch_extensions).

`ext()` returns the compiled module or None: when the build fails (no compiler), when DSV4_NATIVE=0 is
set, or on non-x86/ARM oddities, callers fall back to their PyTorch twins, which stay the reference
(tests compare the two). Kernels: csrc/sparse_attention.cpp (inference forward of the V4 core attention,
the indexer's top-k, decode attention) and csrc/mxfp4.cpp (products with MXFP4 weights read from their
packed codes).
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

_SRCS = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_EXT = None
_TRIED = False


def _cpu_tag() -> str:
    """Source + CPU feature hash: a build made with -march=native is never loaded on another CPU."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    src = b"".join(p.read_bytes() for p in _SRCS)
    return hashlib.sha1(src + flags.encode() + torch.__version__.encode()).hexdigest()[:12]


def enabled() -> bool:
    return os.environ.get("DSV4_NATIVE", "1") != "0"


def ext():
    """The compiled extension, or None (built once per process; a failed build warns once)."""
    global _EXT, _TRIED
    if _TRIED or not enabled():
        return _EXT if enabled() else None
    _TRIED = True
    try:
        from torch.utils.cpp_extension import load

        lib = Path(torch.__file__).parent / "lib"
        gomp = sorted(glob.glob(str(lib / "libgomp*.so*")))  # torch's own OpenMP runtime: one thread pool
        ldflags = [f"-L{lib}", f"-l:{Path(gomp[0]).name}", f"-Wl,-rpath,{lib}"] if gomp else ["-fopenmp"]
        _EXT = load(
            name=f"dsv4_native_{_cpu_tag()}",
            sources=[str(p) for p in _SRCS],
            verbose=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=ldflags,
        )
    except Exception as e:
        warnings.warn(
            f"dsv4: C++ kernels unavailable, using the PyTorch ones ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
            stacklevel=2,
        )
        _EXT = None
    return _EXT
