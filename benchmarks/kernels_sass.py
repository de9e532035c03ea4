"""Compile the GEMV kernel for a GPU target without a GPU and report what ptxas made of it.

For each configuration: registers, spills, shared memory, and the SASS instruction mix of the
main loop per weight (integer, float, load, shared-memory, barrier). Costs no device time:
Triton's bundled ptxas and cuobjdump do the work. Usage:
    python benchmarks/kernels_sass.py --bits 2,4,8 --configs 512x1x4,512x1x4x0
A config is BLOCK_N x BLOCK_W x num_warps [x pipeline stages: 0 = the prefetch by hand;
default the shipped GEMV_CONFIG's]. `--gate-up` compiles the gate-and-up kernel instead (two
matrices per program: its per-weight counts are over both).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from d2moe.core.cliargs import split_list  # noqa: E402
from d2moe.kernels.triton_launch import GEMV_CONFIG  # noqa: E402
from d2moe.kernels.triton_nested import _gate_up_gemv_kernel, _nested_gemv_kernel  # noqa: E402

CLASSES = (  # SASS opcode prefix -> the pipe that runs it on sm_80/sm_90
    ("FFMA", "fma"), ("FADD", "fma"), ("FMUL", "fma"), ("HADD2", "fma"), ("HFMA2", "fma"),
    ("IMAD", "fma"), ("LOP3", "alu"), ("SHF", "alu"), ("IADD3", "alu"), ("LEA", "alu"),
    ("PRMT", "alu"), ("ISETP", "alu"), ("SEL", "alu"), ("SGXT", "alu"), ("MOV", "alu"),
    ("PLOP3", "alu"), ("VIADD", "alu"), ("LDG", "ldg"), ("LDS", "lds"), ("STS", "sts"),
    ("BAR", "bar"), ("F2F", "cvt"), ("I2F", "cvt"), ("F2I", "cvt"),
)
# Issue rates per SM per clock on sm_90 (CUDA C++ guide, throughput table): 128 FP32 FMA,
# 64 integer ALU, one warp instruction per scheduler (4 x 32 lanes) in total.
ALU_PER_CLK, FMA_PER_CLK, ISSUE_PER_CLK = 64, 128, 128


def compile_sass(bits: int, block_n: int, block_w: int, warps: int, kind: int = 1,
                 arch: int = 90, pipeline: int = GEMV_CONFIG.pipeline,
                 shape: tuple[int, int] = (14336, 4096), tokens: int = 1, flat: bool = True,
                 sms: int = 132,
                 gate_up: bool = False) -> tuple[triton.compiler.CompiledKernel, str]:
    """Compile one variant for sm_<arch> exactly as the JIT specializes `nested_matmul`'s
    launch on `shape` (its `gemv_launch` arguments through Triton's own binder: ints equal
    to 1 become constants, pointers and ints divisible by 16 carry that hint, without which
    no load is vectorized; the split aims at `sms` SMs, an H100's 132); return the kernel
    and its SASS text. Word-major planes stacked in one tensor, as the benchmarks time.
    `gate_up`: the gate-and-up kernel on two such matrices (`gate_up_launch`)."""
    import torch
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from d2moe.kernels.packed import PackedExpertMatrix
    from d2moe.kernels.triton_launch import KernelConfig, gate_up_launch, gemv_launch

    rows, cols = shape
    words, groups, b1 = -(-cols // 32), -(-cols // 64), 2
    aux = torch.zeros(groups, rows, dtype=torch.float16)
    packed = PackedExpertMatrix(
        kind="mwq" if kind == 0 else "bitplane", b1=b1, bK=8, group=64, rows=rows, cols=cols,
        planes=torch.zeros(bits, words, rows, dtype=torch.int32), scale=aux, zero=aux,
        plane_scale=torch.zeros(max(bits - b1, 0) if kind == 0 else 0, groups, rows,
                                dtype=torch.float16))
    x = torch.zeros(tokens, cols, dtype=torch.float16)
    out = torch.zeros(tokens, rows, dtype=torch.float16)
    cfg = KernelConfig(block_n=block_n, block_w=block_w, block_m=tokens, num_warps=warps,
                       pipeline=pipeline, flat=flat)
    if gate_up:
        fn = _gate_up_gemv_kernel
        _, args, kwargs = gate_up_launch(x, packed, packed, bits, out, cfg, sms=sms, asm=True)
    else:
        fn = _nested_gemv_kernel
        _, args, kwargs = gemv_launch(x, packed, bits, out, cfg, sms=sms, asm=True)
    kwargs["num_stages"] = 1
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(  # noqa: SLF001 (the JIT's own)
        backend, options, bound, specialization, options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=target, options=options.__dict__)
    return k, cuobjdump(k.asm["cubin"], "-sass")


def loop_mix(sass: str) -> collections.Counter:
    """Opcode classes inside the largest loop body (a backward BRA to an address)."""
    ops = []
    for ln in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", ln)
        if m:
            ops.append((int(m.group(1), 16), m.group(3), m.group(4)))
    lo, hi = 0, len(ops) - 1
    for i, (addr, op, rest) in enumerate(ops):
        t = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op.startswith("BRA") and t and int(t.group(1), 16) < addr:
            j = next(j for j, o in enumerate(ops) if o[0] == int(t.group(1), 16))
            if i - j > hi - lo or (lo, hi) == (0, len(ops) - 1):
                lo, hi = j, i
    mix: collections.Counter = collections.Counter()
    for _, op, _ in ops[lo:hi + 1]:
        base = op.split(".")[0]
        mix[next((c for p, c in CLASSES if base.startswith(p)), "other")] += 1
        mix["total"] += 1
    return mix


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Run the bundled cuobjdump with `flag` (-sass, -res-usage) on a cubin."""
    import os
    import subprocess
    import tempfile

    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([path_to_cuobjdump(), flag, f.name], text=True,
                              capture_output=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack (spill) bytes and shared memory from cuobjdump's resource report."""
    out = cuobjdump(cubin, "-res-usage")
    get = lambda key: int(re.search(rf"{key}[:=]\s*(\d+)", out).group(1))  # noqa: E731
    return {"regs": get("REG"), "stack": get("STACK"), "smem": get("SHARED")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--configs", default="512x1x4")
    ap.add_argument("--kind", type=int, default=1, help="1 bitplane, 0 mwq")
    ap.add_argument("--tokens", type=int, default=1, choices=(1, 2, 4),
                    help="tokens = BLOCK_M (the GEMV path: 1, 2 or 4)")
    ap.add_argument("--no-flat", dest="flat", action="store_false",
                    help="one-word tiles in the earlier 3-D form (KernelConfig.flat=False)")
    ap.add_argument("--gate-up", action="store_true",
                    help="the gate-and-up kernel (w1 and w3 in one launch)")
    ap.add_argument("--dump", help="write the SASS of the last variant here")
    args = ap.parse_args(argv)
    print("| bits | BLOCK_N x BLOCK_W x warps [x stages] | regs | stack B | smem B "
          "| loop instr/weight | alu | fma | ldg | lds+sts | bar | weights/clk/SM bound |")
    print("|" + "---|" * 12)
    for bits in (int(b) for b in split_list(args.bits, "bits", example="--bits 2,4")):
        for cfg in split_list(args.configs, "configs", example="--configs 32x64x4"):
            bn, bw, nw, *stages = (int(v) for v in cfg.split("x"))
            k, sass = compile_sass(bits, bn, bw, nw, args.kind,
                                   pipeline=stages[0] if stages else GEMV_CONFIG.pipeline,
                                   tokens=args.tokens, flat=args.flat, gate_up=args.gate_up)
            mix = loop_mix(sass)
            # weights per thread per loop iteration (two matrices' for the gate-up kernel)
            weights = bn * bw * 32 / (32 * nw) * (2 if args.gate_up else 1)
            per = {c: mix[c] / weights for c in ("total", "alu", "fma", "ldg", "bar")}
            bound = 1 / max(per["alu"] / ALU_PER_CLK, per["fma"] / FMA_PER_CLK,
                            per["total"] / ISSUE_PER_CLK)
            smem_ops = (mix["lds"] + mix["sts"]) / weights
            res = resources(k.asm["cubin"])
            print(f"| {bits} | {cfg} | {res['regs']} | {res['stack']} | {res['smem']} | "
                  f"{per['total']:.2f} | {per['alu']:.2f} | {per['fma']:.2f} | "
                  f"{per['ldg']:.3f} | {smem_ops:.3f} | {per['bar']:.3f} | {bound:.1f} |")
            if args.dump:
                Path(args.dump).write_text(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
