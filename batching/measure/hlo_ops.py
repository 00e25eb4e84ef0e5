"""A call's op list read from its compiled program, in the lab's op vocabulary.

A workload without a hand-written op list still gets a prediction. This module reads the
optimized HLO text of a point and lists every instruction that runs as a kernel. That is a
fusion, a dot, a convolution, a vendor custom call, a reduction, a gather or scatter, a copy.
Each becomes a batching.workloads.ops.Op, priced like a hand-written one.

- The kind comes from batching.measure.hlo_kinds. A copy is an elementwise pass.
- FLOPs: a dot is 2 per multiply-add over its contracting dims. A convolution is 2 per
  multiply-add over its window and its input features per group. Other instructions count
  as XLA's cost analysis counts them: one per output element of an arithmetic op, one per
  input element of a reduction.
- Bytes are counted at the kernel's boundary: each operand once, and the output. An operand
  read only through a slice counts the slice. An in-place update writes only its update.
- Weight bytes are the bytes of the operands that come from the call's weight arguments.
- A while loop's body counts its known trip count times. A conditional counts its costliest
  branch. Collectives are left to the collective model (batching.workloads.collectives).

Identical ops merge into one op with a count. The op's name is the jax name of its source,
from the instruction's metadata.
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable

from batching.measure import hlo_kinds
from batching.workloads.ops import Op

# HLO element types and their NumPy names and sizes in bytes.
_DTYPES = {
    "pred": ("bool", 1), "s8": ("int8", 1), "u8": ("uint8", 1), "s16": ("int16", 2),
    "u16": ("uint16", 2), "s32": ("int32", 4), "u32": ("uint32", 4), "s64": ("int64", 8),
    "u64": ("uint64", 8), "f16": ("float16", 2), "bf16": ("bfloat16", 2),
    "f32": ("float32", 4), "f64": ("float64", 8), "c64": ("complex64", 8),
    "f8e4m3fn": ("float8_e4m3fn", 1), "f8e5m2": ("float8_e5m2", 1), "s4": ("int4", 1),
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
# Instructions that are no kernel: bookkeeping, and control flow walked into.
_NO_KERNEL = {
    "parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all",
    "opt-barrier", "add-dependency", "domain", "partition-id", "replica-id", "iota",
}  # fmt: skip
_ARITHMETIC = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "remainder",
    "negate", "abs", "exponential", "log", "tanh", "logistic", "sqrt", "rsqrt", "cbrt",
    "sine", "cosine", "exponential-minus-one", "log-plus-one", "erf", "atan2", "compare",
    "select", "clamp", "and", "or", "xor", "not", "floor", "ceil", "round-nearest-even",
    "sign", "tan",
}  # fmt: skip
_SLICES = {"dynamic-slice", "slice", "gather"}
_DIMS = re.compile(
    r"(lhs_batch_dims|lhs_contracting_dims|rhs_batch_dims|rhs_contracting_dims)=\{([\d,]*)\}"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WINDOW = re.compile(r"window=\{size=([\dx]+)")
_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_GROUPS = re.compile(r"feature_group_count=(\d+)")


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (element type, dims) of every array in an HLO type, a tuple's in order."""
    found = _ARRAY.findall(type_text)
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in found if t in _DTYPES]


def nbytes(type_text: str) -> int:
    """Bytes of an HLO type: the sum over its arrays."""
    return sum(_DTYPES[t][1] * math.prod(dims) for t, dims in arrays(type_text))


def _elements(type_text: str) -> int:
    found = arrays(type_text)
    return math.prod(found[0][1]) if found else 0


def _dims(line: str, key: str) -> tuple[int, ...]:
    found = dict(_DIMS.findall(line))
    if key in found:
        return tuple(int(d) for d in found[key].split(",") if d)
    config = re.search(r"backend_config=(\{.*\})", line)
    if config:  # a cuBLAS custom call keeps its dimension numbers in its backend config
        try:
            numbers = _find_key(json.loads(config[1]), "dot_dimension_numbers") or {}
        except ValueError:
            numbers = {}
        name = key.replace("_dims", "_dimensions")
        return tuple(int(d) for d in numbers.get(name, []))
    return ()


def _find_key(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            if (found := _find_key(v, key)) is not None:
                return found
    return None


def dot_shape(ins: hlo_kinds.Instruction, types: dict[str, str]) -> tuple[tuple[int, ...], float]:
    """A dot's (batch, m, k, n) or (m, k, n) and its FLOPs, from its dimension numbers."""
    lhs = arrays(types.get(ins.operands[0], ""))[0][1] if ins.operands else ()
    rhs = arrays(types.get(ins.operands[1], ""))[0][1] if len(ins.operands) > 1 else ()
    lb, lc = _dims(ins.rest, "lhs_batch_dims"), _dims(ins.rest, "lhs_contracting_dims")
    rb, rc = _dims(ins.rest, "rhs_batch_dims"), _dims(ins.rest, "rhs_contracting_dims")
    batch = math.prod(lhs[i] for i in lb if i < len(lhs))
    k = math.prod(lhs[i] for i in lc if i < len(lhs))
    m = math.prod(d for i, d in enumerate(lhs) if i not in lb and i not in lc)
    n = math.prod(d for i, d in enumerate(rhs) if i not in rb and i not in rc)
    shape = (batch, m, k, n) if lb else (m, k, n)
    return shape, 2.0 * batch * m * k * n


def conv_shape(ins: hlo_kinds.Instruction, types: dict[str, str]) -> tuple[tuple[int, ...], float]:
    """A convolution's shape in the ops vocabulary and its FLOPs.

    A 2-D convolution with square windows and equal strides gets the lab's conv shape
    (batch, height, width, c_in, c_out, kernel, stride), with its feature groups appended
    when there are several. Any other gets its output's shape, and is priced at the peak.
    """
    out = arrays(ins.type)[0][1]
    kernel = arrays(types.get(ins.operands[1], ""))[0][1] if len(ins.operands) > 1 else ()
    labels = _LABELS.search(ins.rest)
    groups = int(g[1]) if (g := _GROUPS.search(ins.rest)) else 1
    if not labels or not kernel:
        return out, 0.0
    lhs_l, k_l, out_l = labels.groups()
    window = math.prod(kernel[i] for i, c in enumerate(k_l) if c.isdigit())
    flops = 2.0 * math.prod(out) * window * kernel[k_l.index("i")]
    size = _WINDOW.search(ins.rest)
    sizes = [int(s) for s in size[1].split("x")] if size else []
    stride = re.search(r"stride=([\dx]+)", ins.rest)
    strides = [int(s) for s in stride[1].split("x")] if stride else [1] * len(sizes)
    lhs = arrays(types.get(ins.operands[0], ""))[0][1]
    if len(sizes) == 2 and sizes[0] == sizes[1] and len(set(strides)) == 1:
        b, h, w = (lhs[lhs_l.index(c)] for c in "b01")
        shape = (b, h, w, lhs[lhs_l.index("f")], out[out_l.index("f")], sizes[0], strides[0])
        return (*shape, groups) if groups > 1 else shape, flops
    return out, flops


class _Program:
    """A parsed program and the walk that lists its kernels."""

    def __init__(self, hlo_text: str, is_weight: Callable[[str], bool]):
        parsed = hlo_kinds.parse(hlo_text)
        self.comps, self.entry = parsed
        self.kinds = hlo_kinds.instruction_kinds(hlo_text, parsed)
        self.is_weight = is_weight
        self.ops: list[Op] = []

    def types(self, comp: str) -> dict[str, str]:
        return {n: i.type for n, i in self.comps.get(comp, {}).items()}

    def walk(self, comp: str, mult: int, weights: set[str]) -> None:
        """Appends the kernels of `comp`, each run `mult` times; `weights` names weight values."""
        instructions = self.comps.get(comp, {})
        types = self.types(comp)
        weights = set(weights)
        for ins in instructions.values():
            op = ins.opcode
            if op in ("bitcast", "copy") and ins.operands and ins.operands[0] in weights:
                weights.add(ins.name)
            if op in _NO_KERNEL or op.endswith("-done") or op == "async-update":
                continue
            if op == "while":
                self.walk_while(ins, instructions, mult, weights)
            elif op == "conditional":
                self.walk_branches(ins, mult, weights)
            elif op in ("call", "async-start") and ins.calls:
                self.walk(ins.calls[0], mult, self.inner_weights(ins, weights))
            elif len(self.products(ins)) > 1:
                self.ops.extend(self.split(ins, weights, mult))
            else:
                kernel = self.kernel(ins, comp, types, weights, mult)
                if kernel is not None:
                    self.ops.append(kernel)

    def products(self, ins: hlo_kinds.Instruction) -> list[hlo_kinds.Instruction]:
        """The dots and convolutions inside a library fusion (kind=kCustom), in order."""
        if ins.opcode != "fusion" or "kind=kCustom" not in ins.rest or not ins.calls:
            return []
        inner = self.comps.get(ins.calls[0], {}).values()
        return [x for x in inner if x.opcode in ("dot", "convolution")]

    def split(self, ins: hlo_kinds.Instruction, weights: set[str], mult: int) -> list[Op]:
        """A library fusion of several products, one op per product.

        XLA:CPU hands a whole network to YNNPACK as one fusion. The library runs its products
        one by one, each reading its operands and writing its output. The elementwise work
        between them rides in their epilogues: one fused op holds its FLOPs.
        """
        inner = self.comps[ins.calls[0]]
        types = {n: x.type for n, x in inner.items()}
        given = {i for i, o in enumerate(ins.operands) if o in weights}
        held = {n for n, x in inner.items() if x.opcode == "parameter" and _number(x) in given}
        for x in inner.values():
            if x.opcode in ("bitcast", "copy", "reshape", "transpose") and x.operands[0] in held:
                held.add(x.name)
        out, rest = [], self.work(ins, types, inner)[0]
        for x in self.products(ins):
            shape, flops = (dot_shape if x.opcode == "dot" else conv_shape)(x, types)
            read = [float(nbytes(types.get(o, ""))) for o in x.operands]
            weight = sum(b for o, b in zip(x.operands, read, strict=True) if o in held)
            kind = "gemm" if x.opcode == "dot" else "conv"
            name = _jax_name(x)
            dtype = _dtype(arrays(types.get(x.operands[0], "")))
            written = float(nbytes(x.type))
            out.append(Op(name[-80:], kind, shape, flops, sum(read) + written, weight, mult,
                          dtype=dtype))  # fmt: skip
            rest -= flops
        name = _jax_name(ins)
        out.append(Op(name[-80:], "elementwise", (), max(rest, 0.0), 0.0, 0.0, mult, fused=True))
        return out

    def inner_weights(self, ins: hlo_kinds.Instruction, weights: set[str]) -> set[str]:
        """The parameters of `ins`'s callee that receive weights."""
        callee = self.comps.get(ins.calls[0], {})
        given = {i for i, o in enumerate(ins.operands) if o in weights}
        return {n for n, p in callee.items() if p.opcode == "parameter" and _number(p) in given}

    def walk_while(
        self,
        ins: hlo_kinds.Instruction,
        instructions: dict[str, hlo_kinds.Instruction],
        mult: int,
        weights: set[str],
    ):
        trip = _TRIP.search(ins.rest)
        n = int(trip[1]) if trip else 1
        init = instructions.get(ins.operands[0]) if ins.operands else None
        carried = {i for i, o in enumerate(init.operands) if o in weights} if init else set()
        body = re.search(r"body=%?([\w.\-]+)", ins.rest)
        cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
        for name in (body[1] if body else "", cond[1] if cond else ""):
            inside = set()
            for x in self.comps.get(name, {}).values():
                if x.opcode == "get-tuple-element" and (i := re.search(r"index=(\d+)", x.rest)):
                    source = self.comps[name].get(x.operands[0])
                    if source is not None and source.opcode == "parameter" and int(i[1]) in carried:
                        inside.add(x.name)
            self.walk(name, mult * n, inside)

    def walk_branches(self, ins: hlo_kinds.Instruction, mult: int, weights: set[str]):
        best: list[Op] = []
        outer = self.ops
        for branch in ins.calls:
            self.ops = []
            self.walk(branch, mult, set())
            if sum(o.bytes * o.count for o in self.ops) >= sum(o.bytes * o.count for o in best):
                best = self.ops
        self.ops = outer + best

    def kernel(
        self,
        ins: hlo_kinds.Instruction,
        comp: str,
        types: dict[str, str],
        weights: set[str],
        mult: int,
    ):
        """One kernel as an Op, or None for one that is no lab op (a collective)."""
        kind = self.kinds.get(ins.name, "")
        if kind in ("", hlo_kinds.COLLECTIVE) or (kind == hlo_kinds.OTHER and ins.opcode != "copy"):
            return None
        if kind in (hlo_kinds.OTHER, "ragged_gemm", "moe_dispatch_combine"):
            kind = "elementwise" if kind == hlo_kinds.OTHER else "gemm"
        inner = self.comps.get(ins.calls[0], {}) if ins.opcode == "fusion" and ins.calls else {}
        flops, shape, dtype = self.work(ins, types, inner)
        read, weight = 0.0, 0.0
        for i, operand in enumerate(dict.fromkeys(ins.operands)):
            b = self.read_bytes(ins, i, operand, types, inner)
            read += b
            weight += b if operand in weights else 0.0
        written = self.written_bytes(ins, types, inner)
        name = _jax_name(ins)
        return Op(name[-80:], kind, shape, flops, read + written, weight, count=mult, dtype=dtype)

    def work(
        self,
        ins: hlo_kinds.Instruction,
        types: dict[str, str],
        inner: dict[str, hlo_kinds.Instruction],
    ):
        """(FLOPs, shape, dtype) of a kernel. A product names the shape and dtype."""
        body = inner or {ins.name: ins}
        body_types = {n: i.type for n, i in inner.items()} if inner else types
        flops, main, main_flops = 0.0, None, -1.0
        for x in body.values():
            f, shape = 0.0, None
            if x.opcode == "dot" or (x.opcode == "custom-call" and "gemm" in x.rest.lower()):
                shape, f = dot_shape(x, body_types)
            elif x.opcode == "convolution" or (x.opcode == "custom-call" and "conv" in x.rest):
                shape, f = conv_shape(x, body_types)
            elif x.opcode in _ARITHMETIC:
                f = float(_elements(x.type))
            elif x.opcode in ("reduce", "reduce-window") and x.operands:
                f = float(_elements(body_types.get(x.operands[0], "")))
            elif x.opcode == "fusion" and x.calls:
                f = self.work(x, body_types, self.comps.get(x.calls[0], {}))[0]
            flops += f
            if shape is not None and f > main_flops:
                main, main_flops = (shape, x), f
        if main is None:
            found = arrays(ins.type)
            return flops, found[0][1] if found else (), _dtype(found)
        shape, x = main
        return flops, shape, _dtype(arrays(body_types.get(x.operands[0], "")))

    def read_bytes(self, ins, i, operand, types, inner) -> float:
        """Bytes a kernel reads of one operand: the slices it takes, or all of it."""
        full = float(nbytes(types.get(operand, "")))
        if not inner:
            if ins.opcode in _SLICES and i == 0:
                return float(nbytes(ins.type))
            return 0.0 if ins.opcode in ("dynamic-update-slice", "scatter") and i == 0 else full
        param = next(
            (p for p in inner.values() if p.opcode == "parameter" and _number(p) == i), None
        )
        if param is None:
            return full
        users = [
            (x, x.operands.index(param.name)) for x in inner.values() if param.name in x.operands
        ]
        if users and all(x.opcode in _SLICES and j == 0 for x, j in users):
            return float(sum(nbytes(x.type) for x, _ in users))
        if users and all(
            x.opcode in ("dynamic-update-slice", "scatter") and j == 0 for x, j in users
        ):
            return 0.0
        return full

    def written_bytes(self, ins, types, inner) -> float:
        """Bytes a kernel writes: its output, or only the update of an in-place update."""
        root = next((x for x in inner.values() if x.root), None) if inner else ins
        if root is not None and root.opcode in ("dynamic-update-slice", "scatter"):
            body_types = {n: x.type for n, x in inner.items()} if inner else types
            update = (
                root.operands[1] if root.opcode == "dynamic-update-slice" else root.operands[-1]
            )
            return float(nbytes(body_types.get(update, "")))
        return float(nbytes(ins.type))


def _jax_name(ins: hlo_kinds.Instruction) -> str:
    """An instruction's jax name, its jit(...) prefix dropped; else its HLO name."""
    return re.sub(r"^jit\([^)]*\)/", "", ins.op_name) or ins.name


def _number(ins: hlo_kinds.Instruction) -> int:
    """A parameter instruction's number: parameter(3) is 3."""
    m = re.match(r"\s*(\d+)\s*\)", ins.rest)
    return int(m[1]) if m else -1


def _dtype(found: list[tuple[str, tuple[int, ...]]]) -> str:
    return _DTYPES[found[0][0]][0] if found else "float32"


def program_ops(hlo_text: str, is_weight: Callable[[str], bool] = lambda name: False) -> list[Op]:
    """The kernels of a compiled program as ops, identical ones merged with a count.

    `is_weight(name)` says whether an entry parameter holds weights. It gets the parameter's
    jax name (its metadata's op_name), else its instruction name.
    """
    program = _Program(hlo_text, is_weight)
    entry = program.comps.get(program.entry, {})
    weights = {n for n, x in entry.items() if x.opcode == "parameter" and is_weight(x.op_name or n)}
    program.walk(program.entry, 1, weights)
    merged: dict[tuple, Op] = {}
    for o in program.ops:
        key = (o.kind, o.shape, o.flops, o.bytes, o.weight_bytes, o.dtype)
        if key in merged:
            merged[key] = dataclasses.replace(merged[key], count=merged[key].count + o.count)
        else:
            merged[key] = o
    return list(merged.values())
