"""The house as drawn: imports run with the flow, no cycles, short functions and files,
documented public names, and citations that stand alone. Plain Python over `ast`."""

import ast
import glob
import os
import re

import pytest

from tests.conftest import ROOT

# The flow: config -> run setup -> workloads -> measure -> predict -> outputs, and the run
# (app, sweep, cli) above them. A floor may import itself and the floors listed; `rows` and
# `text` (the row schema, number formatting) are the ground every floor stands on.
GROUND = ("batching.rows", "batching.rows_serving", "batching.summaries", "batching.text")
ALLOWED = {
    "models": ("models",),
    "batching.setup": ("batching.setup", "models", *GROUND),
    "batching.workloads": ("batching.workloads", "batching.setup", "models", *GROUND),
    "batching.measure": (
        "batching.measure",
        "batching.workloads",
        "batching.setup",
        "models",
        *GROUND,
    ),
    # The analysis is handed measured rates (a rate source); of measure it reads the
    # statistics of samples and of passes only, never the timer or the microbenchmarks.
    "batching.predict": (
        "batching.predict",
        "batching.measure.stats",
        "batching.measure.pass_stats",
        "batching.workloads.ops",
        "batching.workloads.collectives",
        "batching.setup",
        "models",
        *GROUND,
    ),
    "batching.outputs": (
        "batching.outputs",
        "batching.predict",
        "batching.measure",
        "batching.workloads.ops",
        "batching.setup",
        *GROUND,
    ),
    # Serving runs a decoder under load; batching.serving writes its rows through outputs.
    "batching.serve": (
        "batching.serve",
        "batching.predict",
        "batching.measure",
        "batching.workloads",
        "batching.setup",
        "models",
        *GROUND,
    ),
    "batching.rows": ("batching.rows_serving",),
    "batching.rows_serving": (),
    "batching.summaries": ("batching.rows",),
    "batching.text": (),
    # A config naming a model from outside the lab finds its family (configs/custom.py).
    "configs": ("configs", "batching.workloads.family", "batching.workloads.registry"),
}
TOP = (
    "batching.app",
    "batching.sweep",
    "batching.cli",
    "batching.api",
    "batching.serving",
    "batching",
)
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def source_files(*folders: str) -> list[str]:
    out = []
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


KNOWN = {module_name(p) for p in source_files("batching", "models", "configs")}


def lab_imports(path: str) -> set[str]:
    """The lab modules `path` imports (batching.*, models.*, configs.*), at any depth."""
    tree = ast.parse(read(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module, not the package's own code.
            subs = {f"{node.module}.{a.name}" for a in node.names} & KNOWN
            names |= subs or {node.module}
    return names & KNOWN


def floor_of(module: str) -> str | None:
    for floor in sorted(ALLOWED, key=len, reverse=True):
        if module == floor or module.startswith(floor + "."):
            return floor
    return None


def allowed(importer: str, imported: str) -> bool:
    if importer in TOP:
        return True
    floor = floor_of(importer)
    if floor is None:
        return True
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[floor])


def test_imports_run_with_the_flow():
    against = [
        f"{module_name(p)} -> {m}"
        for p in source_files("batching", "models", "configs")
        for m in sorted(lab_imports(p))
        if not allowed(module_name(p), m)
    ]
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_every_module_has_a_floor():
    homeless = [
        module_name(p)
        for p in source_files("batching", "models", "configs")
        if module_name(p) not in TOP and floor_of(module_name(p)) is None
    ]
    assert not homeless, homeless


def test_the_rule_can_fail():
    # The checker itself: these would be against the flow.
    assert not allowed("models.decoder", "batching.setup.topology")
    assert not allowed("batching.workloads.mlp", "batching.measure.timing")
    assert not allowed("batching.predict.analysis", "batching.measure.peaks")
    assert not allowed("batching.setup.runs", "batching.predict.claims")
    assert not allowed("batching.outputs.tensorboard", "models.routers")
    assert allowed("batching.predict.knee", "batching.measure.stats")
    assert allowed("batching.app", "batching.outputs.report")


def test_no_import_cycles():
    graph = {module_name(p): lab_imports(p) for p in source_files("batching", "models")}
    # `from batching.x import y` names y as a candidate module too; keep real modules only.
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path, m, d]
            if d not in state and (cycle := visit(d, [*path, m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle)


def code_lines(node: ast.AST) -> int:
    """A function's lines without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    doc = node.body[0] if node.body else None
    is_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    if is_doc and isinstance(doc.value.value, str):
        lines -= doc.end_lineno - doc.lineno + 1
    return lines


@pytest.mark.parametrize("folder", ["batching", "models", "experiments"])
def test_no_function_is_longer_than_a_screen(folder):
    long = [
        f"{os.path.relpath(p, ROOT)}:{n.lineno} {n.name} ({code_lines(n)} lines)"
        for p in source_files(folder)
        for n in ast.walk(ast.parse(read(p)))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and code_lines(n) > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_no_source_file_is_over_400_lines():
    long = [
        f"{os.path.relpath(p, ROOT)} ({n} lines)"
        for p in source_files("batching", "models", "experiments")
        if (n := len(read(p).splitlines())) > MAX_FILE_LINES
    ]
    assert not long, long


def undocumented(path: str) -> list[str]:
    tree = ast.parse(read(path))
    missing = [] if ast.get_docstring(tree) or path.endswith("__init__.py") else ["(module)"]

    def visit(node: ast.AST, prefix: str) -> None:
        for n in node.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if n.name.startswith("_"):
                    continue
                if not ast.get_docstring(n):
                    missing.append(f"{prefix}{n.name}:{n.lineno}")
                if isinstance(n, ast.ClassDef):
                    visit(n, f"{n.name}.")

    visit(tree, "")
    return [f"{os.path.relpath(path, ROOT)} {m}" for m in missing]


def test_public_names_have_docstrings():
    missing = [m for p in source_files("batching", "models") for m in undocumented(p)]
    assert not missing, missing


def test_citations_stand_alone():
    """Code, configs and README cite the paper, datasheet or repository itself, never a
    notes file outside the repository."""
    outside = re.compile(r"ANCHORS|shared/")
    files = source_files("batching", "models", "configs", "experiments", "tests")
    files.append(os.path.join(ROOT, "README.md"))
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    hits = [
        f"{os.path.relpath(p, ROOT)}:{i}"
        for p in files
        if p != os.path.abspath(__file__)
        for i, line in enumerate(read(p).splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits
