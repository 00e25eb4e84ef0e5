"""How the lab writes a number in a table or a sentence: one function for the report, the
verdicts and the printed table."""

import math
from typing import Any


def fmt(x: Any, digits: int = 3, missing: str = "–") -> str:
    """`x` with `digits` significant digits if a float, as is if an int or a string;
    `missing` for None and NaN, ∞ for +inf."""
    if x is None:
        return missing
    if isinstance(x, float):
        if math.isnan(x) or x == -math.inf:
            return missing
        if x == math.inf:
            return "∞"
        return f"{x:.{digits}g}"
    return str(x)
