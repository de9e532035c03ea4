"""The cost formulas behind a hardware profile: transfer, roofline and measured-table lookups.

Units: bandwidths in GB/s (1e9 bytes per second), so nbytes / (GBps * 1e3) is microseconds;
throughput in TFLOP/s, so flops / (TFLOPs * 1e6) is microseconds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

BYTES_PER_US_PER_GBPS = 1e3  # 1 GB/s = 1e9 B/s = 1e3 B/us
FLOPS_PER_US_PER_TFLOPS = 1e6  # 1 TFLOP/s = 1e12 FLOP/s = 1e6 FLOP/us


def transfer_us(nbytes: int, hops: Sequence[tuple[float, float]]) -> float:
    """Latency of one request streamed through `hops` of (read_GBps, latency_us).

    Store-and-forward in chunks pipelines the hops, so the request pays every hop's fixed
    latency once and moves at the slowest hop's bandwidth:
        t = sum(latency_us) + nbytes / min(read_GBps).
    Zero bytes cost nothing (no request is issued).
    """
    if nbytes <= 0:
        return 0.0
    fixed = sum(lat for _, lat in hops)
    bandwidth = min(bw for bw, _ in hops)
    return fixed + nbytes / (bandwidth * BYTES_PER_US_PER_GBPS)


def checked_reads_us(levels: Sequence[tuple[int, float]], check_GBps: float,
                     pipeline_min_bytes: int | None) -> float:
    """A load's level reads with their CRC-32 checks, as `quant.store.StoreReader` does them.

    `levels` are (bytes, read us) in read order. A level of `pipeline_min_bytes` or more,
    not the last, is checked on one helper thread while the reading thread reads on; the
    others on the reading thread before its next read. Done when both threads are:
        t_k = t_(k-1) + read_k (+ check_k inline);  helper = max(helper, t_k) + check_k
        total = max(t_last, helper),  check_k = bytes_k / check_GBps.
    `check_GBps` inf: the checks cost nothing here (profiles before 2026-11-23 count them
    in the lane's per-byte cost).
    """
    t = helper = 0.0
    last = len(levels) - 1
    for k, (nbytes, read_us) in enumerate(levels):
        t += read_us
        check_us = nbytes / (check_GBps * BYTES_PER_US_PER_GBPS)
        if k < last and pipeline_min_bytes is not None and nbytes >= pipeline_min_bytes:
            helper = max(helper, t) + check_us
        else:
            t += check_us
    return max(t, helper)


def store_reads_us(levels: Sequence[int], request_us: Callable[[int], float],
                   check_GBps: float, pipeline_min_bytes: int | None) -> float:
    """A raise's disk reads with their checks, as `quant.store.StoreReader` makes them: the
    levels (bytes, file order) joined into reads by `quant.store.read_sizes`, each read
    `request_us(bytes)`, checked by `checked_reads_us`. `d2moe profile` subtracts this from
    a measured load to find the lane's own work, and the simulator adds that work back to
    it: both price a read here, so they cannot disagree on what one is (they did once: the
    profile took each level as a read while the reader joined small ones, 2026-11-24)."""
    from d2moe.quant.store import read_sizes  # the reader's own grouping

    reads = read_sizes(levels, pipeline_min_bytes)
    return checked_reads_us([(n, request_us(n)) for n in reads], check_GBps,
                            pipeline_min_bytes)


def roofline_us(nbytes: float, flops: float, mem_GBps: float, peak_TFLOPs: float) -> float:
    """Roofline time of a kernel: bound by memory traffic or by arithmetic, whichever is slower."""
    return max(nbytes / (mem_GBps * BYTES_PER_US_PER_GBPS),
               flops / (peak_TFLOPs * FLOPS_PER_US_PER_TFLOPS))


def dequant_us(weights: int, bits: int, ns_per_Mweight_bit: float) -> float:
    """Dequantizing `weights` weights of `bits` bits once: ns per (1e6 weights x 1 bit)."""
    return ns_per_Mweight_bit * (weights / 1e6) * bits / 1e3


def interp_1d(xs: Sequence[float], ys: Sequence[float], x: float) -> tuple[float, bool]:
    """Linear interpolation on sorted xs; linear extrapolation from the two nearest points
    (constant with one point). Returns (value, extrapolated)."""
    if len(xs) == 1:
        return float(ys[0]), x != xs[0]
    if xs[0] <= x <= xs[-1]:
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    else:
        i = 1 if x < xs[0] else len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0), not xs[0] <= x <= xs[-1]


class Table2D:
    """Latency over (bits, tokens) from scattered measured rows.

    For the query's bits, interpolate over tokens within each measured bit-width, then
    linearly over bits between the two bracketing bit-widths. Outside the measured range
    either axis extrapolates linearly from the two nearest points; results are clamped at 0.
    """

    def __init__(self, rows: Sequence[tuple[int, int, float]]) -> None:
        by_bits: dict[int, list[tuple[int, float]]] = {}
        for bits, tokens, lat in rows:
            by_bits.setdefault(bits, []).append((tokens, lat))
        self.bits = sorted(by_bits)
        self.curves = [(
            [t for t, _ in sorted(by_bits[b])], [v for _, v in sorted(by_bits[b])]
        ) for b in self.bits]

    def __call__(self, bits: int, tokens: int) -> tuple[float, bool]:
        """(latency_us, extrapolated)."""
        values, extra = [], False
        for xs, ys in self.curves:
            v, e = interp_1d(xs, ys, tokens)
            values.append(v)
            extra |= e
        v, e = interp_1d(self.bits, values, bits)
        return max(v, 0.0), extra or e


class Table1D:
    """Latency over tokens from measured rows (linear, extrapolation flagged, clamped at 0)."""

    def __init__(self, rows: Sequence[tuple[int, float]]) -> None:
        pts = sorted(rows)
        self.xs = [t for t, _ in pts]
        self.ys = [v for _, v in pts]

    def __call__(self, tokens: int) -> tuple[float, bool]:
        """(latency_us, extrapolated)."""
        v, e = interp_1d(self.xs, self.ys, tokens)
        return max(v, 0.0), e
