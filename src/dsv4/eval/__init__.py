"""Evaluation: bits per byte and the xz baseline (bpb.py); run reports and plots (report.py). FLOPs, MFU/MBU
and measured machine peaks are in dsv4.flops."""

from dsv4.eval.bpb import bits_per_byte, xz_bits_per_byte

__all__ = [
    "bits_per_byte",
    "write_report",
    "xz_bits_per_byte",
]


def __getattr__(name):  # report.py imports matplotlib: load it only when asked for
    if name == "write_report":
        from dsv4.eval.report import write_report

        return write_report
    raise AttributeError(name)
