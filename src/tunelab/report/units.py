"""Numbers as people read them in a report: bytes in KiB/MiB/GiB, seconds as 1m 55s, parameters as 2.44M.

Every formatter takes None (a value the run did not record) and prints an em dash, so a table never shows
"None" or crashes on a run that lacks a field.
"""

from __future__ import annotations

MISSING = "—"
GIB = 1024**3


def human_bytes(n: float | None) -> str:
    """Binary units (1 GiB = 1024^3 bytes), the units of torch.cuda memory stats and of `du -h`."""
    if n is None:
        return MISSING
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    minutes, s = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def human_count(n: float | None) -> str:
    """Parameter and token counts: 332.5K, 2.44M, 1.24B."""
    if n is None:
        return MISSING
    value = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.2f}{unit}" if scaled < 10 else f"{scaled:.1f}{unit}"
    return f"{value:.0f}"


def number(value, digits: int = 4) -> str:
    """A metric: ints with thousands separators, floats with `digits` decimals (or 4 significant figures
    when very large or small, where fixed decimals would print 0.0000)."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:,.{digits}f}"
    return f"{value:.4g}"


def percent(value: float | None, digits: int = 2) -> str:
    """value is already a percentage (0-100)."""
    return MISSING if value is None else f"{value:.{digits}f}%"
