"""The CPU path's compiled kernel (`cpu_nested.c`): the fused nested product, 1-48 tokens,
in three forms (table lookups, bit-serial, dequantized in registers).

Built on first use with the machine's C compiler (`$CC`, else cc, gcc or clang) for this CPU
(`-march=native`; AVX-512 or AVX2, else no library) into the cache directory, keyed by the
source, the compiler and the CPU, and loaded with ctypes (which releases the interpreter
lock for the call: the executor's I/O lane runs beside it). Where no compiler works, or
`D2MOE_NATIVE=0`, the numpy path of `torch_fallback` runs instead; `status()` says which
and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from d2moe.core.fileio import cache_dir

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.torch_fallback import PlaneViews, _Params

SOURCE = Path(__file__).with_name("cpu_nested.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
MAX_PLANES = 16  # as in cpu_nested.c
FORM_BITSERIAL, FORM_REGISTER, FORM_LUT = 1, 2, 3  # as in cpu_nested.c


@dataclass(frozen=True)
class Routing:
    """Which form and which path run, by the build's vector width: table lookups at one
    token, or while tokens x bits is within lut_max_token_bits (0: no table form; groups of
    whole 32-column words only); else bit-serial while tokens, bits and tokens x bits are
    within the serial_ limits; else in registers; the numpy path above native_max_tokens."""

    serial_max_tokens: int
    serial_max_bits: int
    serial_max_token_bits: int
    native_max_tokens: int
    lut_max_token_bits: int = 0


# Measured on this VM (AMD EPYC, one thread, 2026-11-24 15:15-15:45 UTC, scratch timings;
# docs/results/kernels.md), Mixtral w1, LLaMA-MoE w1 and tiny shapes, 2-8 bits:
# - AVX-512: bit-serial 1.05-1.4x the register form at 2 bits and 1-3 tokens, and at 3 bits
#   and one token; tied at tokens x bits = 4-6 otherwise; 0.4x at 4 tokens and 8 bits. The
#   register form against the numpy path (dequantize a chunk, then one sgemm): 4-10x at
#   one token, 1.6-4.4x at 16-24 tokens, 1.06-1.7x at 48, 0.93-1.48x at 64.
# - AVX2 (built with -mno-avx512f): bit-serial 1.0-1.45x at one token, slower from two; the
#   register form 1.4-5.4x the numpy path up to 8 tokens, 0.89-1.7x at 16, 0.56-0.96x at 32.
# - table lookups, the AVX-512 build, measured on the Intel Xeon VM (family 6, model 167, one
#   thread, 2026-11-25 03:15-03:22 UTC, scratch timings against the faster of the two forms
#   above, same run): one token 1.4-2.1x (Mixtral w1), 2.2-3.3x (1024x1024), 1.4-1.6x
#   (tiny 192x192) at 2-8 bits; two tokens 1.07-1.6x up to 4 bits, 0.8-1.0x from 6; three
#   tokens 1.1-1.2x at 2 bits, 0.5-1.0x above; four tokens at 2 bits 0.97-1.06x. Since
#   04:35 UTC it takes up to 4 tokens a pass over the planes (LUT_TOKENS, their words and
#   shifts shared), 1.1-2.2x the one-token-at-a-time form from 2 tokens on: against the best
#   other form, 2 tokens 1.25-2.1x (Mixtral w1) and 1.33-1.45x (tiny) at 2-8 bits; 4 tokens
#   1.16-1.37x and 1.07-1.17x to 4 bits, 0.88-1.09x above; 8 tokens at 2 bits 1.22x and
#   0.92x.
# - table lookups, the AVX2 build (-mno-avx512f on the same Xeon: not timed on a CPU without
#   AVX-512): one token 1.48-1.60x (Mixtral w1), 1.47-1.72x (tiny) at 2-8 bits; with 4
#   tokens a pass (04:35), two tokens 1.16-1.37x at 2-8 bits, three 1.04-1.12x to 4 bits,
#   four 1.07x at 2 bits, 0.80-0.95x above.
ROUTING = {512: Routing(3, 3, 6, 48, lut_max_token_bits=16),
           256: Routing(1, MAX_PLANES, MAX_PLANES, 16, lut_max_token_bits=8)}


class NestedArgs(ctypes.Structure):
    """Field for field `NestedArgs` in cpu_nested.c."""

    _fields_ = [
        ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("words", ctypes.c_int64),
        ("group", ctypes.c_int64), ("groups", ctypes.c_int64), ("tokens", ctypes.c_int64),
        ("nbase", ctypes.c_int64), ("nres", ctypes.c_int64), ("form", ctypes.c_int64),
        ("planes", ctypes.c_void_p * MAX_PLANES),
        ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
        ("plane_scale", ctypes.c_void_p * MAX_PLANES),
        ("x", ctypes.c_void_p), ("y", ctypes.c_void_p),
    ]


def _compiler() -> str | None:
    """The C compiler's path: $CC, else the first of cc, gcc, clang on PATH; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the machine."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(keep)


def build(cc: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The library's path, compiled first when the cache lacks it (temp file, then rename:
    a build killed half-way leaves no library behind). OSError when the compiler fails."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(flags),
                                    _cpu_tag()]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_nested-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".cpu_nested-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:  # the first error says why; later ones follow from it
            lines = done.stderr.strip().splitlines() or ["no output"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            raise OSError(f"{cc} failed: {first.strip()[:300]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def open_library(path: Path) -> ctypes.CDLL:
    """The built library with its entry points typed."""
    lib = ctypes.CDLL(str(path))
    lib.nested_rows.argtypes = [ctypes.POINTER(NestedArgs), ctypes.c_int64, ctypes.c_int64]
    lib.nested_rows.restype = ctypes.c_int
    lib.nested_swiglu.argtypes = [ctypes.POINTER(NestedArgs)] * 3
    lib.nested_swiglu.restype = ctypes.c_int
    lib.nested_vector_bits.argtypes = []
    lib.nested_vector_bits.restype = ctypes.c_int
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library or None, what runs and why), once per process."""
    if os.environ.get("D2MOE_NATIVE", "1") == "0":
        return None, "numpy (D2MOE_NATIVE=0)"
    cc = _compiler()
    if cc is None:
        return None, "numpy (no C compiler: set CC, or install cc)"
    try:
        lib = open_library(build(cc))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"numpy (the native kernel did not build: {exc})"
    return lib, f"native ({Path(cc).name} {' '.join(FLAGS[:2])})"


def status() -> str:
    """Which CPU kernel runs ("native (...)" or "numpy (why)"); builds it on first call."""
    return _load()[1]


def kernel_name() -> str:
    """What a profile records of the CPU kernel it measured, whose speeds differ 1.4-6x:
    "native+lut" (the compiled kernel with its table-lookup form), "numpy", or, in profiles
    measured before that form (2026-11-25), "native"."""
    return "native+lut" if _load()[0] is not None else "numpy"


def routing(lib: ctypes.CDLL | None = None) -> Routing:
    """The routing of `lib` (default: this process's library) by its vector width."""
    lib = lib or _load()[0]
    return ROUTING[_vector_bits(lib)] if lib is not None else ROUTING[512]


@functools.cache
def _vector_bits(lib: ctypes.CDLL) -> int:
    return lib.nested_vector_bits()


def usable(v: PlaneViews, tokens: int, bits: int) -> bool:
    """Whether the fused kernel takes this matrix and is the faster path for this many
    tokens (`Routing.native_max_tokens`)."""
    lib = _load()[0]
    return (lib is not None and tokens <= routing(lib).native_max_tokens
            and v.group % 16 == 0 and v.bits_held <= MAX_PLANES
            and all(p.flags.c_contiguous for p in v.planes))


def form(tokens: int, bits: int, lib: ctypes.CDLL | None = None, group: int = 64) -> int:
    """The kernel's faster form for `tokens` at `bits` on `lib`'s vector width, for a matrix
    quantized in groups of `group` columns."""
    r = routing(lib)
    if r.lut_max_token_bits and group % 32 == 0 and (
            tokens == 1 or tokens * bits <= r.lut_max_token_bits):
        return FORM_LUT
    serial = (tokens <= r.serial_max_tokens and bits <= r.serial_max_bits
              and tokens * bits <= r.serial_max_token_bits)
    return FORM_BITSERIAL if serial else FORM_REGISTER


def matmul(x2: torch.Tensor, v: PlaneViews, bits: int, params: _Params, *,
           out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None,
           form: int | None = None) -> torch.Tensor:
    """float32 [tokens, rows] = x2 @ W^T, x2 float32 [tokens, cols] (`usable` checked);
    into `out` when given, with `lib` when given (a test's build), else this process's; in
    `form` when given (FORM_BITSERIAL, FORM_REGISTER or FORM_LUT; FORM_LUT where the build
    or the groups cannot take it: bit-serial), else the faster one."""
    import torch

    lib = lib or _load()[0]
    x2 = x2.contiguous()
    tokens = x2.shape[0]
    if tokens < 1 or x2.dtype != torch.float32:
        raise ValueError(f"the native kernel takes float32 rows, got {tokens} {x2.dtype}")
    y = torch.empty(tokens, v.rows, dtype=torch.float32) if out is None else out
    if y.shape != (tokens, v.rows) or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {(tokens, v.rows)}, got "
                         f"{tuple(y.shape)} {y.dtype}")
    args = _args(lib, v, bits, params, tokens, x2.data_ptr(), y.data_ptr(), form)
    if lib.nested_rows(ctypes.byref(args), 0, v.rows) != 0:
        raise MemoryError("the native CPU kernel could not allocate its scratch")
    return y


def swiglu(x2: torch.Tensor, mats: tuple[PlaneViews, PlaneViews, PlaneViews], bits: int,
           params: tuple[_Params, _Params, _Params], *,
           lib: ctypes.CDLL | None = None, form: int | None = None) -> torch.Tensor:
    """float32 [tokens, w2.rows] = w2 @ (silu(w1 @ x) * (w3 @ x)), x2 float32 [tokens, cols]
    contiguous, (w1, w3, w2) = `mats` (`usable` checked for each): one C call, no tensors
    between the three products but two [tokens, ffn] buffers. `lib`, `form` as `matmul`."""
    import torch

    lib = lib or _load()[0]
    (v1, v3, v2), (p1, p3, p2), tokens = mats, params, x2.shape[0]
    if tokens < 1 or x2.dtype != torch.float32 or not x2.is_contiguous():
        raise ValueError(f"the native kernel takes contiguous float32 rows, got {tokens} "
                         f"{x2.dtype}")
    if v1.rows != v3.rows or v2.cols != v1.rows or v1.cols != v3.cols:
        raise ValueError(f"not one SwiGLU expert: w1 {v1.rows}x{v1.cols}, w3 "
                         f"{v3.rows}x{v3.cols}, w2 {v2.rows}x{v2.cols}")
    h = torch.empty(2, tokens, v1.rows, dtype=torch.float32)
    y = torch.empty(tokens, v2.rows, dtype=torch.float32)
    x, g, u = x2.data_ptr(), h[0].data_ptr(), h[1].data_ptr()
    a1 = _args(lib, v1, bits, p1, tokens, x, g, form)
    a3 = _args(lib, v3, bits, p3, tokens, x, u, form)
    a2 = _args(lib, v2, bits, p2, tokens, g, y.data_ptr(), form)
    if lib.nested_swiglu(ctypes.byref(a1), ctypes.byref(a3), ctypes.byref(a2)) != 0:
        raise MemoryError("the native CPU kernel could not allocate its scratch")
    return y


def _args(lib: ctypes.CDLL, v: PlaneViews, bits: int, params: _Params, tokens: int,
          x: int, y: int, form_: int | None) -> NestedArgs:
    """The call's argument block: v's at `bits` (built once, kept in `params`) copied, with
    this call's tokens, form and x and y pointers (a copy per call: safe from several
    threads)."""
    block = params.native.get(lib._handle)
    if block is None:
        block = params.native[lib._handle] = _block(v, bits, params)
    args = NestedArgs.from_buffer_copy(block)
    args.tokens, args.x, args.y = tokens, x, y
    args.form = form(tokens, bits, lib, v.group) if form_ is None else form_
    return args


def _block(v: PlaneViews, bits: int, params: _Params) -> NestedArgs:
    """v's argument block at `bits`, without the call's tokens, x and y (the pointers stay
    valid while `params` and `v` live: `params` is kept in `v.prepared`)."""
    nbase = bits if v.kind == "bitplane" else v.b1
    args = NestedArgs(rows=v.rows, cols=v.cols, words=v.words, group=v.group, groups=v.groups,
                      nbase=nbase, nres=bits - nbase, scale=params.s.data_ptr(),
                      zero=params.z.data_ptr())
    for j in range(bits):
        args.planes[j] = v.planes[j].ctypes.data
    for q, a in enumerate(params.pscale):
        args.plane_scale[q] = a.data_ptr()
    return args
