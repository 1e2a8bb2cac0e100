"""Build and load the CPU kernels (``runtime/native/paged_decode.c``, ``layer_ops.c``, ``gemm.c``) on
first use.

The C files need no torch or Python headers, so they build in a few seconds into one library
with the system C compiler (``$CC``, else ``cc``): ``-O3 -march=native -fno-math-errno
-fno-trapping-math -fopenmp`` (OpenMP threads from the ``libgomp.so.1`` torch has already
loaded), else the same without OpenMP, whichever first builds and loads. Never ``-ffast-math``:
it lets the compiler assume that no value is NaN or infinite, and a model with a non-finite
weight then decoded garbage where torch gives torch's answer (issue 21); it would also turn on
flush-to-zero for the whole process when linked. The library lands in
``$KGEN_CACHE_DIR/native`` (default ``~/.cache/kgen/native``) under a name hashed from the
sources, the flags, the compiler and the CPU, written to a temporary file and renamed, so
concurrent builds never see half a file.

``-march=native`` lets the compiler use what this CPU has: AVX-512, and AVX512-BF16's
VDPBF16PS for bfloat16 decode scores and projections. ``KGEN_NATIVE_BF16=0`` builds without the BF16
instructions (``-mno-avx512bf16``), the path of a CPU that lacks them (tested on every CPU);
:func:`native_info` says what the loaded build uses.

``KGEN_NATIVE=0`` in the environment turns the kernels off (the ``auto`` backend then uses torch
and the decoder torch's elementwise ops). When no compiler works, :func:`load_native` returns
None and :func:`why_unavailable` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCES = tuple(NATIVE_DIR / name for name in ("paged_decode.c", "layer_ops.c", "gemm.c"))
HEADERS = (NATIVE_DIR / "elem.h", NATIVE_DIR / "decode_passes.h")
_MATH = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC"]
FLAG_SETS = (  # tried in order: OpenMP threads, then without OpenMP (SIMD pragmas only)
    ([*_MATH, "-fopenmp"], ["-fopenmp", "-lm"]),
    ([*_MATH, "-fopenmp-simd", "-Wno-unknown-pragmas"], ["-lm"]),
)
NO_BF16_FLAGS = ["-mno-avx512bf16"]
"""Added where ``KGEN_NATIVE_BF16=0`` (x86-64 only): the build a CPU without BF16 instructions gets."""

TYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The kernels' element-type codes (``runtime/native/elem.h``); fp8 cache codes are 3."""
FP8_CODE = 3

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ARGTYPES = [_P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _F, _F, _P, _P, _I, _I, _I]

_loaded: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("KGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kgen")
    return Path(root) / "native"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> tuple[str, str]:
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    return cc, version


def extra_flags() -> list[str]:
    """Flags the environment asks for (``KGEN_NATIVE_BF16=0``: no BF16 instructions)."""
    if os.environ.get("KGEN_NATIVE_BF16", "1") == "0" and platform.machine() in ("x86_64", "AMD64"):
        return list(NO_BF16_FLAGS)
    return []


def _build(cc: str, version: str, cflags: list[str], libs: list[str]) -> Path:
    """The library of every file of ``SOURCES`` built with these flags (cached by content)."""
    sources = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*sources, " ".join(cflags + libs), version, _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"kgen_cpu-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = [Path(tmp) / f"{p.stem}.o" for p in SOURCES]
        for src, obj in zip(SOURCES, objs):
            done = subprocess.run([cc, *cflags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode:
                raise RuntimeError(f"{src.name}: {done.stderr.strip()[-400:]}")
        lib = Path(tmp) / "k.so"
        done = subprocess.run([cc, "-shared", *map(str, objs), "-o", str(lib), *libs], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"link: {done.stderr.strip()[-400:]}")
        os.replace(lib, target)
    return target


def load_native():
    """The built library (a ``ctypes.CDLL``, its ``openmp`` attribute saying whether it threads
    over rows and sequences itself), or None when it cannot be built (:func:`why_unavailable`).
    Each of ``FLAG_SETS`` is tried in turn until one builds and loads."""
    if "lib" in _loaded:
        return _loaded["lib"]
    lib, errors = None, []
    if os.environ.get("KGEN_NATIVE", "1") == "0":
        _loaded["why"] = "KGEN_NATIVE=0 is set"
    else:
        try:
            cc, version = _compiler()
        except (OSError, subprocess.SubprocessError) as err:
            cc, errors = None, [str(err)]
        for cflags, libs in FLAG_SETS if cc else ():
            cflags = cflags + extra_flags()
            try:
                lib = ctypes.CDLL(str(_build(cc, version, cflags, libs)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                errors.append(str(err))
                continue
            _describe(lib, cflags)
            break
        if lib is None:
            _loaded["why"] = "the CPU kernels could not be built (" + " | ".join(errors) + ")"
    _loaded["lib"] = lib
    return lib


def _describe(lib, cflags: list[str]) -> None:
    """Set ``lib.openmp``, ``lib.float16`` and ``lib.info`` (see :func:`native_info`)."""
    lib.kgen_native_isa.restype = ctypes.c_char_p
    features = lib.kgen_native_features()
    lib.openmp, lib.float16, bf16_dot = bool(features & 1), bool(features & 2), bool(features & 4)
    lib.info = {"isa": lib.kgen_native_isa().decode(), "openmp": lib.openmp, "float16": lib.float16,
                "bf16_dot": bf16_dot, "bf16_gemm": bool(lib.kgen_gemm_bf16_available()), "cflags": " ".join(cflags)}


def load_variant(flag_set: int = 0, extra: list[str] | None = None):
    """A library built with ``FLAG_SETS[flag_set]`` plus ``extra`` flags, loaded beside the usual
    one (for tests of the builds other CPUs and compilers get), described as :func:`load_native`'s."""
    cc, version = _compiler()
    cflags, libs = FLAG_SETS[flag_set]
    cflags = cflags + list(extra or [])
    lib = ctypes.CDLL(str(_build(cc, version, cflags, libs)))
    _describe(lib, cflags)
    return lib


def native_info() -> dict | None:
    """What the loaded library was built for: ``isa`` (``avx512_bf16``, ``avx512f``, ``avx2``,
    ...), ``openmp``, ``float16`` (float16 elements), ``bf16_dot`` (bfloat16 decode scores with
    VDPBF16PS), ``bf16_gemm`` (bfloat16 projections with VDPBF16PS, ``runtime/native/gemm.c``) and
    ``cflags``; None when it cannot be built."""
    lib = load_native()
    return None if lib is None else dict(lib.info)


def load_paged_decode():
    """The ctypes function ``kgen_paged_decode`` (see the C file), or None when it cannot be built;
    its ``openmp`` attribute says whether it threads over sequences itself."""
    if "fn" not in _loaded:
        lib, fn = load_native(), None
        if lib is not None:
            fn = lib.kgen_paged_decode
            fn.argtypes = ARGTYPES
            fn.restype = ctypes.c_int
            fn.openmp = lib.openmp
        _loaded["fn"] = fn
    return _loaded["fn"]


def why_unavailable() -> str | None:
    """Why :func:`load_paged_decode` gives None (after it has been called), else None."""
    load_paged_decode()
    return _loaded.get("why")
