"""Build and load the CPU kernels (``runtime/native/paged_decode.c``, ``layer_ops.c``) on first use.

The C files need no torch or Python headers, so they build in about a second into one library
with the system C compiler (``$CC``, else ``cc``): ``-O3 -march=native -ffast-math -fopenmp``
(vectorized ``expf`` from glibc's libmvec; OpenMP threads from the ``libgomp.so.1`` torch has
already loaded), else the same without OpenMP, else without libmvec, whichever first builds and
loads; linked without ``-ffast-math`` so that the process's floating-point mode is never changed
(GCC 12 would otherwise link ``crtfastmath.o``, which turns on flush-to-zero for the whole
process). The library lands in ``$KGEN_CACHE_DIR/native`` (default ``~/.cache/kgen/native``)
under a name hashed from the sources, the flags, the compiler and the CPU, written to a temporary
file and renamed, so concurrent builds never see half a file.

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

SOURCES = tuple(Path(__file__).resolve().parent / "native" / name for name in ("paged_decode.c", "layer_ops.c"))
FLAG_SETS = (  # tried in order: OpenMP threads and vectorized expf, then without OpenMP, then plain libm
    (["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"], ["-fopenmp", "-lmvec", "-lm"]),
    (["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC"], ["-lmvec", "-lm"]),
    (["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC"], ["-lm"]),
)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ARGTYPES = [_P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _F, _F, _P, _P, _I, _I]

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


def _build(cc: str, version: str, cflags: list[str], libs: list[str]) -> Path:
    """The library of every file of ``SOURCES`` built with these flags (cached by content)."""
    sources = [p.read_text() for p in SOURCES]
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
            try:
                lib = ctypes.CDLL(str(_build(cc, version, cflags, libs)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                errors.append(str(err))
                continue
            lib.openmp = bool(lib.kgen_paged_decode_openmp())
            break
        if lib is None:
            _loaded["why"] = "the CPU kernels could not be built (" + " | ".join(errors) + ")"
    _loaded["lib"] = lib
    return lib


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
