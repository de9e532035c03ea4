"""Launch wrappers of the Triton nested kernels (`triton_nested.py`): check, allocate, launch.

`nested_matmul` (y = x @ W^T, GEMV or tl.dot path by token count) and `gate_up` (an expert's
h = silu(x W1^T) * (x W3^T), one launch for up to GEMV_MAX_TOKENS tokens); `gemv_launch` and
`gate_up_launch` return a launch's arguments without running it (`benchmarks/kernels_sass.py`
compiles them for a GPU target without one). Launch parameters live in `KernelConfig`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from d2moe.core.errors import UserError
from d2moe.kernels.triton_nested import (
    HALF,
    MAGIC,
    _gate_up_gemv_kernel,
    _nested_dot_kernel,
    _nested_gemv_kernel,
)

if TYPE_CHECKING:
    from d2moe.kernels.packed import PackedExpertMatrix

KIND_CODES = {"mwq": 0, "bitplane": 1}


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one path (block_w counts int32 words: 32 columns each)."""

    block_n: int = 128
    block_w: int = 8
    block_m: int = 1  # tokens per program (GEMV path: 1..16; dot path: >= 16)
    split_k: int = 0  # GEMV path: programs along K; 0 = auto_split (about 16 per SM)
    num_warps: int = 4
    num_stages: int = 2
    pipeline: int = 0  # GEMV path: 0 = prefetch one tile by hand; >= 2 = tl.range stages
    flat: bool = True  # GEMV path, one-word tiles: 2-D tensors (False: the earlier 3-D form)

    def __post_init__(self) -> None:
        # tl.arange's sizes: powers of two; caps far above any useful tile, under Triton's
        # limit of 2^20 elements per tensor
        for name, cap in (("block_n", 4096), ("block_w", 64), ("block_m", 256),
                          ("num_warps", 32)):
            v = getattr(self, name)
            if type(v) is not int or v < 1 or v > cap or v & (v - 1):
                raise UserError(f"must be a power of two in 1..{cap}, got {v!r}", field=name,
                                fix="e.g. 1, 2, 4, ...")
        if not isinstance(self.flat, bool):
            raise UserError(f"must be true or false, got {self.flat!r}", field="flat",
                            fix="flat=True")
        for name, least in (("split_k", 0), ("num_stages", 1), ("pipeline", 0)):
            v = getattr(self, name)
            if type(v) is not int or v < least:
                raise UserError(f"must be a whole number >= {least}, got {v!r}", field=name,
                                fix=f"e.g. {max(least, 2)}")


# GEMV defaults: from SASS counts per weight (benchmarks/kernels_sass.py) and H100 sweeps
# (docs/results/kernels.md): 512 rows x 1 word x 4 warps was among the three fastest in five
# of the six Mixtral (shape, 2/4/8-bit) cases; Triton's pipeliner at 2 stages with the
# split of auto_split beat the one-tile prefetch by hand, 1.39x geomean at 1 token and
# 1.28x at 4 over 12 cases each (0.95x at worst: Mixtral w2 at 4 bits). Those timings came
# before `_decode_w1`, which removed layout conversions from both variants' loops (compiler
# output; the choice between them is to be re-timed with `--tune-set pipeline`).
GEMV_CONFIG = KernelConfig(block_n=512, block_w=1, block_m=1, num_warps=4, pipeline=2)
GEMV_FEW_CONFIG = KernelConfig(block_n=256, block_w=1, block_m=4, num_warps=4, pipeline=2)
DOT_CONFIG = KernelConfig(block_n=64, block_w=4, block_m=16, split_k=1, num_warps=4,
                          num_stages=3)
GEMV_MAX_TOKENS = 4  # up to this many tokens: decode once per tile, one FMA per token
PATHS = ("auto", "gemv", "dot")


def bits_code(packed: PackedExpertMatrix, bits: int) -> int:
    """Bits of the integer code the kernels decode: all of them for bitplane, b1 for mwq."""
    return bits if packed.kind == "bitplane" else packed.b1


X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # tl.dot takes no float64


def check_inputs(x: torch.Tensor, packed: PackedExpertMatrix, bits: int) -> int:
    """Shape, dtype, device and layout checks shared by both paths (UserError on bad input);
    returns `bits` as a Python int (the kernels take it as a compile-time constant)."""
    try:
        bits = operator.index(bits)
    except TypeError:
        raise UserError(f"bits must be a whole number, got {bits!r}", field="bits",
                        fix="e.g. 4") from None
    packed.check_bits(bits)
    if not isinstance(x, torch.Tensor) or x.dtype not in X_DTYPES:
        raise UserError(f"x must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}", field="x",
                        fix="pass the activations as floats")
    if x.dim() != 2 or x.shape[1] != packed.cols:
        raise UserError(f"x has shape {tuple(x.shape)}, expected [tokens, {packed.cols}]",
                        field="x", fix="pass a 2-D activation matching the matrix's columns")
    if x.device != packed.device:
        raise UserError(f"x on {x.device}, weights on {packed.device}", field="x",
                        fix="move both to one device")
    g = packed.group
    if g < 32 or g & (g - 1):
        raise UserError(f"the Triton kernels need a power-of-two group >= 32, got {g}",
                        field="group", fix="use --group 32, 64 or 128, or the torch backend")
    return bits


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough


def _cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python: `triton.cdiv` is a constexpr function whose call
    from Python costs microseconds (nine of them were half of this wrapper's host time)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python (see `_cdiv`)."""
    return 1 << (n - 1).bit_length()


def auto_split(programs: int, words: int, cfg: KernelConfig, device: torch.device,
               sms: int | None = None) -> int:
    """K slices so that about 16 programs per SM run, each keeping >= 2 tiles of work.

    Measured on an H100 (docs/results/kernels.md, `--tune-set pipeline`): against four
    programs per SM with >= 4 tiles each, 1.29x geomean over Mixtral and LLaMA-MoE shapes at
    1 token (1.39x with the pipelined loop): the GEMV is latency-bound, not issue-bound."""
    if cfg.split_k:
        return cfg.split_k
    want = _cdiv(16 * (sms or _sm_count(device)), programs)
    return max(1, min(want, words // (2 * cfg.block_w)))


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, ...]:
    """Split-K scratch for this device and stream, grown on demand: zeroed once, and the
    kernel leaves it zeroed, so calls on one stream reuse it (graph replays too)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, counts = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or counts.numel() < tiles:
        ws = torch.zeros(max(floats, 1 << 16), device=device, dtype=torch.float32)
        counts = torch.zeros(max(tiles, 1 << 12), device=device, dtype=torch.int32)
        _WORKSPACES[key] = ws, counts
    return ws, counts


def _plane_args(planes: torch.Tensor | tuple[torch.Tensor, ...], count: int,
                itemsize: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the first plane, element offsets of planes 0..count-1 from it): of a stacked tensor
    its stride; of separate tensors, their addresses (one allocation: the pool's arena)."""
    if isinstance(planes, torch.Tensor):
        return planes, tuple(j * planes.stride(0) for j in range(count))
    base = planes[0].data_ptr()
    return planes[0], tuple((planes[j].data_ptr() - base) // itemsize for j in range(count))


def _pscale_args(packed: PackedExpertMatrix, bits: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """MWQ's plane scales as `_plane_args` gives planes (the scale tensor, never read, else)."""
    if packed.kind == "mwq" and bits > packed.b1:
        return _plane_args(packed.plane_scale, bits - packed.b1, 2)
    return packed.scale, (0,)


def gemv_config(m_tokens: int) -> KernelConfig:
    """The default launch of the GEMV path for `m_tokens` tokens (<= GEMV_MAX_TOKENS)."""
    return GEMV_CONFIG if m_tokens == 1 else GEMV_FEW_CONFIG


def matrix_args(packed: PackedExpertMatrix, bits: int) -> tuple:
    """A matrix's kernel arguments: planes, scale, zero, plane scales, and the offsets."""
    planes_arg, plane_offs = _plane_args(packed.planes, bits, 4)
    pscale_arg, pscale_offs = _pscale_args(packed, bits)
    return planes_arg, packed.scale, packed.zero, pscale_arg, plane_offs, pscale_offs


def gemv_grid(x: torch.Tensor, packed: PackedExpertMatrix, bits: int, cfg: KernelConfig, *,
              sms: int | None = None, asm: bool | None = None,
              matrices: int = 1) -> tuple[tuple[int, int, int], tuple, tuple, dict]:
    """What every GEMV launch over `packed`'s shape shares: (grid, (workspace, counters) for
    `matrices` fp32 partial sums, (N, K, KW, words per split), keyword arguments)."""
    m_tokens, (n, k), kw = x.shape[0], (packed.rows, packed.cols), packed.words
    block_m = min(_pow2(m_tokens), max(cfg.block_m, 1), GEMV_MAX_TOKENS)
    grid_nm = _cdiv(n, cfg.block_n) * _cdiv(m_tokens, block_m)
    split = auto_split(grid_nm, kw, cfg, x.device, sms)
    words_per_split = _cdiv(_cdiv(kw, split), cfg.block_w) * cfg.block_w
    split = _cdiv(kw, words_per_split)
    grid = (_cdiv(n, cfg.block_n), split, _cdiv(m_tokens, block_m))
    ws = _workspace(x.device, matrices * m_tokens * n, grid[0] * grid[2])
    even = (n % cfg.block_n == 0 and k % 32 == 0 and kw % words_per_split == 0
            and words_per_split % cfg.block_w == 0)
    kwargs = dict(KIND=KIND_CODES[packed.kind], BITS=bits, B1=packed.b1, BK=packed.bK,
                  GROUP=packed.group, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                  BLOCK_W=cfg.block_w, SPLIT_K=split, EVEN=even,
                  EVEN_M=m_tokens % block_m == 0, PIPELINE=cfg.pipeline, FLAT=cfg.flat,
                  ASM=x.is_cuda if asm is None else asm,
                  magic_bits=(HALF if bits_code(packed, bits) <= 7 else MAGIC).value,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grid, ws, (n, k, kw, words_per_split), kwargs


def gemv_launch(x: torch.Tensor, packed: PackedExpertMatrix, bits: int, out: torch.Tensor,
                cfg: KernelConfig, *, sms: int | None = None,
                asm: bool | None = None) -> tuple[tuple[int, int, int], tuple, dict]:
    """The GEMV kernel's (grid, positional args, keyword args) for out = x @ W^T:
    `nested_matmul` launches them, `benchmarks/kernels_sass.py` compiles them for a GPU
    without one. `sms`: the SM count the split aims at (default: x's device's); `asm`: PTX
    inline assembly (default: on CUDA)."""
    grid, ws, sizes, kwargs = gemv_grid(x, packed, bits, cfg, sms=sms, asm=asm)
    args = (x, out, x.shape[0], x.stride(0), out.stride(0), *ws, *matrix_args(packed, bits),
            *sizes)
    return grid, args, kwargs


def output(x: torch.Tensor, rows: int, out: torch.Tensor | None) -> torch.Tensor:
    """`out`, checked to be [tokens, rows] in x's dtype with unit column stride, or a new one."""
    m_tokens = x.shape[0]
    if out is None:
        return torch.empty((m_tokens, rows), device=x.device, dtype=x.dtype)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"out is a {type(out).__name__}, not a tensor", field="out",
                        fix="pass a tensor, or no out")
    if out.shape != (m_tokens, rows) or out.dtype != x.dtype or out.stride(1) != 1 \
            or (m_tokens > 1 and out.stride(0) < rows) or out.device != x.device \
            or out.requires_grad:
        raise UserError(f"out is {tuple(out.shape)} {out.dtype} on {out.device} with strides "
                        f"{out.stride()}, expected ({m_tokens}, {rows}) {x.dtype} on {x.device}, "
                        "rows apart, no grad", field="out", fix="pass a matching out")
    if _overlap(out, x):
        raise UserError("out overlaps x in memory: the kernel reads x while writing out",
                        field="out", fix="pass a separate out")
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte spans of two tensors' elements intersect (same device)."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def nested_matmul(x: torch.Tensor, packed: PackedExpertMatrix, bits: int,
                  out: torch.Tensor | None = None, config: KernelConfig | None = None,
                  path: str = "auto") -> torch.Tensor:
    """y = x @ W^T with W read at `bits` bits; x [M, K] (fp16/bf16/fp32) -> y [M, N] x.dtype."""
    if path not in PATHS:
        raise UserError(f"unknown kernel path {path!r}", field="path",
                        fix=f"use one of {', '.join(PATHS)}")
    bits = check_inputs(x, packed, bits)
    m_tokens = x.shape[0]
    gemv = path == "gemv" or (path == "auto" and m_tokens <= GEMV_MAX_TOKENS)
    cfg = config or (gemv_config(m_tokens) if gemv else DOT_CONFIG)
    x = x.contiguous()
    out = output(x, packed.rows, out)
    if m_tokens == 0:
        return out
    if gemv:
        grid, args, kwargs = gemv_launch(x, packed, bits, out, cfg)
        _nested_gemv_kernel[grid](*args, **kwargs)
        return out
    block_m = max(16, cfg.block_m)
    grid = (_cdiv(packed.rows, cfg.block_n), _cdiv(m_tokens, block_m))
    _nested_dot_kernel[grid](
        x, out, m_tokens, x.stride(0), out.stride(0), *matrix_args(packed, bits),
        packed.rows, packed.cols, packed.words,
        KIND=KIND_CODES[packed.kind], BITS=bits, B1=packed.b1, BK=packed.bK,
        GROUP=packed.group, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gate_up_launch(x: torch.Tensor, w1: PackedExpertMatrix, w3: PackedExpertMatrix,
                   bits: int, out: torch.Tensor, cfg: KernelConfig, *,
                   sms: int | None = None,
                   asm: bool | None = None) -> tuple[tuple[int, int, int], tuple, dict]:
    """`_gate_up_gemv_kernel`'s (grid, positional args, keyword args) for out = silu(x W1^T)
    * (x W3^T); the split and tiling of `gemv_launch` on w1 (each program then carries two
    load streams). `pipeline=0` (the by-hand prefetch) runs here as one stage."""
    grid, ws, sizes, kwargs = gemv_grid(x, w1, bits, cfg, sms=sms, asm=asm, matrices=2)
    kwargs["PIPELINE"] = max(cfg.pipeline, 1)
    args = (x, out, x.shape[0], x.stride(0), out.stride(0), *ws, *matrix_args(w1, bits),
            *matrix_args(w3, bits), *sizes)
    return grid, args, kwargs


def gate_up(x: torch.Tensor, w1: PackedExpertMatrix, w3: PackedExpertMatrix, bits: int,
            out: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> torch.Tensor:
    """h = silu(x W1^T) * (x W3^T), [M, N] in x.dtype, w1 and w3 read at `bits` bits: one
    launch up to GEMV_MAX_TOKENS tokens (`config`: its GEMV launch); beyond, two tl.dot
    launches and the product in torch (there the products' time, not the launches', rules)."""
    bits = check_inputs(x, w1, bits)
    same = ("kind", "b1", "bK", "group", "rows", "cols")
    if any(getattr(w1, f) != getattr(w3, f) for f in same) or w3.device != w1.device:
        raise UserError(
            f"w1 and w3 differ in shape, format or device: {[getattr(w1, f) for f in same]} "
            f"on {w1.device} against {[getattr(w3, f) for f in same]} on {w3.device} "
            f"({', '.join(same)})", field="w3",
            fix="pass one expert's gate and up projections, quantized together")
    w3.check_bits(bits)  # x's checks against w1 hold for w3: same shape, format, device
    m_tokens = x.shape[0]
    x = x.contiguous()
    out = output(x, w1.rows, out)
    if m_tokens == 0:
        return out
    if m_tokens > GEMV_MAX_TOKENS:
        g = nested_matmul(x, w1, bits)
        return torch.mul(torch.nn.functional.silu(g), nested_matmul(x, w3, bits), out=out)
    grid, args, kwargs = gate_up_launch(x, w1, w3, bits, out, config or gemv_config(m_tokens))
    _gate_up_gemv_kernel[grid](*args, **kwargs)
    return out
