"""Bits per byte and the xz baseline (docs/spec.md section 10); FLOPs, MFU/MBU and machine peaks are in dsv4.flops.

bits per byte (bpb) = sum of nats over the target tokens / (ln 2 * UTF-8 bytes of the target text).
Normalising by bytes rather than tokens makes runs with different tokenizers comparable, and it
puts a language model on the same scale as a general-purpose compressor: ``xz_bits_per_byte`` is
what ``xz -9`` (``lzma.compress(data, preset=9)``, the .xz container, NOT the ``-9e`` extreme
preset) needs for the same bytes, a floor every trained model should beat.
"""

from __future__ import annotations

import lzma
import math

LN2 = math.log(2.0)
XZ_PRESET = 9  # `xz -9`: lzma.compress(data, format=FORMAT_XZ, preset=9); no PRESET_EXTREME


# ------------------------------------------------------------------------------ bpb
def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy in nats over the target tokens -> bits per byte of the target text."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes}: bits per byte needs at least one byte of target text")
    return float(total_nats) / (LN2 * n_bytes)


def xz_bits_per_byte(data: bytes) -> float:
    """Bits per byte of ``xz -9`` on ``data``: 8 * len(lzma.compress(data, preset=9)) / len(data).

    The .xz container (stream header, index, footer: ~60 bytes) is included, as a file written by
    ``xz -9`` would be; it is negligible beyond a few hundred KB. Incompressible data gives a bit
    over 8.
    """
    data = bytes(data)
    if not data:
        raise ValueError("xz_bits_per_byte needs non-empty data")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    return 8.0 * len(packed) / len(data)
