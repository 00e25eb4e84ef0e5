"""Which lab op kind each instruction of a compiled program is, read from its HLO text.

Most instructions take their kind from their opcode. A fusion or a custom call takes it from its
called computations. A fusion with a convolution is conv. A fusion with a dot is gemm. A custom
call's target counts too: a cuBLAS gemm, a cuDNN convolution, fused attention. Some instructions
are no op of the lab. Copies and control-flow bookkeeping are examples. They are OTHER. The
trace reader (batching.measure.profiling) sums traced time by these kinds.
"""

import dataclasses
import re

OTHER = "other"
COLLECTIVE = "collective"

# Opcodes that are no lab op: bookkeeping, layout copies, host transfer.
_OTHER_OPS = {
    "copy", "copy-start", "copy-done", "parameter", "tuple", "get-tuple-element", "bitcast",
    "constant", "after-all", "opt-barrier", "add-dependency", "domain", "partition-id",
    "replica-id", "send", "send-done", "recv", "recv-done", "infeed", "outfeed", "iota",
}  # fmt: skip
# Control flow: its body's instructions are traced one by one, so its own event is skipped.
_CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_COLLECTIVE_OPS = {
    "all-reduce", "all-reduce-start", "all-reduce-done", "all-gather", "all-gather-start",
    "all-gather-done", "all-to-all", "reduce-scatter", "collective-permute",
    "collective-permute-start", "collective-permute-done", "ragged-all-to-all",
}  # fmt: skip
_GATHER_SCATTER_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}
_REDUCTION_OPS = {"reduce", "reduce-window", "select-and-scatter", "sort"}
# Custom-call targets of the vendor libraries (XLA:GPU): cuBLAS / cuBLASLt GEMMs, cuDNN
# convolutions and fused attention.
_CUSTOM_CALL_KINDS = (
    ("cudnn$conv", "conv"),
    ("cudnn$fmha", "attention"),
    ("cudnn$flash", "attention"),
    ("cublas", "gemm"),
    ("topk", "reduction"),
    ("gemm", "gemm"),
    ("matmul", "gemm"),
)
# When a fusion holds several kinds, the one that dominates its time names it.
_PRIORITY = (
    "conv",
    "attention",
    "gemm",
    "moe_dispatch_combine",
    "ragged_gemm",
    "gather_scatter",
    "reduction",
    COLLECTIVE,
    "elementwise",
)
# A dot with batch dimensions (scores q·kᵀ and probs·v, batched over sequences and heads)
# whose jax name stack says attention (a model's `attention` named scope or `attend`
# function) is attention; other dots are GEMMs, the Q/K/V and output projections inside that
# scope too (x·W has no batch dimensions).
_ATTENTION_NAME = re.compile(r"attention|attend", re.IGNORECASE)

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][\w\-]*)\("
)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction as the readers of a program need it."""

    name: str
    type: str  # its result type, "f32[8,64]{1,0}" or a tuple of them
    opcode: str
    calls: tuple[str, ...]
    target: str
    op_name: str
    operands: tuple[str, ...]
    batched: bool  # a dot with batch dimensions (an einsum over batch or heads)
    rest: str  # the text after "opcode(": operands, then attributes
    root: bool  # its computation's ROOT


def _operands(rest: str) -> tuple[str, ...]:
    """The instruction names in an operand list `a, %b, f32[2] %c), attrs...`."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return tuple(re.findall(r"%([\w.\-]+)", rest[:i]))
    return ()


def parse(hlo_text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """Parses HLO text into its computations.

    Returns {computation name: {instruction name: instruction}}. It also returns the entry
    computation's name.
    """
    comps: dict[str, dict[str, Instruction]] = {}
    current, entry = None, ""
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("(", 1)[0]:
            current = comps.setdefault(m["name"], {})
            entry = m["name"] if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        calls = _CALLS.findall(line)
        for group in _BRANCHES.findall(line):
            calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        target = _TARGET.search(line)
        op_name = _OP_NAME.search(line)
        rest = line[m.end() :]
        current[m["name"]] = Instruction(
            m["name"],
            m["type"],
            m["op"],
            tuple(calls),
            target[1] if target else "",
            op_name[1] if op_name else "",
            _operands(rest),
            "lhs_batch_dims={" in line,
            rest,
            line.lstrip().startswith("ROOT"),
        )
    return comps, entry


def module_name(hlo_text: str) -> str:
    """The program's name, as the trace's `hlo_module` stat gives it ("jit_forward")."""
    m = _MODULE.search(hlo_text)
    return m[1] if m else ""


def instruction_kinds(
    hlo_text: str, parsed: tuple[dict[str, dict[str, Instruction]], str] | None = None
) -> dict[str, str]:
    """Maps every instruction of a compiled program to its kind.

    A kind is a lab op kind (batching.workloads.ops.KINDS), COLLECTIVE or OTHER. Control flow
    maps to "": while, conditional and call are not ops. A fusion holding several kinds takes
    the first in _PRIORITY.
    """
    comps, _ = parsed or parse(hlo_text)
    memo: dict[str, set[str]] = {}

    def own_kind(ins: Instruction) -> str:
        op = ins.opcode
        if op == "custom-call":
            target = ins.target.lower()
            return next((k for key, k in _CUSTOM_CALL_KINDS if key in target), OTHER)
        if op == "convolution":
            return "conv"
        if op == "ragged-dot" or (op == "dot" and "ragged_dot" in ins.op_name):
            # XLA:CPU rewrites a ragged dot into dense dots; jax's name stack keeps the op.
            return "ragged_gemm"
        if op == "dot":
            attention = ins.batched and _ATTENTION_NAME.search(ins.op_name)
            return "attention" if attention else "gemm"
        if op in _GATHER_SCATTER_OPS:
            return "gather_scatter"
        if op in _REDUCTION_OPS:
            return "reduction"
        if op in _COLLECTIVE_OPS:
            return COLLECTIVE
        if op in _OTHER_OPS:
            return OTHER
        return "elementwise"

    def contents(comp: str) -> set[str]:
        if comp not in memo:
            memo[comp] = set()  # a cycle (never in valid HLO) ends here
            kinds = set()
            for ins in comps.get(comp, {}).values():
                kinds |= kinds_of(ins)
            memo[comp] = kinds
        return memo[comp]

    def kinds_of(ins: Instruction) -> set[str]:
        if ins.opcode == "fusion" or (ins.opcode == "custom-call" and ins.calls):
            inner = set().union(*(contents(c) for c in ins.calls)) if ins.calls else set()
            if ins.opcode == "custom-call":
                inner.add(own_kind(ins))
            return inner - {OTHER} or {OTHER}
        if ins.opcode in _CONTROL_OPS:
            return set()
        return {own_kind(ins)}

    out = {}
    for instructions in comps.values():
        for name, ins in instructions.items():
            kinds = kinds_of(ins)
            out[name] = next((k for k in _PRIORITY if k in kinds), OTHER if kinds else "")
    return out


def _tokens(name: str) -> tuple[str, ...]:
    """A module path's words and indices, in lower case.

    The path "stages.0.0.conv1" gives stages, 0, 0, conv, 1. The parameter name
    "state__stages___0__0___conv1____kernel___value.1" holds the same run of tokens.
    """
    return tuple(re.findall(r"[A-Za-z]+|\d+", name.lower()))


def _within(part: tuple[str, ...], whole: tuple[str, ...]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def lab_op_names(hlo_text: str, lab_ops: list[tuple[str, str]]) -> dict[str, str]:
    """Maps entry instructions to the lab op (name, kind) they run.

    The parameters an instruction reads name its op. XLA keeps a Flax module's parameter path in
    the entry parameter's name. The op "stages.0.0.conv1" reads
    "state__stages___0__0___conv1____kernel___value.1", for example. An instruction maps when
    its kind is the op's kind. Exactly one lab op's path must be among the parameters it reads.
    So a fusion of several convolutions maps to none.
    """
    comps, entry = parse(hlo_text)
    if not entry:
        return {}
    kinds = instruction_kinds(hlo_text)
    instructions = comps[entry]
    params = {n: _tokens(n) for n, ins in instructions.items() if ins.opcode == "parameter"}
    out = {}
    for name, ins in instructions.items():
        read = [params[o] for o in ins.operands if o in params]
        hits = {
            op
            for op, kind in lab_ops
            if kind == kinds.get(name) and any(_within(_tokens(op), p) for p in read)
        }
        if len(hits) == 1:
            out[name] = hits.pop()
    return out
