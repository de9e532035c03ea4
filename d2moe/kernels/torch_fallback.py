"""The CPU path: dequantize nested planes with numpy byte lookup tables, in row chunks that
stay in cache, and multiply each chunk in torch; a torch-op path for other devices.

Bit for bit equal to `d2moe.quant.reference.dequantize_packed` (tested): the codes are exact
integers and the float32 operations are the reference's, in its order (bitplane:
code * s_b + z_b; MWQ: code * s + z, then + (+-a) per residual plane; ties and signed zeros
included, since -a and (-1) * a are the same float).

How the CPU path is fast without a cache of dequantized weights (which would sit outside
the byte budget):
- Codes without unpacking bit by bit: one 256-entry table maps a plane's byte (8 columns)
  to a uint64 holding those 8 bits in 8 byte lanes, pre-shifted to the plane's place in
  the code, so a code row is nbase `np.take` + `|` over uint64 (8 columns per element);
  viewed as uint8 the result is the code matrix (column 8k + t = byte t of element k).
- Planes row-major ([rows, words], `PlaneViews`): no transpose per run. The executor's CPU
  pool stores them so (executor/levels.py); a word-major `PackedExpertMatrix` is
  transposed once per call (1/8 byte per weight and plane).
- Row chunks of about `CHUNK_WEIGHTS` weights: codes, the float32 weights and the product
  of one chunk stay in cache; a large matrix never materialises in DRAM (and never pays
  first-touch page faults). Scratch buffers are per thread and reused: a fixed workspace
  of about 10 bytes per chunk weight (`workspace_bytes`), whatever the number of experts.
- Per-matrix float32 scale and zero prepared once per `PlaneViews` and bit-width
  (`PlaneViews.prepared`; the CPU pool keeps views across runs under a fixed byte cap).
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.kernels import cpu_native
from d2moe.kernels.packed import NestedGeometry

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.packed import PackedExpertMatrix

CHUNK_WEIGHTS = 1 << 18  # weights per row chunk: its float32 weights (1 MiB) stay in
# L2/L3; measured on a Mixtral w1 (14336x4096) at 4 bits, one thread: 88 ms a matrix at
# 2^18, 197 ms at 2^15 (Python and dispatch overhead per chunk), 119 ms at 2^20
_SCRATCH = threading.local()


@dataclass(frozen=True, eq=False)
class PlaneViews(NestedGeometry):
    """A [rows, cols] nested matrix on the CPU as per-plane numpy views (no stacking copy)."""

    kind: str  # mwq | bitplane
    b1: int
    bK: int
    group: int
    rows: int
    cols: int
    planes: tuple[np.ndarray, ...]  # int32 [rows, words] each, C-contiguous; bit t of
    # [n, w] is column 32w + t (row-major: the transpose of the kernels' word-major plane)
    scale: np.ndarray  # float16 [rows, groups], any strides
    zero: np.ndarray  # float16 [rows, groups]
    plane_scale: tuple[np.ndarray, ...]  # float16 [rows, groups] per residual plane (mwq)
    # bits -> its float32 parameters, built on first use. Valid while this object lives: its
    # views' bytes do not change under it (the pool makes a new one when a level moves).
    prepared: dict[int, _Params] = field(default_factory=dict, compare=False, repr=False)

    @property
    def bits_held(self) -> int:
        """Planes resident: the highest bit-width this object serves."""
        return len(self.planes)

    @functools.cached_property
    def planes_u8(self) -> tuple[np.ndarray, ...]:
        """The planes as uint8 [rows, words * 4] views (the byte tables' indices)."""
        return tuple(p.view(np.uint8) for p in self.planes)

    @property
    def device(self) -> torch.device:
        """Always the CPU."""
        import torch

        return torch.device("cpu")

    @classmethod
    def from_packed(cls, p: PackedExpertMatrix) -> PlaneViews:
        """Views of a CPU `PackedExpertMatrix` (its word-major planes transposed: a copy
        unless they already are transposed views of row-major arrays)."""
        if p.device.type != "cpu":
            raise UserError(f"PlaneViews are CPU views, got {p.device}", field="device",
                            fix="use the torch-op path (dequantize_fast) off the CPU")
        planes = tuple(np.ascontiguousarray(p.planes[j].t().numpy()) for j in range(p.bits_held))
        return cls(kind=p.kind, b1=p.b1, bK=p.bK, group=p.group, rows=p.rows, cols=p.cols,
                   planes=planes, scale=p.scale.t().numpy(), zero=p.zero.t().numpy(),
                   plane_scale=tuple(a.t().numpy() for a in p.plane_scale))


@functools.cache
def _spread_tables() -> np.ndarray:
    """uint64 [8, 256]: [s, v] holds bit t of byte v at bit 8t + s (byte lane t, place s)."""
    v = np.arange(256, dtype=np.uint64)
    lanes = np.zeros(256, dtype=np.uint64)
    for t in range(8):
        lanes |= ((v >> np.uint64(t)) & np.uint64(1)) << np.uint64(8 * t)
    return np.stack([lanes << np.uint64(s) for s in range(8)])


@functools.cache
def _sign_table() -> np.ndarray:
    """uint64 [256]: byte lane t of [v] is int8 +1 where bit t of v is set, else -1 (0xFF)."""
    v = np.arange(256, dtype=np.uint64)
    out = np.zeros(256, dtype=np.uint64)
    for t in range(8):
        bit = (v >> np.uint64(t)) & np.uint64(1)
        out |= np.where(bit == 1, np.uint64(1), np.uint64(0xFF)) << np.uint64(8 * t)
    return out


@functools.cache
def _spread_rows(nbase: int) -> tuple[np.ndarray, ...]:
    """The spread table of each plane of an nbase-bit code, plane 0 (the top bit) first."""
    return tuple(_spread_tables()[nbase - 1 - j] for j in range(nbase))


def prepared_nbytes(v: PlaneViews, bits: int) -> int:
    """Bytes of v's float32 parameters at `bits` (`PlaneViews.prepared`)."""
    return v.rows * v.groups * 4 * (2 + (bits - v.b1 if v.kind == "mwq" else 0))


def chunk_rows(v: PlaneViews) -> int:
    """Rows per chunk: about CHUNK_WEIGHTS weights (at least one row)."""
    return max(1, min(v.rows, CHUNK_WEIGHTS // max(1, v.groups * v.group)))


def workspace_bytes(v: PlaneViews) -> int:
    """Scratch bytes one thread holds for `v`: codes and lanes (1 byte per weight each),
    float32 weights and MWQ's +-a (4 each), per chunk; parameters for the whole matrix."""
    width = max(v.words * 32, v.groups * v.group)
    params = v.rows * v.groups * 4 * (2 + (len(v.plane_scale) if v.kind == "mwq" else 0))
    return chunk_rows(v) * width * (1 + 1 + 4 + 4) + params


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A per-thread reusable buffer of at least `shape` (contents undefined)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    need = math.prod(shape)
    buf = bufs.get((name, dtype))
    if buf is None or buf.size < need:
        buf = bufs[(name, dtype)] = np.empty(need, dtype=dtype)
    return buf[:need].reshape(shape)


@dataclass(frozen=True)
class _Params:
    """One matrix's per-group float32 parameters at one bit-width, [rows, groups, 1] each."""

    s: torch.Tensor  # code scale (bitplane: of the b-bit prefix)
    z: torch.Tensor  # zero point
    pscale: tuple[torch.Tensor, ...]  # MWQ: the residual planes' scales up to `bits`
    # the native kernel's argument block for this matrix and bit-width, by library
    # (`cpu_native.matmul`: built on first use, then copied per call)
    native: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def kept(cls, v: PlaneViews, bits: int) -> _Params:
        """v's parameters at `bits`, built on first use and kept in `v.prepared`."""
        params = v.prepared.get(bits)
        if params is None:
            params = v.prepared[bits] = cls.of(v, bits)
        return params

    @classmethod
    def of(cls, v: PlaneViews, bits: int) -> _Params:
        """Built from v's float16 parameters (reference: s_b = s 2^shift, z_b = z + s
        (2^shift - 1) / 2 for bitplane)."""
        import torch

        def f32(a: np.ndarray) -> torch.Tensor:  # C-contiguous: the native kernel's rows
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)[:, :, None])

        s, z = v.scale.astype(np.float32), v.zero.astype(np.float32)
        if v.kind == "bitplane":
            shift = v.bK - bits
            s, z = s * np.float32(2 ** shift), z + s * np.float32((2 ** shift - 1) / 2)
        pscale = tuple(f32(a) for a in v.plane_scale[:bits - v.b1]) if v.kind == "mwq" else ()
        return cls(f32(s), f32(z), pscale)


@dataclass(frozen=True)
class _Scratch:
    """This thread's scratch for one chunk geometry, as numpy and torch views (reused)."""

    code64: np.ndarray  # uint64 [step, width/8]: codes, 8 columns per element
    lane64: np.ndarray  # uint64, same shape: one plane's spread bits (MWQ: its +-1 signs)
    code: torch.Tensor  # uint8 [step, groups, group] view of code64
    w: torch.Tensor  # float32 [step, groups, group]
    signs: torch.Tensor | None  # int8 [step, groups, group] view of lane64 (MWQ)
    pm: torch.Tensor | None  # float32 [step, groups, group]: +-a of one plane (MWQ)

    @classmethod
    def get(cls, step: int, width: int, groups: int, group: int, mwq: bool) -> _Scratch:
        """Cached per thread and geometry; the buffers behind are shared between geometries
        (contents undefined on entry)."""
        import torch

        cache = getattr(_SCRATCH, "views", None)
        if cache is None:
            cache = _SCRATCH.views = {}
        key = (step, width, groups, group, mwq)
        hit = cache.get(key)
        if hit is not None:
            return hit
        shape = (step, width // 8 + (width % 8 > 0))
        code64, lane64 = _scratch("code", shape, np.uint64), _scratch("lane", shape, np.uint64)
        grouped, padded = (step, groups, group), groups * group
        out = cache[key] = cls(
            code64, lane64, torch.from_numpy(code64.view(np.uint8)[:, :padded].reshape(grouped)),
            torch.from_numpy(_scratch("w", grouped, np.float32)),
            torch.from_numpy(lane64.view(np.int8)[:, :padded].reshape(grouped)) if mwq else None,
            torch.from_numpy(_scratch("pm", grouped, np.float32)) if mwq else None)
        return out


class _Dequantizer:
    """One matrix at one bit-width, chunk by chunk: the per-group float32 parameters are
    built once per `PlaneViews` and bit-width, the codes and weights of a chunk go to
    per-thread scratch (measured on a 192x192 expert matrix, one token: rebuilding both on
    every call was about a quarter of the call)."""

    def __init__(self, v: PlaneViews, bits: int) -> None:
        if sys.byteorder != "little":
            raise UserError("the CPU fallback reads int32 planes as little-endian bytes",
                            field="byteorder", fix="run on a little-endian machine")
        v.check_bits(bits)
        self.v, self.bits = v, bits
        self.step = chunk_rows(v)
        self.nbase = bits if v.kind == "bitplane" else v.b1
        self.nbytes, self.padded = v.words * 4, v.groups * v.group
        mwq = v.kind == "mwq" and bits > v.b1
        sc = _Scratch.get(self.step, max(self.nbytes * 8, self.padded), v.groups, v.group, mwq)
        self.code64, self.lane64, self.code, self.w = sc.code64, sc.lane64, sc.code, sc.w
        self.signs, self.pm = sc.signs, sc.pm
        if self.nbytes < sc.code64.shape[1]:  # codes past the planes' words stay zero (the
            self.code64[:, self.nbytes:] = 0  # buffers are shared with other geometries)
            self.lane64[:, self.nbytes:] = 0
        params = _Params.kept(v, bits)
        self.s, self.z, self.pscale = params.s, params.z, params.pscale

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """float32 [r1 - r0, cols] weights of rows r0..r1 (a view of scratch: valid until the
        next call in this thread)."""
        import torch

        v, n, nb = self.v, r1 - r0, self.nbytes
        whole = r0 == 0 and n == v.rows  # a one-chunk matrix: no slices (per-call overhead)
        code_w, lane_w = self.code64[:n, :nb], self.lane64[:n, :nb]
        u8 = v.planes_u8
        for j, table in enumerate(_spread_rows(self.nbase)):  # plane j: bit nbase-1-j
            plane = u8[j] if whole else u8[j][r0:r1]
            if j == 0:  # (the method, not np.take: one wrapper less per call)
                table.take(plane, out=code_w, mode="clip")
            else:
                table.take(plane, out=lane_w, mode="clip")
                np.bitwise_or(code_w, lane_w, out=code_w)
        # The float part in torch: its broadcast over [n, groups, group] runs ~2.5x faster
        # than numpy's here (measured, one thread), and it uses torch's intra-op threads.
        w = self.w[:n]
        s, z = (self.s, self.z) if whole else (self.s[r0:r1], self.z[r0:r1])
        torch.mul(self.code[:n], s, out=w)  # uint8 -> float32 exact, one rounding
        w.add_(z)
        for q, a in enumerate(self.pscale):  # w = w + where(bit, a, -a), in plane order
            _sign_table().take(v.planes[v.b1 + q][r0:r1].view(np.uint8), out=lane_w,
                               mode="clip")
            pm = self.pm[:n]
            torch.mul(self.signs[:n], a[r0:r1], out=pm)  # +-1 * a == +-a exactly
            w.add_(pm)
        out = w.view(n, self.padded)
        return out if self.padded == v.cols else out[:, :v.cols]


def dequantize_views(v: PlaneViews, bits: int) -> np.ndarray:
    """float32 [rows, cols] weights at `bits` bits (a new array); equal to the reference."""
    deq = _Dequantizer(v, bits)
    out = np.empty((v.rows, v.cols), dtype=np.float32)
    for r0 in range(0, v.rows, deq.step):
        r1 = min(v.rows, r0 + deq.step)
        out[r0:r1] = deq.rows(r0, r1).numpy()
    return out


def matmul_views(x: torch.Tensor, v: PlaneViews, bits: int, *,
                 native: bool = True) -> torch.Tensor:
    """y = x @ W^T for CPU views; y in x.dtype. A few tokens go to the compiled fused kernel
    (`cpu_native`, within float32 rounding) where it runs and `native`; otherwise chunk by
    chunk, and then one chunk (a small matrix) is exactly `x.float() @ W.t()` with W dense."""
    import torch

    if x.device.type != "cpu":
        raise UserError(f"the CPU fallback got an input on {x.device}", field="device",
                        fix="keep x on the CPU with CPU-resident planes")
    lead, cols = x.shape[:-1], x.shape[-1]
    if cols != v.cols:
        raise UserError(f"x has {cols} columns, the matrix {v.cols}", field="shape",
                        fix="pass x with the matrix's input width")
    x2 = x if x.dim() == 2 else x.reshape(-1, cols)
    x2 = x2 if x2.dtype == torch.float32 else x2.float()
    if native and cpu_native.usable(v, x2.shape[0], bits):  # a few tokens: the fused kernel
        v.check_bits(bits)
        y = cpu_native.matmul(x2, v, bits, _Params.kept(v, bits))
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*lead, v.rows)
    deq = _Dequantizer(v, bits)
    if deq.step >= v.rows:
        return (x2 @ deq.rows(0, v.rows).t()).to(x.dtype).reshape(*lead, v.rows)
    y = torch.empty(v.rows, x2.shape[0], dtype=torch.float32)  # y^T: each chunk contiguous
    xt = x2.t()
    for r0 in range(0, v.rows, deq.step):
        r1 = min(v.rows, r0 + deq.step)
        torch.mm(deq.rows(r0, r1), xt, out=y[r0:r1])
    return y.t().to(x.dtype).reshape(*lead, v.rows)


def swiglu_views(x: torch.Tensor, w1: PlaneViews, w3: PlaneViews, w2: PlaneViews,
                 bits: int) -> torch.Tensor | None:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) for CPU views in one native call, y in x.dtype; None
    where the native kernel does not take all three (the caller then runs three products)."""
    import torch

    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    if (x.device.type != "cpu" or x.shape[-1] != w1.cols
            or not all(cpu_native.usable(v, tokens, bits) for v in (w1, w3, w2))):
        return None
    for v in (w1, w3, w2):
        v.check_bits(bits)
    x2 = x2.float().contiguous()
    y = cpu_native.swiglu(x2, (w1, w3, w2), bits,
                          tuple(_Params.kept(v, bits) for v in (w1, w3, w2)))
    y = y if x.dtype == torch.float32 else y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w2.rows)


def _plane_bits(words: torch.Tensor, rows: int, cols_padded: int) -> torch.Tensor:
    """int32 [words, rows] plane -> uint8 0/1 [rows, cols_padded] (column 32w + t = bit t)."""
    import torch

    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = ((words.t().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(rows, -1)
    return bits[:, :cols_padded]


def _dequantize_torch(p: PackedExpertMatrix, bits: int) -> torch.Tensor:
    """float32 [rows, cols] in torch ops on p's device (CUDA tensors the kernel can't take)."""
    import torch

    rows, g, groups = p.rows, p.group, p.groups
    padded = groups * g  # whole groups; may exceed words*32 when group > 32
    nbase = bits if p.kind == "bitplane" else p.b1

    def grouped_bits(j: int) -> torch.Tensor:
        b = _plane_bits(p.planes[j], rows, min(padded, p.words * 32))
        if b.shape[1] < padded:
            b = torch.nn.functional.pad(b, (0, padded - b.shape[1]))
        return b.reshape(rows, groups, g)

    code = grouped_bits(0).clone()  # uint8 codes: at most 8 bits
    for j in range(1, nbase):
        code = (code << 1) | grouped_bits(j)
    s = p.scale.t().float().unsqueeze(-1)  # [rows, groups, 1]
    z = p.zero.t().float().unsqueeze(-1)
    if p.kind == "bitplane":
        shift = p.bK - bits
        w = code.float() * (s * float(2 ** shift)) + (z + s * float((2 ** shift - 1) / 2))
    else:
        w = code.float() * s + z
        for q in range(bits - p.b1):
            a = p.plane_scale[q].t().float().unsqueeze(-1)
            w = w + torch.where(grouped_bits(p.b1 + q) != 0, a, -a)
    return w.reshape(rows, padded)[:, :p.cols]


def dequantize_fast(p: PackedExpertMatrix | PlaneViews, bits: int) -> torch.Tensor:
    """float32 [rows, cols] weights at `bits` bits; equal to the reference bit for bit."""
    import torch

    p.check_bits(bits)
    if isinstance(p, PlaneViews):
        return torch.from_numpy(dequantize_views(p, bits))
    if p.device.type == "cpu":
        return torch.from_numpy(dequantize_views(PlaneViews.from_packed(p), bits))
    return _dequantize_torch(p, bits)


def dequant_matmul(x: torch.Tensor, packed: PackedExpertMatrix | PlaneViews,
                   bits: int) -> torch.Tensor:
    """y = x @ W^T with W at `bits` bits; y in x.dtype (CPU: chunked, see the module doc)."""
    import torch

    packed.check_bits(bits)
    if isinstance(packed, PlaneViews):
        return matmul_views(x, packed, bits)
    if packed.device.type == "cpu" and x.device.type == "cpu":
        return matmul_views(x, PlaneViews.from_packed(packed), bits)
    w = _dequantize_torch(packed, bits)
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
        return x @ w.to(x.dtype).t()
    return (x.float() @ w.t()).to(x.dtype)
