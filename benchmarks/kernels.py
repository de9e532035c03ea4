"""Kernel benchmark: fused nested dequant + matmul against dequantize-then-matmul and fp16.

Measured, never asserted. On CUDA the kernel times are CUDA-graph replays that rotate over
enough copies of the weights to overflow the L2 cache (so every call reads device memory and
no Python launch cost is counted), next to the device-to-device copy bandwidth and the fp16
product measured the same way in the same run; `eager us` adds one Python call per launch
(do_bench, L2 flushed), which is what an un-graphed caller pays. On the CPU it times the
executor's CPU path (chunked dequantize and product on kept plane views) against
dequantize-then-matmul and the dense float32 product, on LLaMA-MoE shapes by default. Usage:
    python benchmarks/kernels.py                 # the full table (CUDA) or the CPU figures
    python benchmarks/kernels.py --check         # correctness on real quantized matrices first
    python benchmarks/kernels.py --tune          # try launch configs, report the best per case
    python benchmarks/kernels.py --jobs 16       # compile every variant in 16 processes first
`--check`, `--tune`, `--jobs N` and `--no-table` act on CUDA only: without a GPU they stop the
run with one line (the CPU path ignored them, so a GPU command run on the CPU wrote CPU rows
unseen).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2moe.core.cliargs import split_list  # noqa: E402
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.kernels.torch_fallback import dequant_matmul  # noqa: E402
from d2moe.quant.nested import quantize_matrix  # noqa: E402
from d2moe.quant.reference import dequantize  # noqa: E402

# (rows, cols) of expert matrices: w1 is [ffn, hidden], w2 is [hidden, ffn].
SHAPES = {
    ("mixtral-8x7b", "w1"): (14336, 4096), ("mixtral-8x7b", "w2"): (4096, 14336),
    ("llama-moe-3.5b", "w1"): (688, 4096), ("llama-moe-3.5b", "w2"): (4096, 688),
}


@dataclass(frozen=True)
class Row:
    """One measured case; times are medians in microseconds."""

    model: str
    tensor: str
    rows: int
    cols: int
    kind: str
    bits: int
    tokens: int
    fused_us: float  # graph-timed
    eager_us: float  # one Python call per launch
    dequant_matmul_us: float
    fp16_us: float
    read_nbytes: int
    read_GBps: float
    copy_bw_frac: float  # read_GBps / measured copy bandwidth
    speedup_vs_dequant: float
    time_vs_fp16: float
    config: str
    numpy_path_us: float = float("nan")  # CPU: the numpy path alone (no compiled kernel)
    other_forms_us: float = float("nan")  # CPU: the fastest form the routing did not pick


def random_packed(kind: str, rows: int, cols: int, layout: QuantLayout,
                  device: str) -> PackedExpertMatrix:
    """Random bits and plausible fp16 scales (never zeros: they can run faster than data)."""
    words, groups = -(-cols // 32), -(-cols // layout.group)
    nplanes = layout.bK
    gen = torch.Generator(device=device).manual_seed(int(time.time_ns() % 2**31))
    # word-major layout (d2moe.kernels.packed): planes [planes, words, rows], scales [groups, rows]
    planes = torch.randint(-2**31, 2**31 - 1, (nplanes, words, rows), dtype=torch.int32,
                           device=device, generator=gen)
    scale = (torch.rand(groups, rows, device=device, generator=gen) * 0.01 + 0.005).half()
    zero = (-scale.float() * 2 ** (layout.bK - 1)).half()
    npl = nplanes - layout.b1 if kind == "mwq" else 0
    pscale = (torch.rand(npl, groups, rows, device=device, generator=gen) * 0.003).half()
    return PackedExpertMatrix(kind=kind, b1=layout.b1, bK=layout.bK, group=layout.group,
                              rows=rows, cols=cols, planes=planes, scale=scale, zero=zero,
                              plane_scale=pscale)


L2_OVERFLOW_BYTES = 3 * 50 * 2**20  # three times the H100's 50 MB L2


def copies_for(nbytes: int) -> int:
    """How many weight copies a rotation needs so that no call finds its weights in L2."""
    return max(2, min(64, -(-L2_OVERFLOW_BYTES // max(nbytes, 1))))


def graph_us(calls: list, min_calls: int = 200) -> float:
    """Median time per call of `calls` (closures over distinct buffers) replayed in a graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in calls:  # warm up (compile, allocate) outside the capture
            fn()
    torch.cuda.synchronize()
    reps = max(1, -(-min_calls // len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in calls:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    return statistics.median(times)


def copy_bandwidth_GBps(device: str) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def check_cuda(device: str) -> float:
    """Worst relative error of the fused kernel against the float64 reference on real data."""
    from d2moe.kernels.triton_launch import nested_matmul

    worst = 0.0
    rng = np.random.default_rng()
    for kind in ("bitplane", "mwq"):
        for rows, cols in ((688, 4096), (4096, 688), (1000, 1000)):
            w = rng.standard_normal((rows, cols)).astype(np.float32)
            m = quantize_matrix(w, QuantLayout(kind=kind))
            p = PackedExpertMatrix.from_nested(m, device=device)
            for bits in (2, 5, 8):
                ref_w = dequantize(m, bits, device=device).double()
                for tokens in (1, 4, 16):
                    x = torch.randn(tokens, cols, device=device, dtype=torch.float16)
                    out = torch.full((tokens, rows), float("nan"), device=device,
                                     dtype=torch.float16)
                    y = nested_matmul(x, p, bits, out=out)
                    torch.cuda.synchronize()
                    ref = x.double() @ ref_w.t()
                    err = float((y.double() - ref).norm() / ref.norm())
                    if not torch.isfinite(y).all() or err > 3e-3:
                        raise SystemExit(f"FAIL {kind} {rows}x{cols} b={bits} M={tokens}: "
                                         f"rel err {err:.2e}")
                    worst = max(worst, err)
    print(f"check: fused kernel vs float64 reference, worst rel err {worst:.2e} (fp16 x)")
    return worst


def _configs(tokens: int, rows: int, cols: int, device: str, which: str = "all") -> list:
    """Candidate (KernelConfig, path) pairs for one case; split-K from the automatic choice up.
    which="pipeline": the default launch, its split and pipeliner variants, and the 3-D
    tiles (flat=False) it replaced."""
    from d2moe.kernels.triton_launch import (
        GEMV_CONFIG,
        GEMV_FEW_CONFIG,
        GEMV_MAX_TOKENS,
        KernelConfig,
        auto_split,
    )

    if which == "pipeline" and tokens <= GEMV_MAX_TOKENS:
        d = GEMV_CONFIG if tokens == 1 else GEMV_FEW_CONFIG
        auto = auto_split(-(-rows // d.block_n), -(-cols // 32), d, torch.device(device))
        words = -(-cols // 32)
        return [(dataclasses.replace(d, split_k=k, pipeline=st), "gemv")
                for k in sorted({auto, 2 * auto, 4 * auto}) if k <= words for st in (0, 2, 3)
                ] + [(dataclasses.replace(d, split_k=auto, pipeline=st, flat=False), "gemv")
                     for st in (0, 2)]  # the 3-D tiles of before _decode_w1
    if tokens == 1:
        out = []
        shapes = [(bn, bw, nw, 0) for bn, bw, nw in (
            (512, 1, 4), (512, 1, 2), (256, 1, 2), (256, 1, 1), (1024, 1, 4), (512, 2, 4),
            (256, 2, 2), (128, 1, 1))]
        # Triton's pipeliner instead of the one-tile prefetch by hand
        shapes += [(bn, 1, nw, st) for bn, nw in ((512, 4), (256, 2)) for st in (2, 3, 4)]
        for bn, bw, nw, stages in shapes:
            cfg = KernelConfig(block_n=bn, block_w=bw, num_warps=nw, pipeline=stages)
            auto = auto_split(-(-rows // bn), -(-cols // 32), cfg, torch.device(device))
            out += [(dataclasses.replace(cfg, split_k=k), "gemv")
                    for k in sorted({auto, 2 * auto, 4 * auto}) if k <= -(-cols // 32) // bw]
        return out
    if tokens <= 4:
        return [(KernelConfig(block_n=bn, block_w=1, block_m=4, num_warps=nw), "gemv")
                for bn in (128, 256, 512) for nw in (2, 4)]
    return [(KernelConfig(block_n=bn, block_w=bw, block_m=16, num_warps=nw, num_stages=3), "dot")
            for bn in (64, 128) for bw in (2, 4) for nw in (4, 8)]


def _is_default(cfg, tokens: int, rows: int, cols: int, device: str) -> bool:
    """Whether `cfg` launches as nested_matmul's own choice for this case does."""
    from d2moe.kernels import triton_launch as tn

    base = (tn.GEMV_CONFIG if tokens == 1 else tn.GEMV_FEW_CONFIG
            if tokens <= tn.GEMV_MAX_TOKENS else tn.DOT_CONFIG)
    same = (cfg.block_n, cfg.block_w, cfg.num_warps, cfg.pipeline, cfg.flat) == (
        base.block_n, base.block_w, base.num_warps, base.pipeline, base.flat)
    if tokens <= tn.GEMV_MAX_TOKENS:  # split-K: the automatic choice unless pinned
        split = base.split_k or tn.auto_split(-(-rows // base.block_n), -(-cols // 32), base,
                                             torch.device(device))
        same = same and cfg.split_k == split
    return same


def _case_inputs(kind: str, rows: int, cols: int, tokens: int, layout: QuantLayout,
                 device: str, copies: int) -> tuple[list, list]:
    ps = [random_packed(kind, rows, cols, layout, device) for _ in range(copies)]
    xs = [torch.randn(tokens, cols, device=device, dtype=torch.float16) for _ in range(copies)]
    return ps, xs


def _compile_worker(jobs: list) -> int:
    """Run each (kind, rows, cols, tokens, bits, cfg, path) once: fills Triton's disk cache."""
    from d2moe.kernels.triton_launch import nested_matmul

    layout = QuantLayout(kind="bitplane", b1=2, bK=8, group=64)
    done = 0
    for kind, rows, cols, tokens, bits, cfg, path in jobs:
        (p,), (x,) = _case_inputs(kind, rows, cols, tokens, layout, "cuda", 1)
        try:
            nested_matmul(x, p, bits, config=cfg, path=path)
            done += 1
        except Exception:  # reported when the parent process times it
            pass
    torch.cuda.synchronize()
    return done


def precompile(jobs: list, workers: int) -> None:
    """Compile every variant in `workers` processes before timing (Triton caches on disk)."""
    import concurrent.futures
    import multiprocessing

    if workers <= 1 or not jobs:
        return
    t0 = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = sum(pool.map(_compile_worker, chunks))
    print(f"precompiled {done}/{len(jobs)} variants in {workers} processes, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def tune_jobs(kinds: list[str], tokens_list: list[int], device: str, models: list[str],
              which: str) -> list:
    return [(kind, rows, cols, tokens, bits, cfg, path)
            for kind in kinds for (model, tensor), (rows, cols) in SHAPES.items()
            if model in models for tokens in tokens_list for bits in TUNE_BITS
            for cfg, path in _configs(tokens, rows, cols, device, which)]


TUNE_BITS = (2, 4, 8)


def tune(device: str, kinds: list[str], tokens_list: list[int], layout: QuantLayout,
         out_lines: list[str], models: list[str], which: str = "all") -> None:
    """Graph-time every candidate config per shape, bit-width and token count; print the best
    three (every one with which="pipeline"), each against the default launch's time. Each
    config's output must match the default's (relative error < 1e-2) or the run stops."""
    from d2moe.kernels.triton_launch import nested_matmul

    for kind in kinds:
        for (model, tensor), (rows, cols) in SHAPES.items():
            if model not in models:
                continue
            for bits in TUNE_BITS:
                for tokens in tokens_list:
                    probe = random_packed(kind, rows, cols, layout, device)
                    ps, xs = _case_inputs(kind, rows, cols, tokens, layout, device,
                                          copies_for(probe.nbytes_at(bits)))
                    del probe
                    ref = nested_matmul(xs[0], ps[0], bits).float()
                    results = []
                    for cfg, path in _configs(tokens, rows, cols, device, which):
                        calls = [lambda x=x, p=p, b=bits, c=cfg, pa=path: nested_matmul(
                            x, p, b, config=c, path=pa) for x, p in zip(xs, ps, strict=True)]
                        try:
                            err = float((calls[0]().float() - ref).norm() / ref.norm())
                            if not err < 1e-2:
                                raise SystemExit(f"FAIL {kind} {model} {tensor} b={bits} "
                                                 f"M={tokens} {cfg}: rel err {err:.2e}")
                            results.append((graph_us(calls), cfg, path))
                        except Exception as exc:  # a config that does not compile: report
                            out_lines.append(f"tune {kind} {model} {tensor} b={bits} "
                                             f"M={tokens} {cfg}: {type(exc).__name__}")
                    default = next((us for us, cfg, path in results if _is_default(
                        cfg, tokens, rows, cols, device)), float("nan"))
                    results.sort(key=lambda r: r[0])
                    for us, cfg, path in results if which == "pipeline" else results[:3]:
                        line = (f"tune {kind:8s} {model:14s} {tensor} b={bits} M={tokens:2d} "
                                f"{path:5s} {us:8.1f} us  x{default / us:4.2f} vs default "
                                f"({default:.1f} us)  {cfg}")
                        print(line, flush=True)
                        out_lines.append(line)


def bench_jobs(kinds: list[str], bits_list: list[int], tokens_list: list[int]) -> list:
    return [(kind, rows, cols, tokens, bits, None, "auto")
            for (model, tensor), (rows, cols) in SHAPES.items() for tokens in tokens_list
            for kind in kinds for bits in bits_list]


def bench_cuda(device: str, kinds: list[str], bits_list: list[int], tokens_list: list[int],
               layout: QuantLayout, copy_GBps: float) -> list[Row]:
    """The table: fused vs dequantize-then-matmul vs fp16, same run."""
    from triton.testing import do_bench

    from d2moe.kernels.triton_launch import nested_matmul

    rows_out = []
    for (model, tensor), (rows, cols) in SHAPES.items():
        w16s = [torch.randn(rows, cols, device=device, dtype=torch.float16) * 0.02
                for _ in range(copies_for(rows * cols * 2))]
        for tokens in tokens_list:
            x = torch.randn(tokens, cols, device=device, dtype=torch.float16)
            fp16_us = graph_us([lambda w=w, x=x: x @ w.t() for w in w16s])
            for kind in kinds:
                probe = random_packed(kind, rows, cols, layout, device)
                for bits in bits_list:
                    ps, xs = _case_inputs(kind, rows, cols, tokens, layout, device,
                                          copies_for(probe.nbytes_at(bits)))
                    fused_us = graph_us([lambda x=x, p=p, b=bits: nested_matmul(x, p, b)
                                         for x, p in zip(xs, ps, strict=True)])
                    x0, p0 = xs[0], ps[0]
                    eager_us = do_bench(lambda x0=x0, p0=p0, b=bits: nested_matmul(x0, p0, b),
                                        warmup=25, rep=100, return_mode="median") * 1e3
                    deq_us = do_bench(lambda x0=x0, p0=p0, b=bits: dequant_matmul(x0, p0, b),
                                      warmup=5, rep=40, return_mode="median") * 1e3
                    nbytes = ps[0].nbytes_at(bits) + xs[0].numel() * 2 + tokens * rows * 2
                    gbps = nbytes / (fused_us * 1e-6) / 1e9
                    rows_out.append(Row(model, tensor, rows, cols, kind, bits, tokens,
                                        fused_us, eager_us, deq_us, fp16_us, nbytes,
                                        gbps, gbps / copy_GBps, deq_us / fused_us,
                                        fused_us / fp16_us, "default"))
                    print(_fmt(rows_out[-1]), flush=True)
    return rows_out


def bench_cpu(kinds: list[str], bits_list: list[int], tokens_list: list[int],
              layout: QuantLayout, models: list[str]) -> list[Row]:
    """The executor's CPU path against three baselines, medians of perf_counter, same run:
    `matmul_views` on kept `PlaneViews` (what the CPU pool hands the compute lane: the
    compiled fused kernel for a few tokens, else chunk by chunk, the float32 matrix never
    filling DRAM) against its numpy path alone (`native=False`), dequantize-then-matmul
    (the numpy dequantizer writing the whole float32 matrix, then one product) and the dense
    float32 product (the `x fp16 time` column holds this on the CPU); and where the compiled
    kernel runs, against the fastest of its forms that the routing did not pick."""
    from d2moe.kernels import cpu_native
    from d2moe.kernels.torch_fallback import PlaneViews, _Params, dequantize_fast, matmul_views

    forms = (cpu_native.FORM_BITSERIAL, cpu_native.FORM_REGISTER, cpu_native.FORM_LUT)

    rows_out = []
    for (model, tensor), (rows, cols) in SHAPES.items():
        if model not in models:
            continue
        w = torch.randn(rows, cols)
        for tokens in tokens_list:
            x = torch.randn(tokens, cols)
            dense_us = _cpu_median_us(lambda x=x, w=w: x @ w.t())
            for kind in kinds:
                packed = random_packed(kind, rows, cols, layout, "cpu")
                v = PlaneViews.from_packed(packed)
                for bits in bits_list:
                    us = _cpu_median_us(lambda x=x, v=v, b=bits: matmul_views(x, v, b))
                    np_us = _cpu_median_us(
                        lambda x=x, v=v, b=bits: matmul_views(x, v, b, native=False))
                    deq_us = _cpu_median_us(
                        lambda x=x, v=v, b=bits: x @ dequantize_fast(v, b).t())
                    other_us = float("nan")
                    if cpu_native.usable(v, tokens, bits):
                        picked = cpu_native.form(tokens, bits, group=v.group)
                        prm = _Params.kept(v, bits)
                        other_us = min(_cpu_median_us(
                            lambda x=x, v=v, b=bits, p=prm, f=f: cpu_native.matmul(x, v, b, p,
                                                                                   form=f))
                            for f in forms if f != picked
                            and (f != cpu_native.FORM_LUT or v.group % 32 == 0))
                    nbytes = packed.nbytes_at(bits)
                    rows_out.append(Row(model, tensor, rows, cols, kind, bits, tokens, us, us,
                                        deq_us, dense_us, nbytes, nbytes / (us * 1e-6) / 1e9,
                                        float("nan"), deq_us / us, us / dense_us,
                                        cpu_native.status(), np_us, other_us))
                    print(_fmt(rows_out[-1]), flush=True)
    return rows_out


def _cpu_median_us(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


HEADER = ("| model | tensor | kind | bits | tokens | fused us | GB/s | x copy BW | eager us | "
          "dequant+mm us | speedup | x fp16 time |")
CPU_HEADER = ("| model | tensor | kind | bits | tokens | CPU path us | numpy path us | "
              "x numpy path | dequant+mm us | x dequant+mm | x dense fp32 time | "
              "x other forms |")


def _fmt(r: Row) -> str:
    if r.numpy_path_us == r.numpy_path_us:  # a CPU row (not NaN)
        return (f"| {r.model} | {r.tensor} {r.rows}x{r.cols} | {r.kind} | {r.bits} | "
                f"{r.tokens} | {r.fused_us:.1f} | {r.numpy_path_us:.1f} | "
                f"{r.numpy_path_us / r.fused_us:.2f} | {r.dequant_matmul_us:.1f} | "
                f"{r.speedup_vs_dequant:.2f} | {r.time_vs_fp16:.2f} | "
                f"{r.other_forms_us / r.fused_us:.2f} |")
    return (f"| {r.model} | {r.tensor} {r.rows}x{r.cols} | {r.kind} | {r.bits} | {r.tokens} | "
            f"{r.fused_us:.1f} | {r.read_GBps:.3g} | {r.copy_bw_frac:.2f} | {r.eager_us:.1f} | "
            f"{r.dequant_matmul_us:.1f} | {r.speedup_vs_dequant:.1f} | {r.time_vs_fp16:.2f} |")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="bitplane,mwq")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--check", action="store_true", help="check correctness first (CUDA)")
    ap.add_argument("--tune", action="store_true", help="time candidate launch configs (CUDA)")
    ap.add_argument("--tune-set", default="all", choices=("all", "pipeline"),
                    help="pipeline: the default GEMV launch against its pipelined variants")
    ap.add_argument("--models", default=None,
                    help="models whose expert shapes are tuned (CUDA; default all) or timed "
                         "(CPU; default llama-moe-3.5b)")
    ap.add_argument("--no-table", action="store_true",
                    help="skip the timing table, e.g. to --tune alone (CUDA)")
    ap.add_argument("--json", help="write rows and context here")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compile in this many processes first (CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on the CPU (the executor's default: 1; 0: torch's own)")
    args = ap.parse_args(argv)
    cuda_only = [opt for opt, given in (("--check", args.check), ("--tune", args.tune),
                                         (f"--jobs {args.jobs}", args.jobs > 1),
                                         ("--no-table", args.no_table)) if given]
    if cuda_only and not torch.cuda.is_available():
        sys.exit(f"kernels.py {' '.join(cuda_only)}: CUDA only, and torch sees no CUDA device "
                 "(the CPU figures: run it without them)")
    kinds = split_list(args.kinds, "kinds", example="--kinds bitplane,mwq")
    bits_list = [int(b) for b in split_list(args.bits, "bits", example="--bits 2,4")]
    tokens_list = [int(t) for t in split_list(args.tokens, "tokens", example="--tokens 1,8")]
    # no --models: none named here (the default shapes below)
    models = split_list(args.models, "models", example="--models llama-moe-3.5b",
                        allow_none=True)
    layout = QuantLayout(kind="bitplane", b1=2, bK=8, group=64)
    context = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
               "torch": torch.__version__, "command": " ".join(sys.argv)}
    lines: list[str] = []
    if torch.cuda.is_available():
        import triton

        device = "cuda"
        context.update(device=torch.cuda.get_device_name(), triton=triton.__version__,
                       sms=torch.cuda.get_device_properties(0).multi_processor_count)
        if args.check:
            context["check_worst_rel_err"] = check_cuda(device)
        copy_GBps = copy_bandwidth_GBps(device)
        context["copy_GBps"] = copy_GBps
        print(f"{context['device']}: device-to-device copy {copy_GBps:.0f} GB/s "
              f"(read + write), measured in this run")
        models = models or sorted({m for m, _ in SHAPES})
        precompile((tune_jobs(kinds, tokens_list, device, models, args.tune_set)
                    if args.tune else [])
                   + ([] if args.no_table else bench_jobs(kinds, bits_list, tokens_list)),
                   args.jobs)
        if args.tune:
            tune(device, kinds, tokens_list, layout, lines, models, args.tune_set)
        rows = [] if args.no_table else bench_cuda(device, kinds, bits_list, tokens_list,
                                                   layout, copy_GBps)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        from d2moe.profiles.measure import device_name

        context.update(device=device_name(torch.device("cpu")), threads=torch.get_num_threads())
        from d2moe.kernels.cpu_native import routing, status

        context["cpu_kernel"] = status()
        print(f"{context['device']}: no CUDA; timing the CPU path ({status()} up to "
              f"{routing().native_max_tokens} tokens, numpy chunks above) against its numpy path, "
              "dequantize-then-matmul and the dense float32 product")
        rows = bench_cpu(kinds, bits_list, tokens_list, layout,
                         models or ["llama-moe-3.5b"])
    cpu = bool(rows) and rows[0].numpy_path_us == rows[0].numpy_path_us
    print(CPU_HEADER if cpu else HEADER)
    print("|" + "---|" * 12)
    for r in rows:
        print(_fmt(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"context": context, "tune": lines,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
