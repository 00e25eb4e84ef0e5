"""How the lab writes a number in a table or a sentence.

The report, the verdicts and the printed table share this one function.
"""

import math
from typing import Any


def fmt(x: Any, digits: int = 3, missing: str = "–") -> str:
    """`x` as text, a float with `digits` significant digits.

    An int or a string is written as is. None and NaN become `missing`. +inf becomes ∞.
    """
    if x is None:
        return missing
    if isinstance(x, float):
        if math.isnan(x) or x == -math.inf:
            return missing
        if x == math.inf:
            return "∞"
        return f"{x:.{digits}g}"
    return str(x)
