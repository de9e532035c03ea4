"""The compiled CPU kernel (cpu_nested.c): the fused nested product equals the dequantized
product within float32 rounding, in its three forms (table lookups, bit-serial, dequantized in
registers), in
its AVX-512 and AVX2 builds, for token counts inside and across its token blocks; the numpy
path takes over where it cannot run or is faster, and says why."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest

from d2moe.core.sizes import QuantLayout
from d2moe.quant.nested import quantize_matrix

torch = pytest.importorskip("torch")
from d2moe.kernels import cpu_native as cn  # noqa: E402
from d2moe.kernels import torch_fallback as tf  # noqa: E402
from d2moe.kernels.packed import plane_words  # noqa: E402
from d2moe.quant.reference import dequantize  # noqa: E402

needs_native = pytest.mark.skipif(cn._compiler() is None, reason="no C compiler")

# (rows, cols, group): whole words; a partial word; a partial group and word; groups of 16,
# 48 (not a multiple of a word), 128 (wider than the matrix's last word); for the table form,
# rows in three blocks of 16 (the last partial) and words in three of 16 (the last partial),
# 18 groups (two blocks of its scale transpose)
SHAPES = [(7, 128, 64), (5, 100, 32), (9, 200, 64), (4, 80, 16), (6, 150, 48), (3, 40, 128),
          (37, 1100, 64)]
FORMS = (cn.FORM_BITSERIAL, cn.FORM_REGISTER, cn.FORM_LUT)


def _views(kind: str, rows: int, cols: int, group: int, b1: int, bK: int, seed: int):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind=kind, b1=b1, bK=bK, group=group))
    v = tf.PlaneViews(kind=m.kind, b1=m.b1, bK=m.bK, group=m.group, rows=m.rows, cols=m.cols,
                      planes=tuple(plane_words(m.planes[j], m.rows, m.cols)
                                   for j in range(m.bits_stored)),
                      scale=m.scale, zero=m.zero, plane_scale=tuple(m.plane_scale))
    return m, v


def _check(lib, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i, (rows, cols, group) in enumerate(SHAPES):
        for b1, bK in [(2, 8), (1, 3), (3, 5)]:
            m, v = _views(kind, rows, cols, group, b1, bK, seed=seed + i)
            for b in range(b1, bK + 1):
                w = dequantize(m, b).double()
                # one token block, or several and a part (blocks of 6 or 8 tokens a pass)
                for tokens in (int(rng.integers(1, 9)), int(rng.integers(9, 21))):
                    x = torch.from_numpy(rng.standard_normal((tokens, cols)).astype(np.float32))
                    ref = x.double() @ w.t()
                    scale = float((x.double().abs() @ w.abs().t()).max())
                    for form in FORMS:  # (FORM_LUT on groups of 16 or 48: bit-serial)
                        out = torch.full((tokens, rows), float("nan"))  # poisoned
                        y = cn.matmul(x, v, b, tf._Params.kept(v, b), out=out, lib=lib,
                                      form=form)
                        err = float((y.double() - ref).abs().max())
                        assert err <= 1e-5 * scale, (kind, rows, cols, group, b1, bK, b,
                                                     tokens, form, err)


@needs_native
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_native_product_equals_the_dequantized_product(kind):
    lib = cn._load()[0]
    assert lib is not None, cn.status()
    assert lib.nested_vector_bits() == (512 if "avx512f" in _cpu_flags() else 256)
    _check(lib, kind, seed=int.from_bytes(os.urandom(2), "little"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")


@needs_native
@x86
@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="no AVX2 on this CPU")
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_avx2_build_equals_the_dequantized_product(kind):
    """The AVX2 path (machines without AVX-512), built here with AVX-512 turned off."""
    lib = cn.open_library(cn.build(cn._compiler(), cn.FLAGS + ("-mno-avx512f",)))
    assert lib.nested_vector_bits() == 256
    _check(lib, kind, seed=int.from_bytes(os.urandom(2), "little"))


@needs_native
@x86
def test_a_cpu_without_avx2_gets_no_library_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="needs AVX2 or AVX-512"):
        cn.build(cn._compiler(), cn.FLAGS + ("-mno-avx512f", "-mno-avx2"))
    assert [p for p in (tmp_path / "kernels").iterdir()] == []  # no half-built library


@needs_native
def test_matmul_views_takes_the_native_kernel_up_to_its_token_limit(monkeypatch):
    m, v = _views("mwq", 33, 256, 64, 2, 6, seed=1)
    top = cn.routing().native_max_tokens
    calls = []
    real = cn.matmul
    monkeypatch.setattr(cn, "matmul", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    w = dequantize(m, 4).double()
    for tokens in (1, top, top + 1):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        y = tf.matmul_views(x, v, 4)
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, 33)
        ref = x.double() @ w.t()
        assert float((y.double() - ref).abs().max()) < 0.02 * float(ref.abs().max())
    assert calls == [1, top]  # more tokens: dequantize, then one sgemm
    _, odd = _views("mwq", 5, 100, 40, 2, 4, seed=2)  # group 40: not 16 columns a mask
    assert not cn.usable(odd, 1, 4) and cn.usable(v, 1, 4)


def test_the_form_follows_the_measured_routing():
    r512, r256 = cn.ROUTING[512], cn.ROUTING[256]
    assert r512.native_max_tokens > r256.native_max_tokens >= 8
    serial = {(t, b) for t in range(1, 9) for b in range(1, 9)
              if (t <= r512.serial_max_tokens and b <= r512.serial_max_bits
                  and t * b <= r512.serial_max_token_bits)}
    assert (1, 2) in serial and (3, 2) in serial and (4, 2) not in serial
    assert (1, 4) not in serial and (2, 3) in serial and (3, 3) not in serial
    assert r256.serial_max_tokens == 1  # AVX2: bit-serial at one token only, any bits
    # (where the table form does not take it: groups of part words)
    lut = {(t, b) for t in range(1, 9) for b in range(1, 9)
           if cn.form(t, b, _Lib(512), group=64) == cn.FORM_LUT}
    assert {(1, 8), (2, 8), (4, 4), (8, 2)} <= lut and not lut & {(3, 6), (4, 5), (9, 2)}
    assert cn.form(1, 2, _Lib(512), group=48) == cn.FORM_BITSERIAL  # not whole words
    lut2 = {(t, b) for t in range(1, 9) for b in range(1, 9)
            if cn.form(t, b, _Lib(256), group=64) == cn.FORM_LUT}  # AVX2: to 8 token-bits
    assert {(1, 8), (2, 4), (4, 2)} <= lut2 and not lut2 & {(2, 5), (3, 3)}


@pytest.mark.parametrize("bits", [512, 256])
def test_a_profile_records_the_kernel_with_its_table_form(monkeypatch, bits):
    """The device line (profiles.measure.device_name) tells this kernel from the one before
    its table form ("native"): `--profile auto` then never takes a profile measured with
    the older kernel for this one."""
    monkeypatch.setattr(cn, "_load", lambda: (_Lib(bits), "native (test)"))
    assert cn.kernel_name() == "native+lut"
    monkeypatch.setattr(cn, "_load", lambda: (None, "numpy (test)"))
    assert cn.kernel_name() == "numpy"


class _Lib:
    """A stand-in library of a given vector width, for routing alone (`cn._vector_bits`)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def nested_vector_bits(self) -> int:
        return self.bits


@needs_native
def test_the_built_library_routes_by_its_vector_width():
    lib = cn._load()[0]
    assert cn.routing(lib) is cn.ROUTING[lib.nested_vector_bits()]
    r = cn.routing(lib)
    one = cn.FORM_LUT if r.lut_max_token_bits else cn.FORM_BITSERIAL
    assert cn.form(1, 2, lib) == one and cn.form(1, 2, lib, group=16) == cn.FORM_BITSERIAL
    assert cn.form(r.serial_max_tokens + 1, 5, lib) == cn.FORM_REGISTER
    if r.serial_max_bits < cn.MAX_PLANES:
        assert cn.form(3, r.serial_max_bits + 3, lib) == cn.FORM_REGISTER


def test_without_a_compiler_or_when_turned_off_the_numpy_path_runs(monkeypatch):
    m, v = _views("bitplane", 8, 64, 32, 2, 4, seed=3)
    x = torch.randn(1, 64)
    try:
        monkeypatch.setattr(cn.shutil, "which", lambda name: None)
        cn._load.cache_clear()
        assert cn.status() == "numpy (no C compiler: set CC, or install cc)"
        assert cn.kernel_name() == "numpy" and not cn.usable(v, 1, 3)
        assert torch.equal(tf.matmul_views(x, v, 3), x @ dequantize(m, 3).t())  # bit for bit
        monkeypatch.undo()
        monkeypatch.setenv("D2MOE_NATIVE", "0")
        cn._load.cache_clear()
        assert cn.status() == "numpy (D2MOE_NATIVE=0)"
    finally:
        monkeypatch.undo()
        cn._load.cache_clear()


def test_a_failing_compiler_is_reported_and_leaves_no_library(tmp_path, monkeypatch):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'no such flag' >&2\n"
                  "exit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path / "cache"))
    try:
        cn._load.cache_clear()
        assert cn.status().startswith("numpy (the native kernel did not build: ")
        assert "no such flag" in cn.status()
        assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # temp file removed
    finally:
        monkeypatch.undo()
        cn._load.cache_clear()


@needs_native
def test_a_build_is_cached_by_source_compiler_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    cc = cn._compiler()
    first = cn.build(cc)
    stamp = first.stat().st_mtime_ns
    assert cn.build(cc) == first and first.stat().st_mtime_ns == stamp  # not built again
    other = cn.build(cc, cn.FLAGS + ("-mno-avx512f",))
    assert other != first and sorted(p.name for p in first.parent.iterdir()) == \
        sorted([first.name, other.name])


def test_matmul_refuses_what_the_kernel_cannot_take():
    _, v = _views("mwq", 4, 64, 32, 2, 4, seed=4)
    params = tf._Params.kept(v, 3)
    with pytest.raises(ValueError, match="float32 rows, got 2 torch.float64"):
        cn.matmul(torch.randn(2, 64, dtype=torch.float64), v, 3, params)
    with pytest.raises(ValueError, match="out must be"):
        cn.matmul(torch.randn(2, 64), v, 3, params, out=torch.empty(4, 2))


def _swiglu_ref(x, m1, m3, m2, b):
    x = x.double()
    g = x @ dequantize(m1, b).double().t()
    h = torch.nn.functional.silu(g) * (x @ dequantize(m3, b).double().t())
    return h @ dequantize(m2, b).double().t(), h.abs() @ dequantize(m2, b).double().abs().t()


@needs_native
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_one_call_swiglu_equals_the_three_products(kind, monkeypatch):
    from d2moe.kernels.dispatch import expert_swiglu

    seed = int.from_bytes(os.urandom(2), "little")
    (m1, v1), (m3, v3) = (_views(kind, 48, 80, 16, 2, 6, seed + i) for i in (0, 1))
    m2, v2 = _views(kind, 80, 48, 16, 2, 6, seed + 2)  # ffn 48, hidden 80
    calls = []
    real = cn.swiglu
    monkeypatch.setattr(cn, "swiglu", lambda *a, **k: calls.append(1) or real(*a, **k))
    top = cn.routing().native_max_tokens
    for b in (2, 4, 6):
        for tokens in (1, 3, 12, top + 1):  # bit-serial, in registers, numpy
            x = torch.randn(tokens, 80)
            ref, scale = _swiglu_ref(x, m1, m3, m2, b)
            y = expert_swiglu(x, v1, v3, v2, b)
            assert y.shape == (tokens, 80) and y.dtype == torch.float32
            assert float((y.double() - ref).abs().max()) <= 1e-5 * float(scale.max()) + 1e-6
    assert len(calls) == 9  # above native_max_tokens: three products, no native call


@needs_native
def test_swiglu_refuses_matrices_that_are_not_one_expert():
    _, v1 = _views("bitplane", 48, 80, 16, 2, 4, 0)
    _, v2 = _views("bitplane", 80, 40, 16, 2, 4, 1)  # w2 must take w1's 48 rows
    params = tuple(tf._Params.kept(v, 3) for v in (v1, v1, v2))
    with pytest.raises(ValueError, match="not one SwiGLU expert"):
        cn.swiglu(torch.randn(1, 80), (v1, v1, v2), 3, params)
