"""The one T/G/M/k number formatter: reports, the bench's tables and log lines, and `harness models` / `ladder`
all print counts through it (no pandas import, so the CLI's model table stays quick)."""
from __future__ import annotations

import math


def human(value, unit: str = "", precision: str = ".3g") -> str:
    """12300 -> 12.3k, 4.5e12 -> 4.5T (``precision`` formats the scaled value: ".2f" gives 12.30k); values
    under 1000 print whole; None, NaN and inf print "-"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:{precision}}{suffix}{unit}"
    return f"{value:.0f}{unit}"
