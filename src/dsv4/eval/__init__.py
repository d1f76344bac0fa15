"""Evaluation: bits per byte, FLOPs/MFU and measured machine peaks (bpb.py); run reports and plots (report.py)."""

from dsv4.eval.bpb import (
    bits_per_byte,
    flops_breakdown,
    flops_per_token,
    mbu,
    measure_copy_bandwidth,
    measure_matmul_peak,
    mfu,
    xz_bits_per_byte,
)

__all__ = [
    "bits_per_byte",
    "flops_breakdown",
    "flops_per_token",
    "mbu",
    "measure_copy_bandwidth",
    "measure_matmul_peak",
    "mfu",
    "write_report",
    "xz_bits_per_byte",
]


def __getattr__(name):  # report.py imports matplotlib: load it only when asked for
    if name == "write_report":
        from dsv4.eval.report import write_report

        return write_report
    raise AttributeError(name)
