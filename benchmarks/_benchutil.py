"""Size settings shared by the benchmark files and ratios.py (no pytest hooks here)."""

import os

import pytest

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_count(text, what, *, binary=True):
    """``"4K"`` -> 4096 (or 4000 with ``binary=False``); UsageError naming ``what`` otherwise."""
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = clean[-1:] if clean[-1:].isalpha() else ""
    if unit not in _SUFFIX:
        raise pytest.UsageError(f"{what}: cannot read {text!r} (a number with an optional K, M or G)")
    scale = _SUFFIX[unit] if binary else {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit]
    try:
        value = int(float(clean.removesuffix(unit)) * scale)
    except ValueError:
        raise pytest.UsageError(f"{what}: cannot read {text!r} (a number with an optional K, M or G)") from None
    if value <= 0:
        raise pytest.UsageError(f"{what}: {text!r} must be positive")
    return value


def counts_from_env(name, default, *, binary=True):
    """The comma-separated counts of environment variable ``name`` (else ``default``)."""
    text = os.environ.get(name, "").strip() or default
    return [parse_count(part, name, binary=binary) for part in text.split(",") if part.strip()]


def size_label(nbytes):
    """``4096`` -> ``"4KiB"``: stable test ids and group names."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"
