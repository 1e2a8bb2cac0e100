"""Parsers for compiled kernel text: PTX load provenance, SASS load widths, resource usage.

These are pure text functions (no Triton, no GPU) used by :mod:`kgen.audit`:

* :func:`ptx_loads` lists every global load of a PTX kernel (``ld.global`` and ``cp.async``), its
  width in bits and the set of kernel parameters its address is computed from (a data-flow walk
  from each ``ld.param``; values produced by global loads carry no provenance, so a K/V address
  built from a block-table entry traces to the K/V cache pointer, not to the table). Values
  passed through shared memory (``st.shared`` then ``ld.shared``, as Triton does when it
  re-lays out per-row addresses, e.g. block size 1 with 128-token tiles) keep their provenance,
  conservatively: a shared load gets that of everything the kernel stores to shared memory.
* :func:`sass_instructions` / :func:`sass_load_bits` / :func:`sass_spill_bytes` read the output
  of ``cuobjdump --dump-sass``: global loads (``LDG``, ``LDGSTS``, generic ``LD``) by width and
  local-memory spill traffic (``STL`` / ``LDL``).
* :func:`sass_mma_count` counts tensor-core instructions: ``HMMA`` (``mma.sync``, sm_80 and
  sm_90) and ``HGMMA`` / ``QGMMA`` (``wgmma``, sm_90).
* :func:`resource_usage` reads ``cuobjdump --dump-resource-usage`` (REG, STACK, SHARED, LOCAL).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# ---- PTX ----------------------------------------------------------------------------------------
_PTX_REG = re.compile(r"%[a-z]+\d+")
_PTX_PARAM = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")
_PTX_GUARD = re.compile(r"^@(!?)(%p\d+)\s+")
_PTX_BRACES = re.compile(r"\{([^}]*)\}")
_PTX_BRACKETS = re.compile(r"\[([^\]]*)\]")
_PTX_ELEM = re.compile(r"^[bsuf](8|16|32|64|128)$")
_NO_DEST = ("st.", "red.", "bar.", "bra", "ret", "fence", "membar", "cp.async.commit",
            "cp.async.wait", "cp.async.bulk.commit", "cp.async.bulk.wait", "exit", "trap", "prefetch")


@dataclass(frozen=True)
class PtxLoad:
    """One global load in PTX: width in bits, the instruction kind and its address's parameters."""

    bits: int
    kind: str  # "ld" (ld.global) or "cp.async" (global -> shared copy)
    params: frozenset  # kernel parameter indices the address is computed from


def _ptx_statements(ptx: str):
    """Yield (guard, negated, opcode, operands) for each instruction of the PTX text."""
    for raw in ptx.splitlines():
        for stmt in raw.split("//", 1)[0].split(";"):
            stmt = stmt.strip().strip("{}").strip()  # inline-asm scope braces
            if not stmt or stmt.startswith((".", "$", ")")) or stmt.endswith(":"):
                continue
            guard = _PTX_GUARD.match(stmt)
            negated, pred = (guard.group(1) == "!", guard.group(2)) if guard else (False, None)
            if guard:
                stmt = stmt[guard.end():]
            opcode, _, operands = stmt.partition(" ")
            yield pred, negated, opcode.strip(), operands.strip()


def _ld_bits(opcode: str) -> int:
    """Width of an ``ld.global[.mods][.vN].<type>`` access in bits."""
    parts = opcode.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    elem = next((int(m.group(1)) for p in reversed(parts) if (m := _PTX_ELEM.match(p))), None)
    if elem is None:
        raise ValueError(f"cannot read the width of PTX load {opcode!r}")
    return vec * elem


def _cp_async_bits(operands: str) -> int:
    """Width of ``cp.async.* [dst], [src], SIZE[, src_size]`` in bits (SIZE in bytes)."""
    tail = operands.rsplit("]", 1)[-1]
    size = tail.strip(" ,").split(",")[0].strip()
    return 8 * int(size, 0)


def ptx_loads(ptx: str) -> list[PtxLoad]:
    """Global loads of one PTX kernel with their width and address provenance.

    Parameters
    ----------
    ptx : str
        PTX text of a single ``.entry`` (as Triton's ``compiled.asm["ptx"]``).

    Returns
    -------
    list of PtxLoad
        One entry per ``ld.global*`` / ``cp.async.*.shared.global`` instruction, excluding loads
        guarded by a predicate that is constant false (dead code ptxas removes).
    """
    defs = []  # (dest, sources, origin params)
    shared = "%shared_memory"  # pseudo register: every value stored to shared memory
    loads = []  # (pred, negated, bits, kind, address regs)
    const_false, other_pred_defs = set(), set()
    for pred, negated, opcode, operands in _ptx_statements(ptx):
        if opcode.startswith("ld.param"):
            param = _PTX_PARAM.search(operands)
            dest = _PTX_REG.findall(operands)[:1]
            if dest and param:
                defs.append((dest[0], (), frozenset({int(param.group(1))})))
            continue
        if opcode.startswith("cp.async") and ".global" in opcode:
            brackets = _PTX_BRACKETS.findall(operands)
            loads.append((pred, negated, _cp_async_bits(operands), "cp.async",
                          _PTX_REG.findall(brackets[1])))
            continue
        if opcode.startswith("st.") and ".shared" in opcode:
            defs.append((shared, tuple(_PTX_REG.findall(operands.rsplit("]", 1)[-1])), frozenset()))
            continue
        if opcode.startswith("ld."):
            brackets = _PTX_BRACKETS.findall(operands)
            spaces = {part.split("::")[0] for part in opcode.split(".")[1:]}
            if ".global" in opcode or not spaces & {"shared", "local", "const", "param"}:
                loads.append((pred, negated, _ld_bits(opcode), "ld",
                              _PTX_REG.findall(brackets[-1]) if brackets else []))
            elif "shared" in spaces:
                braces = _PTX_BRACES.match(operands)
                dests = _PTX_REG.findall(braces.group(1) if braces else operands.split(",")[0])
                defs.extend((dest, (shared,), frozenset()) for dest in dests)
            continue  # globally loaded values are data: no pointer provenance flows through them
        if opcode.startswith(_NO_DEST):
            continue
        braces = _PTX_BRACES.match(operands)
        if braces:
            dests = _PTX_REG.findall(braces.group(1))
            sources = _PTX_REG.findall(operands[braces.end():])
        else:
            regs = _PTX_REG.findall(operands)
            dests, sources = regs[:1], regs[1:]
        for dest in dests:
            if dest.startswith("%p"):
                if opcode.startswith("mov.pred") and operands.replace(" ", "").endswith(",0"):
                    const_false.add(dest)
                else:
                    other_pred_defs.add(dest)
            defs.append((dest, tuple(sources), frozenset()))
    prov: dict[str, frozenset] = {}
    changed = True
    while changed:  # fixpoint: loop-carried registers get every definition's provenance
        changed = False
        for dest, sources, origin in defs:
            new = prov.get(dest, frozenset()) | origin
            for src in sources:
                new |= prov.get(src, frozenset())
            if new != prov.get(dest, frozenset()):
                prov[dest] = new
                changed = True
    dead = const_false - other_pred_defs
    out = []
    for pred, negated, bits, kind, regs in loads:
        if pred in dead and not negated:
            continue
        params = frozenset().union(*(prov.get(r, frozenset()) for r in regs))
        out.append(PtxLoad(bits=bits, kind=kind, params=params))
    return out


# ---- SASS ---------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\b([^;]*);")
_SASS_GLOBAL_LOADS = ("LDG", "LDGSTS", "LD")
_SASS_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "32": 32, "64": 64, "128": 128}


def sass_instructions(sass: str) -> list[tuple[str, str]]:
    """``(opcode, operands)`` for each instruction in ``cuobjdump --dump-sass`` text."""
    out = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            out.append((match.group(1), match.group(2).strip()))
    return out


def sass_width(opcode: str) -> int:
    """Access width in bits of a SASS memory opcode (``LDG.E.128`` -> 128, ``LDG.E`` -> 32).

    Cache-hint modifiers such as ``LTC128B`` are not widths and are ignored.
    """
    widths = [_SASS_WIDTH_TOKENS[t] for t in opcode.split(".")[1:] if t in _SASS_WIDTH_TOKENS]
    return widths[-1] if widths else 32


def sass_load_bits(sass: str) -> dict[int, int]:
    """Global loads in the SASS by width: ``{128: 24, 32: 9}`` (``LDG``, ``LDGSTS``, ``LD``)."""
    counts = Counter(sass_width(op) for op, _ in sass_instructions(sass)
                     if op.split(".")[0] in _SASS_GLOBAL_LOADS)
    return dict(sorted(counts.items(), reverse=True))


def sass_spill_bytes(sass: str) -> tuple[int, int]:
    """Static bytes of local-memory stores and loads (``STL`` / ``LDL``): the spill traffic."""
    ops = [op for op, _ in sass_instructions(sass)]
    stores = sum(sass_width(op) // 8 for op in ops if op.split(".")[0] == "STL")
    loads = sum(sass_width(op) // 8 for op in ops if op.split(".")[0] == "LDL")
    return stores, loads


# Tensor-core matrix instructions: mma.sync (HMMA) and Hopper's warpgroup MMAs on 16-bit (HGMMA) and
# 8-bit float (QGMMA) operands.
SASS_MMA_OPCODES = ("HMMA", "HGMMA", "QGMMA")


def sass_mma_count(sass: str) -> int:
    """Static count of tensor-core instructions (``HMMA``, ``HGMMA``, ``QGMMA``) in the SASS."""
    return sum(1 for op, _ in sass_instructions(sass) if op.split(".")[0] in SASS_MMA_OPCODES)


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(text: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a one-kernel cubin -> registers, stack, shared, local."""
    match = _RESOURCE.search(text)
    if not match:
        raise ValueError(f"no 'REG:.. STACK:..' line in resource usage output: {text[:200]!r}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}
