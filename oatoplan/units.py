"""Unit conversions, in one place. Names carry units everywhere else (`budget_bytes`, `t_gpu_us`)."""

import math
import re

from .errors import OatoError

BYTES_PER_MIB = 1024 * 1024
BYTES_PER_GIB = 1024 * BYTES_PER_MIB

_SIZE_SUFFIX_BYTES = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
# No GPU or host has a petabyte: a larger size is a typo (and 1 followed by 400 zeros is no float at all).
MAX_SIZE_BYTES = 1 << 50


def parse_size_bytes(text: str) -> int:
    """'6GiB', '5.5 GB', '4096MiB', '123' -> bytes. GiB/MiB are powers of 1024, GB/MB of 1000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_SUFFIX_BYTES:
        raise OatoError(f"size {_quoted(text)} is not understood: write a number with an optional unit, e.g. 6GiB, "
                        f"5.5GB, 4096MiB")
    n_bytes = float(match.group(1)) * _SIZE_SUFFIX_BYTES[match.group(2).lower()]
    if not math.isfinite(n_bytes) or n_bytes > MAX_SIZE_BYTES:
        raise OatoError(f"size {_quoted(text)} is more than 1 PiB: write a real memory size, e.g. 6GiB")
    if 0 < n_bytes < 1:
        raise OatoError(f"size {_quoted(text)} is less than one byte: give a unit, e.g. {match.group(1)}GiB")
    return int(n_bytes)


def _quoted(text: str, keep: int = 24) -> str:
    """`text` quoted for a one-line message; a 400-character argument shown by its ends and its length."""
    return repr(text) if len(text) <= 2 * keep else f"{text[:keep] + '...' + text[-keep:]!r} ({len(text)} characters)"


def mib(n_bytes: float) -> float:
    return n_bytes / BYTES_PER_MIB


def format_bytes(n_bytes: float) -> str:
    """Human-readable size with binary units: 1536 -> '1.5 KiB'."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_flops(flops: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"
