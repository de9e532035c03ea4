"""Bytes of an expert at every bit-width: the one function the whole project uses.

MWQ layout (method.md, part 2), per matrix of shape [out, in] with groups of `group`
weights along `in`:
  base  : out*in*b1 bits of codes + one scale and one zero per group (scale_bytes each)
  plane : out*in*1 bit of signs   + one scale per group
`bitplane` (the top b bits of one bK-bit code, d2moe.quant.bitplane) has the same base and
planes of out*in*1 bit with no per-group scale.
An expert at b bits = base + (b - b1) planes. `copies` (Matryoshka-Free / RTN) stores each
bit-width as its own object: b-bit codes + scale and zero per group; raising means a full
reload. `dense` is the unquantized weights at `dtype_bytes`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from d2moe.core.errors import UserError, bare
from d2moe.core.spec import ModelSpec

DENSE_BITS = 16  # bits value that means "unquantized fp16/bf16 weights"


@dataclass(frozen=True)
class QuantLayout:
    """How expert weights are stored. Defaults: b1=2, bK=8, groups of 64, fp16 scales."""

    kind: str = "bitplane"  # bitplane | mwq (nested planes) | copies (one RTN copy per bit) | dense
    b1: int = 2
    bK: int = 8
    group: int = 64
    scale_bytes: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("mwq", "bitplane", "copies", "dense"):
            raise UserError(f"unknown layout {self.kind!r}", field="kind",
                            fix="use mwq, bitplane, copies or dense")
        if not 1 <= self.b1 <= self.bK <= 8:
            raise UserError(f"need 1 <= b1 <= bK <= 8, got b1={self.b1}, bK={self.bK}",
                            field="store-bits", fix=f"e.g. --store-bits {DEFAULT_STORE_BITS}")
        if self.group < 1:  # weights per scale: the byte counts divide by it
            raise UserError(f"must be >= 1, got {self.group}", field="group",
                            fix="e.g. --group 64")
        if self.scale_bytes != 2:  # stores, kernels and the quantizer all use fp16 scales
            raise UserError(f"scales are fp16 (2 bytes), got {self.scale_bytes}",
                            field="scale_bytes", fix="use 2")

    @property
    def nested(self) -> bool:
        return self.kind in ("mwq", "bitplane")

    def check_bits(self, bits: int) -> None:
        if self.kind == "dense":
            return
        if not self.b1 <= bits <= self.bK:
            raise UserError(f"{bits} bits is outside the store's range {self.b1}..{self.bK}",
                            field="bits", fix=f"ask for {self.b1}..{self.bK} bits")


# The default of every verb's stored bit range, `--store-bits B1:BK`: QuantLayout's defaults,
# written out for the options that take the range as one string.
DEFAULT_STORE_BITS = f"{QuantLayout.b1}:{QuantLayout.bK}"


def parse_bits_range(text: str, field: str = "store-bits") -> tuple[int, int]:
    """'2:8' -> (2, 8): the stored bit range b1:bK as one option; errors name the option
    `field`. Whether the range is valid (1 <= b1 <= bK <= 8) is QuantLayout's check
    (`layout_from_options`)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"cannot read {text!r} as a bit range", field=field,
                        fix=f"write B1:BK, e.g. --{field} {DEFAULT_STORE_BITS}")
    return int(m.group(1)), int(m.group(2))


def layout_from_options(kind: str, b1: int, bK: int, group: int = 64, *,
                        kind_option: str = "layout") -> QuantLayout:
    """The QuantLayout a verb's options describe, its errors naming that verb's options (the
    dataclass names its kind `kind`; `kind_option` is the verb's: layout, format). The range
    b1:bK is every verb's --store-bits, the name QuantLayout's own error gives it."""
    try:
        return QuantLayout(kind=kind, b1=b1, bK=bK, group=group)
    except UserError as exc:
        field = kind_option if exc.field == "kind" else exc.field
        raise UserError(bare(exc), field=field, fix=exc.fix) from None


def _matrix_bytes(out: int, inp: int, bits: int, layout: QuantLayout, dtype_bytes: int) -> int:
    if layout.kind == "dense" or bits >= DENSE_BITS:
        return out * inp * dtype_bytes
    groups = out * math.ceil(inp / layout.group)
    if layout.kind == "copies":
        return math.ceil(out * inp * bits / 8) + groups * 2 * layout.scale_bytes
    base = math.ceil(out * inp * layout.b1 / 8) + groups * 2 * layout.scale_bytes
    plane = math.ceil(out * inp / 8)
    if layout.kind == "mwq":  # binary residual planes carry one scale per group
        plane += groups * layout.scale_bytes
    return base + (bits - layout.b1) * plane


@lru_cache(maxsize=4096)
def expert_bytes(spec: ModelSpec, bits: int, layout: QuantLayout = QuantLayout()) -> int:
    """Bytes of one expert resident at `bits` (0 -> 0 bytes: absent)."""
    if bits <= 0:
        return 0
    if layout.kind != "dense" and bits < DENSE_BITS:
        layout.check_bits(bits)
    return sum(_matrix_bytes(o, i, bits, layout, spec.dtype_bytes) for o, i in spec.expert_shapes)


def load_bytes(spec: ModelSpec, bits_from: int, bits_to: int,
               layout: QuantLayout = QuantLayout()) -> int:
    """Bytes moved to raise an expert from `bits_from` to `bits_to` resident bits.

    Nested (MWQ): only the missing planes. Copies: the whole new copy (the old one is dropped).
    """
    if bits_to <= bits_from:
        return 0
    if layout.nested and bits_from > 0:
        return expert_bytes(spec, bits_to, layout) - expert_bytes(spec, bits_from, layout)
    return expert_bytes(spec, bits_to, layout)


def all_experts_bytes(spec: ModelSpec, bits: int, layout: QuantLayout = QuantLayout()) -> int:
    """Bytes of every expert of every layer at `bits` (what a 100% budget holds)."""
    return spec.layers * spec.experts * expert_bytes(spec, bits, layout)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, *, field: str = "bytes") -> int:
    """'6GiB', '512MB', '1e9', 1000 -> bytes; a UserError naming `field` for anything else,
    an overflow ('1e999') included."""
    return _bytes(text, field, "write bytes like 6GiB, 512MB or 1000000")


def parse_budget(text: str | int, total_bytes: int, *, field: str = "budget") -> int:
    """A budget as bytes ('6GiB'), a percentage ('40%') or a fraction ('0.4') of `total_bytes`.

    Percentages above 100% are allowed: the total is all experts at one bit-width, and a
    larger budget holds more (e.g. 200% for 8-bit experts when the total is at 4 bits).
    A bare number up to 1 is a fraction; above 1 it is bytes, so it must be whole: '1.5'
    (a share of 150% meant, or bytes?) is a UserError rather than 1 byte.
    """
    s = str(text).strip()
    fix = "write e.g. 6GiB, 40% or 0.4"
    if not (s.endswith("%") or re.fullmatch(r"0?\.\d+|1(\.0*)?", s)):
        return _bytes(s, field, fix, bare_fix=_BARE_BUDGET_FIX)
    try:
        share = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a budget", field=field, fix=fix) from None
    value = share * total_bytes
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{text!r} is not a finite share of 0% or more", field=field, fix=fix)
    return int(value)


_BARE_BUDGET_FIX = ("write a percentage for a share (150%) or whole bytes (2B, 2GiB); a bare "
                    "number above 1 counts bytes")


def _bytes(text: str | int, field: str, fix: str, *, bare_fix: str = "") -> int:
    """Bytes from an int or a number with an optional unit; `fix` goes in the UserError.
    A count of bytes (no unit, or B) that is not whole ('1.5', '2.5B') is an error, with
    `bare_fix` as its fix when given: it would be cut silently. With a larger unit the
    fraction of a byte left over ('0.1GiB') is dropped."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read {text!r} as a size", field=field, fix=fix)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    except ValueError:
        raise UserError(f"cannot read {text!r} as a size", field=field, fix=fix) from None
    if not math.isfinite(value):
        raise UserError(f"{text!r} is too large to be a size", field=field, fix=fix)
    if m.group(2).lower() in ("", "b") and value != int(value):
        msg = (f"{text!r} has no unit, so it counts bytes, and is not a whole number"
               if not m.group(2) else f"{text!r} is not a whole number of bytes")
        raise UserError(msg, field=field, fix=bare_fix or fix)
    return int(value)


def fmt_bytes(n: float) -> str:
    """`n` bytes for people: B, KiB, MiB, GiB or TiB (binary units, two decimals)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
