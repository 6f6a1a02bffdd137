"""Numbers and durations as a person reads them in a table, a log line or a report."""

from __future__ import annotations


def fmt(value: float | None, spec: str = ".4f", none: str = "-") -> str:
    """`value` in `spec`, or `none` where it is unknown."""
    return none if value is None else format(value, spec)


def count(n: float | None, none: str = "-") -> str:
    """A count in three significant figures with a unit: 28.9k, 3.17M, 1.2B, 4.5T (exact below 1,000)."""
    if n is None:
        return none
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:,.0f}" if n == int(n) else f"{n:.3g}"


def sci(x: float | None, digits: int = 2, none: str = "-") -> str:
    """A large figure in short scientific notation: 3e8, 1.5e9, 2.1e18."""
    if x is None:
        return none
    mantissa, _, exponent = f"{x:.{digits}g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def format_duration(seconds: float) -> str:
    """A duration in the unit a person would say it in: 45 s, 4.8 min, 2.5 h, 204.3 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 3 * 86400 else f"{seconds / 86400:.1f} days"
