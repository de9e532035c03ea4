"""Serving metrics from a timeline's rows only: latency percentiles and throughput.

Per request (its `request` and `first_token` rows): end-to-end latency = last token minus
arrival; time to first token (TTFT) = first token minus arrival; time per output token
(TPOT) = (latency - TTFT) / (output tokens - 1), for requests with more than one token.
Percentiles are numpy's (linear interpolation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from d2moe.core.events import Timeline


@dataclass(frozen=True)
class ServeMetrics:
    """What a serving run achieved; times in milliseconds, rates per second."""

    requests: int
    output_tokens: int
    span_s: float  # first arrival to last token
    output_tok_s: float  # output tokens / span
    decode_tok_s: float  # decode tokens / time inside decode steps (step rows)
    latency_p50_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """numpy's percentile, NaN for no values."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


def request_times(timeline: Timeline) -> dict[int, dict[str, float]]:
    """Request id -> arrival_us, first_us, end_us, output_tokens, prompt_tokens."""
    out: dict[int, dict[str, float]] = {}
    for e in timeline.events:
        if e.lane != "request":
            continue
        row = out.setdefault(e.step, {})
        row["arrival_us"] = e.start_us
        if e.kind == "request":
            row.update(end_us=e.end_us, output_tokens=e.tokens, prompt_tokens=e.bytes)
        else:
            row["first_us"] = e.end_us
    return {rid: r for rid, r in sorted(out.items()) if "end_us" in r and "first_us" in r}


def serve_metrics(timeline: Timeline) -> ServeMetrics:
    """Latency percentiles and throughput of the requests recorded in `timeline`."""
    reqs = request_times(timeline)
    arrival = np.array([r["arrival_us"] for r in reqs.values()])
    first = np.array([r["first_us"] for r in reqs.values()])
    end = np.array([r["end_us"] for r in reqs.values()])
    outs = np.array([r["output_tokens"] for r in reqs.values()])
    latency, ttft = (end - arrival) / 1e3, (first - arrival) / 1e3
    many = outs > 1
    tpot = (latency[many] - ttft[many]) / (outs[many] - 1)
    span = float(end.max() - arrival.min()) / 1e6 if reqs else 0.0
    dec = [e for e in timeline.events if e.lane == "step" and e.kind == "decode"]
    dec_s = sum(e.dur_us for e in dec) / 1e6
    nan = float("nan")
    return ServeMetrics(
        requests=len(reqs), output_tokens=int(outs.sum()), span_s=span,
        output_tok_s=float(outs.sum()) / span if span > 0 else nan,
        decode_tok_s=sum(e.tokens for e in dec) / dec_s if dec_s > 0 else nan,
        latency_p50_ms=percentile(latency, 50), latency_p99_ms=percentile(latency, 99),
        latency_mean_ms=float(latency.mean()) if reqs else nan,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50), tpot_p99_ms=percentile(tpot, 99))


def format_serve_table(rows: list[tuple[str, ServeMetrics]]) -> str:
    """One line per run: requests, throughput, latency, TTFT and TPOT percentiles (every
    time in milliseconds, named in its column's header), as the other verbs' tables are
    laid out (`analysis.tables.format_table`)."""
    from d2moe.analysis.tables import format_table

    return format_table([
        {"run": name, "reqs": m.requests, "out tok/s": m.output_tok_s,
         "decode tok/s": m.decode_tok_s, "p50 lat ms": m.latency_p50_ms,
         "p99 lat ms": m.latency_p99_ms, "p50 TTFT ms": m.ttft_p50_ms,
         "p99 TTFT ms": m.ttft_p99_ms, "p50 TPOT ms": m.tpot_p50_ms} for name, m in rows])
