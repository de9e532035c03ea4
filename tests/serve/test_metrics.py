"""Serving metrics come from the request and step rows alone and match numpy's percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.events import Event, Timeline
from d2moe.serve.metrics import format_serve_table, percentile, serve_metrics


def _req(rid, arrival, first, end, out, prompt=5):
    return [Event("request", "request", rid, -1, -1, 0, 0, out, prompt, arrival, end),
            Event("request", "first_token", rid, -1, -1, 0, 0, 1, prompt, arrival, first)]


def test_percentiles_from_hand_built_rows_equal_numpys():
    rng = np.random.default_rng(1)
    n = 37
    arrival = np.sort(rng.uniform(0, 1e6, n))
    ttft = rng.uniform(1e3, 5e4, n)
    rest = rng.uniform(0, 2e5, n)
    outs = rng.integers(1, 9, n)
    events = []
    for i in range(n):
        events += _req(i, arrival[i], arrival[i] + ttft[i], arrival[i] + ttft[i] + rest[i] *
                       (outs[i] > 1), int(outs[i]))
    events.append(Event("step", "decode", 0, -1, -1, 0, 0, 4, 0, 0.0, 2e5))
    events.append(Event("step", "decode", 1, -1, -1, 0, 0, 2, 0, 3e5, 4e5))
    events.append(Event("step", "prefill", 2, -1, -1, 0, 0, 90, 0, 4e5, 5e5))
    m = serve_metrics(Timeline(events, {}))
    lat = (ttft + rest * (outs > 1)) / 1e3
    assert m.requests == n and m.output_tokens == outs.sum()
    assert m.latency_p50_ms == pytest.approx(np.percentile(lat, 50))
    assert m.latency_p99_ms == pytest.approx(np.percentile(lat, 99))
    assert m.ttft_p50_ms == pytest.approx(np.percentile(ttft / 1e3, 50))
    assert m.ttft_p99_ms == pytest.approx(np.percentile(ttft / 1e3, 99))
    many = outs > 1
    tpot = rest[many] / 1e3 / (outs[many] - 1)
    assert m.tpot_p50_ms == pytest.approx(np.percentile(tpot, 50))
    span = (arrival + ttft + rest * (outs > 1)).max() - arrival.min()
    assert m.output_tok_s == pytest.approx(outs.sum() / (span / 1e6))
    assert m.decode_tok_s == pytest.approx(6 / 0.3)  # decode step rows only


def test_no_requests_gives_nans_and_table_prints():
    m = serve_metrics(Timeline([], {}))
    assert m.requests == 0 and np.isnan(m.latency_p50_ms) and np.isnan(percentile([], 50))
    head, rule, row = format_serve_table([("x", m)]).splitlines()
    assert set(rule) == {"-", " "}
    for col in ("p99 lat ms", "p50 TTFT ms", "p99 TTFT ms", "p50 TPOT ms"):  # units named
        assert col in head
    assert len(head) == len(row)  # the wider headers keep the columns aligned
