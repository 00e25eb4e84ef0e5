"""Experiment configs and benchmarks; `print_json` is the benchmarks' last line."""

import json
from typing import Any


def print_json(result: dict[str, Any], path: str | None = None) -> None:
    """Prints the result as one JSON line and, given a path, writes it there indented."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
