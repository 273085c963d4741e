"""Matmul FLOPs and memory traffic of a compiled program, read from its optimized HLO text, with every
while loop counted as many times as it runs.

Why not `compiled.cost_analysis()`: XLA's cost analysis counts the body of a while loop once, and the
train step runs its layer stacks as loops (`nn.scan`): for the 7B step it reports a few percent of
the real FLOPs. Here each computation's own cost is multiplied by how often it runs: a while body by
its trip count (read from the loop condition `i < N`, the form `lax.scan`/`fori_loop` lower to),
fusions and calls once per call.

Counted, per device (the HLO is the SPMD-partitioned program of one device):
- flops: 2 x multiply-adds of every `dot` and `convolution` (TPU lowers matmuls to convolutions),
  counting only the window positions that hit real input (padding and dilation holes excluded), as
  XLA's own cost analysis does. Element-wise work is left out, like the analytic model FLOPs
  (vla_jax.training.metrics) it is compared with; rematerialised matmuls are in.
- bytes: operand + result bytes of every top-level instruction (fusions count their inputs and
  outputs, not their insides), i.e. HBM traffic if nothing stays on chip between instructions.
- collective_bytes: result bytes of all-gather / all-reduce / reduce-scatter / all-to-all /
  collective-permute instructions.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class _Instr:
    __slots__ = ("name", "type", "op", "operands", "attrs", "root")

    def __init__(self, name, type_, op, operands, attrs, root=False):
        self.name, self.type, self.op, self.operands, self.attrs = name, type_, op, operands, attrs
        self.root = root


def _balanced(s: str, start: int, open_c: str, close_c: str) -> int:
    """Index just past the bracket that closes s[start] (== open_c)."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_c}{close_c} in HLO line: {s[:200]}")


def _split_top(s: str) -> List[str]:
    out, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_instr(body: str) -> Optional[Tuple[str, str, List[str], str]]:
    """'TYPE opcode(operands), attrs' -> (type, opcode, operand names, attrs)."""
    if body.startswith("("):
        end = _balanced(body, 0, "(", ")")
    else:
        m = re.match(r"[a-z][a-z0-9]*\[[0-9,]*\](\{[^}]*\})?", body)
        if m is None:
            m = re.match(r"[a-z][a-z0-9]*\[\]", body)
        if m is None:
            return None
        end = m.end()
    type_ = body[:end]
    rest = body[end:].lstrip()
    m = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if m is None:
        return None
    op = m.group(1)
    close = _balanced(rest, m.end() - 1, "(", ")")
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[m.end():close - 1]) if o]
    return type_, op, operands, rest[close:]


def _array_dims(type_: str) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_)]


def _bytes(type_: str) -> float:
    return float(sum(_DTYPE_BYTES.get(dt, 4) * int(np.prod(dims)) for dt, dims in _array_dims(type_)))


def parse_module(text: str) -> Tuple[Dict[str, List[_Instr]], str]:
    """HLO module text -> ({computation: instructions}, entry computation name)."""
    comps: Dict[str, List[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            parsed = _parse_instr(m.group(3))
            if parsed is not None:
                comps[current].append(_Instr(m.group(2), *parsed, root=bool(m.group(1))))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _valid_pairs(n_in: int, n_out: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """Number of (output position, kernel position) pairs of one spatial dimension that read a real input."""
    o = np.arange(n_out)[:, None]
    kk = np.arange(k)[None, :]
    x = o * stride + kk * rhs_dil - pad_lo  # position in the lhs-dilated input
    valid = (x >= 0) & (x <= (n_in - 1) * lhs_dil) & (x % lhs_dil == 0)
    return int(valid.sum())


def _window(attrs: str, n: int) -> Dict[str, List]:
    w = {"size": [1] * n, "stride": [1] * n, "pad": [(0, 0)] * n, "lhs_dilate": [1] * n, "rhs_dilate": [1] * n}
    m = re.search(r"window=\{([^}]*)\}", attrs)
    if m:
        for item in m.group(1).split():
            key, _, val = item.partition("=")
            if key == "pad":
                w["pad"] = [tuple(int(v) for v in p.split("_")) for p in val.split("x")]
            elif key in w:
                w[key] = [int(v) for v in val.split("x")]
    return w


def _conv_flops(ins: _Instr, shapes: Dict[str, str]) -> float:
    labels = re.search(r"dim_labels=([^_\s,]+)_([^-\s,]+)->([^\s,]+)", ins.attrs)
    lhs_t, rhs_t = shapes.get(ins.operands[0]), shapes.get(ins.operands[1])
    if labels is None or lhs_t is None or rhs_t is None:
        raise ValueError(f"cannot read convolution {ins.name}: dim_labels or operand shapes missing")
    lhs_l, rhs_l, out_l = labels.groups()
    lhs, rhs, out = _array_dims(lhs_t)[0][1], _array_dims(rhs_t)[0][1], _array_dims(ins.type)[0][1]
    spatial = sorted(c for c in out_l if c.isdigit())
    w = _window(ins.attrs, len(spatial))
    macs = float(out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")])
    for j, d in enumerate(spatial):
        macs *= _valid_pairs(lhs[lhs_l.index(d)], out[out_l.index(d)], rhs[rhs_l.index(d)], w["stride"][j],
                             w["pad"][j][0], w["lhs_dilate"][j], w["rhs_dilate"][j])
    return 2.0 * macs


def _dot_flops(ins: _Instr, shapes: Dict[str, str]) -> float:
    lhs_t = shapes.get(ins.operands[0])
    if lhs_t is None:
        raise ValueError(f"cannot read dot {ins.name}: operand {ins.operands[0]} has no known shape")
    lhs = _array_dims(lhs_t)[0][1]
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    contract = [int(d) for d in m.group(1).split(",") if d] if m else []
    out = _array_dims(ins.type)[0][1]
    return 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in contract]))


def _int_constant(ins: Optional[_Instr]) -> Optional[int]:
    if ins is not None and ins.op == "constant" and ins.operands and re.fullmatch(r"-?\d+", ins.operands[0]):
        return int(ins.operands[0])
    return None


def _fusion_traffic(ins: _Instr, fused: List[_Instr], shapes: Dict[str, str]) -> float:
    """HBM bytes a fusion reads and writes: an operand only sliced inside (a scanned layer's weights out
    of the stacked [L, ...] array) counts the slices, a buffer updated in place (dynamic-update-slice,
    e.g. the KV cache or a scan's stacked outputs) counts the update, not the whole array."""
    params = {int(i.operands[0]): i.name for i in fused if i.op == "parameter"}
    users: Dict[str, List[_Instr]] = {}
    for i in fused:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    total = 0.0
    for idx, operand in enumerate(ins.operands):
        full = _bytes(shapes[operand]) if operand in shapes else 0.0
        us = users.get(params.get(idx, ""), [])
        if us and all(u.op in ("dynamic-slice", "slice", "gather") and u.operands[0] == params[idx] for u in us):
            total += sum(_bytes(u.type) for u in us)
        elif us and all(u.op == "dynamic-update-slice" and u.operands[0] == params[idx] for u in us):
            pass  # written in place: the update is counted with the output
        else:
            total += full
    by_name = {i.name: i for i in fused}
    root = next((i for i in fused if i.root), None)
    outs = [by_name.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
    for out in outs:
        if out is not None and out.op == "dynamic-update-slice" and len(out.operands) > 1:
            total += _bytes(by_name[out.operands[1]].type) if out.operands[1] in by_name else 0.0
        elif out is not None:
            total += _bytes(out.type)
    return total


def _trip_count(cond: List[_Instr], comps: Dict[str, List[_Instr]]) -> Optional[int]:
    """Trip count of a loop whose condition is `i < N` (counter in tuple element 0, step 1; the start is
    subtracted by the caller), else None. The compare may sit in a fusion (XLA:CPU wraps it)."""
    by_name = {i.name: i for i in cond}
    for ins in cond:
        if ins.op == "compare" and "direction=LT" in ins.attrs and len(ins.operands) > 1:
            n = _int_constant(by_name.get(ins.operands[1]))
            if n is not None:
                return n
        if ins.op == "fusion":
            m = re.search(r"calls=%([^\s,]+)", ins.attrs)
            inner = comps.get(m.group(1), []) if m else []
            params = {i.name: int(i.operands[0]) for i in inner if i.op == "parameter"}
            for c in inner:
                if c.op == "compare" and "direction=LT" in c.attrs and len(c.operands) > 1 and c.operands[1] in params:
                    idx = params[c.operands[1]]
                    if idx < len(ins.operands):
                        n = _int_constant(by_name.get(ins.operands[idx]))
                        if n is not None:
                            return n
    return None


def _loop_start(loop: _Instr, by_name: Dict[str, _Instr]) -> int:
    """Initial value of the loop counter (tuple element 0 of the loop's operand) when it is a constant, else 0."""
    init = by_name.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.op == "tuple" and init.operands:
        start = _int_constant(by_name.get(init.operands[0]))
        if start is not None:
            return start
    return 0


def square_buffers(text: str, n: int) -> Dict[str, float]:
    """Arrays of the HLO whose last two dimensions are both `n` (attention scores/probabilities over n
    positions): {'count': distinct shapes seen, 'largest_bytes': bytes of the largest one}."""
    seen = {}
    for dt, dims in _ARRAY.findall(text):
        d = tuple(int(x) for x in dims.split(",") if x)
        if len(d) >= 2 and d[-1] == n and d[-2] == n:
            seen[(dt, d)] = _DTYPE_BYTES.get(dt, 4) * float(np.prod(d))
    return {"count": len(seen), "largest_bytes": max(seen.values()) if seen else 0.0,
            "shapes": [f"{dt}{list(d)}" for (dt, d) in sorted(seen, key=seen.get, reverse=True)[:4]]}


def analyze(text: str) -> Dict[str, object]:
    """Optimized HLO text (`compiled.as_text()`) -> {'flops', 'bytes', 'collective_bytes', 'loops':
    [(loop name, trip count), ...]}. Raises ValueError if a loop's trip count cannot be read."""
    comps, entry = parse_module(text)
    memo: Dict[Tuple[str, bool], Tuple[float, float, float]] = {}
    loops: List[Tuple[str, int]] = []

    def cost(name: str, fused: bool) -> Tuple[float, float, float]:
        key = (name, fused)
        if key in memo:
            return memo[key]
        instrs = comps[name]
        shapes = {i.name: i.type for i in instrs}
        flops = traffic = coll = 0.0
        for ins in instrs:
            if ins.op == "convolution":
                flops += _conv_flops(ins, shapes)
            elif ins.op == "dot":
                flops += _dot_flops(ins, shapes)
            if not fused and ins.op not in _NO_TRAFFIC and not ins.op.endswith("-done"):
                m = re.search(r"calls=%([^\s,]+)", ins.attrs) if ins.op == "fusion" else None
                if m and m.group(1) in comps:
                    traffic += _fusion_traffic(ins, comps[m.group(1)], shapes)
                elif ins.op == "dynamic-slice":
                    traffic += 2 * _bytes(ins.type)
                elif ins.op == "dynamic-update-slice" and len(ins.operands) > 1 and ins.operands[1] in shapes:
                    traffic += 2 * _bytes(shapes[ins.operands[1]])
                else:
                    traffic += _bytes(ins.type) + sum(_bytes(shapes[o]) for o in ins.operands if o in shapes)
            if not fused and ins.op.startswith(_COLLECTIVES) and not ins.op.endswith("-done"):
                coll += _bytes(ins.type)
            if ins.op == "fusion":
                m = re.search(r"calls=%([^\s,]+)", ins.attrs)
                if m:
                    f, _, _ = cost(m.group(1), True)
                    flops += f
            elif ins.op == "while":
                body = re.search(r"body=%([^\s,]+)", ins.attrs).group(1)
                cond = re.search(r"condition=%([^\s,]+)", ins.attrs).group(1)
                n = _trip_count(comps[cond], comps)
                if n is not None:
                    n -= _loop_start(ins, {i.name: i for i in instrs})
                if n is None:
                    raise ValueError(f"while loop {ins.name}: cannot read its trip count from {cond}")
                loops.append((ins.name, n))
                f, b, c = cost(body, fused)
                flops, traffic, coll = flops + n * f, traffic + n * b, coll + n * c
            elif ins.op in ("call", "conditional") or ins.op.endswith("-start"):
                for callee in re.findall(r"(?:to_apply|calls|branch_computations=\{|true_computation|"
                                         r"false_computation)=?%([^\s,}]+)", ins.attrs):
                    if callee in comps:
                        f, b, c = cost(callee, fused)
                        flops, traffic, coll = flops + f, traffic + b, coll + c
        memo[key] = (flops, traffic, coll)
        return memo[key]

    flops, traffic, coll = cost(entry, False)
    return {"flops": flops, "bytes": traffic, "collective_bytes": coll, "loops": loops}
