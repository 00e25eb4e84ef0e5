"""How the code reads, counted: docstring sentence lengths, machine figures in prose, issue
numbers, repeated tolerance literals. The checks in test_house.py use these; run it as a
script to see what to fix:

    python -m tests.house batching models
"""

import ast
import io
import math
import os
import re
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A sentence ends at ".", "!" or "?" followed by a space; pieces under 3 words are labels.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 3

# A measured figure: digits next to a unit of time, bandwidth or FLOP rate.
UNIT = r"(?:ns|µs|us|ms|s|[kMGTP]?B/s|[kMGTP]i?B/s|[kMGTP]?FLOP/s|[kMGTP]?FLOPS|GHz)"
FIGURE = re.compile(r"(?<![\w.])\d[\d.,]*(?:e-?\d+)?\s?" + UNIT + r"(?![\w/])")
# A sentence naming its source may quote a figure: a datasheet, a paper, another project.
SOURCE = re.compile(
    r"datasheet|data sheet|spec|whitepaper|paper|arXiv|github\.com|https?://|nvidia|"
    r"jax-ml|openxla|xla/|maxtext|vllm|mlperf|pyperf|do_bench|criterion|google-benchmark",
    re.I,
)
# Our own issue numbers; another project's (owner/repo#123) is a citation.
ISSUE = re.compile(r"\bissues?\s+#?\d+|(?<![\w/-])#\d{1,4}\b", re.I)

SPEC_FILES = ("batching/setup/specs.py",)


def python_files(*dirs: str) -> list[str]:
    out = []
    for d in dirs:
        if os.path.isfile(os.path.join(ROOT, d)):
            out.append(os.path.join(ROOT, d))
            continue
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            out += [os.path.join(base, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def docstrings(path: str) -> list[tuple[int, str]]:
    """(line, text) of every module, class and function docstring in a file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append((getattr(node, "lineno", 1), doc))
    return out


def comments(path: str) -> list[tuple[int, str]]:
    with open(path) as f:
        tokens = tokenize.generate_tokens(io.StringIO(f.read()).readline)
        return [(t.start[0], t.string.lstrip("# ")) for t in tokens if t.type == tokenize.COMMENT]


def sentences(text: str) -> list[str]:
    """A docstring's sentences, whitespace collapsed; code blocks and pieces under 3 words out."""
    prose = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    flat = " ".join(prose.split())
    return [s for s in SENTENCE_END.split(flat) if len(s.split()) >= MIN_SENTENCE_WORDS]


def sentence_lengths(paths: list[str]) -> list[tuple[str, int, int, str]]:
    """(file, line, words, sentence) over the docstrings of the files."""
    return [
        (rel(p), line, len(s.split()), s)
        for p in paths
        for line, doc in docstrings(p)
        for s in sentences(doc)
    ]


def prose(path: str) -> list[tuple[int, str]]:
    return docstrings(path) + comments(path)


def machine_figures(paths: list[str]) -> list[tuple[str, int, str]]:
    """Prose (docstrings, comments) quoting a figure with a unit, its sentence naming no source."""
    out = []
    for p in paths:
        if rel(p) in SPEC_FILES:
            continue
        for line, text in prose(p):
            for s in SENTENCE_END.split(" ".join(text.split())):
                if FIGURE.search(s) and not SOURCE.search(s):
                    out.append((rel(p), line, s))
    return out


def issue_numbers(paths: list[str]) -> list[tuple[str, int, str]]:
    out = []
    for p in paths:
        with open(p) as f:
            for i, line in enumerate(f, 1):
                if ISSUE.search(line):
                    out.append((rel(p), i, line.strip()))
    return out


def _trivial(value: float) -> bool:
    """0, ±1, 2, 0.5 and powers of ten: arithmetic and unit conversions, not tolerances."""
    if value in (0.0, 1.0, -1.0, 2.0, 0.5):
        return True
    exponent = math.log10(abs(value))
    return abs(exponent - round(exponent)) < 1e-9


def _tolerance_spots(tree: ast.AST) -> list[ast.AST]:
    """Nodes where a literal acts as a threshold: comparisons, defaults, `.get` fallbacks."""
    spots: list[ast.AST] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            spots += list(ast.walk(n))
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defaults = [d for d in (*n.args.defaults, *n.args.kw_defaults) if d is not None]
            spots += [x for d in defaults for x in ast.walk(d)]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get":
            spots += [x for a in n.args[1:2] for x in ast.walk(a)]
    return spots


def repeated_tolerances(paths: list[str]) -> dict[float, list[str]]:
    """Float literals used as thresholds in more than one place: each should be a name."""
    where: dict[float, set[str]] = {}
    for p in paths:
        if not os.path.exists(p):
            continue
        with open(p) as f:
            tree = ast.parse(f.read())
        for x in _tolerance_spots(tree):
            if isinstance(x, ast.Constant) and type(x.value) is float and not _trivial(x.value):
                where.setdefault(x.value, set()).add(f"{rel(p)}:{x.lineno}")
    return {v: sorted(s) for v, s in where.items() if len(s) > 1}


def main(argv: list[str]) -> None:
    paths = python_files(*(argv or ["batching", "models"]))
    lengths = sentence_lengths(paths)
    words = [n for _, _, n, _ in lengths]
    print(
        f"{len(words)} sentences, mean {sum(words) / max(len(words), 1):.1f} words, "
        f"{sum(n > 40 for n in words)} over 40"
    )
    for f, line, n, s in sorted(lengths, key=lambda x: -x[2]):
        if n > 25:
            print(f"  {f}:{line} ({n}) {s[:120]}")
    for f, line, s in machine_figures(paths):
        print(f"figure {f}:{line}: {s[:140]}")
    for f, line, s in issue_numbers(paths):
        print(f"issue {f}:{line}: {s[:140]}")
    for value, spots in repeated_tolerances(paths).items():
        print(f"tolerance {value} written {len(spots)} times: {', '.join(spots[:6])}")


if __name__ == "__main__":
    main(sys.argv[1:])
