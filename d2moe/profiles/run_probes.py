"""The run probes of `d2moe profile`, through the compute lane's own run body (gather the
resident planes, the expert, the weighted add): runs per (bits, tokens) on a resident expert,
and what an expert's first run right after an I/O thread loaded it costs beyond the next."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.profiles.load_probes import drop_expert, load_into
from d2moe.profiles.timing import Bar, clear_excess, interleaved_means


def run_bodies(probe: ModelSpec, layout: QuantLayout, device: Any,
               points: Sequence[tuple[int, int]], dtype: Any = None
               ) -> list[Callable[[int], None]]:
    """The compute lane's run body (gather the resident planes, the expert, the weighted
    add) on one resident random expert, one closure per (bits, tokens); activations in
    `dtype` (None: float32), the model's."""
    import torch

    from d2moe.core.jobs import ExpertKey, Load
    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.pool import ExpertPool
    from d2moe.kernels.dispatch import expert_swiglu
    from d2moe.profiles.probe_store import random_matrix
    from d2moe.quant.nested import encode_level
    from d2moe.quant.store import TENSORS, tensor_shapes

    one = dataclasses.replace(probe, experts=1, top_k=1)
    pool = ExpertPool(one, layout, all_experts_bytes(one, layout.bK, layout), device)
    rng = np.random.default_rng(2)
    mats = {t: random_matrix(rng, *shape, layout) for t, shape in tensor_shapes(one).items()}
    key = ExpertKey(0, 0)
    ld = Load(key, 0, layout.bK)
    data = {b: pool.fmt.convert(b, {t: np.frombuffer(encode_level(mats[t], b), np.uint8)
                                    for t in TENSORS}) for b in pool.levels_of(ld)}
    pool.admit(ld, data)
    gen = torch.Generator().manual_seed(3)

    def runner(b: int, n: int) -> Callable[[int], None]:
        x = torch.randn(n, probe.hidden, generator=gen).to(device, dtype or torch.float32)
        tok = torch.arange(n, device=device)
        w = torch.full((n,), 0.5, device=device)
        y = torch.zeros_like(x)

        def run(i: int) -> None:
            with torch.inference_mode():
                with pool.moving:
                    m = pool.matrices(key, b)
                    o = expert_swiglu(x[tok], m["w1"], m["w3"], m["w2"], b)
                y.index_add_(0, tok, o * w[:, None].to(o.dtype))

        return run

    return [runner(b, n) for b, n in points]


def measure_runs(probe: ModelSpec, layout: QuantLayout, device: Any, bits: Sequence[int],
                 tokens: Sequence[int], repeats: int, sync: Callable[[], None],
                 bar: Bar, dtype: Any = None) -> list[tuple[int, int, float]]:
    """(bits, tokens, us) of the compute lane's run body on a resident expert (activations
    in `dtype`)."""
    points = [(b, n) for b in bits for n in tokens]
    means = interleaved_means(run_bodies(probe, layout, device, points, dtype), repeats,
                              sync, bar, "runs")
    return [(b, n, us) for (b, n), us in zip(points, means, strict=True)]


def measure_first_runs(reader: Any, probe: ModelSpec, layout: QuantLayout, device: Any,
                       bits: int, rounds: int, sync: Callable[[], None],
                       dtype: Any = None) -> float:
    """How much longer (us, at least 0) an expert's first run after its load takes than the
    run right after it: an I/O thread (woken through a queue, as `executor/lanes.py`) loads
    the expert while this thread waits, then this thread runs it twice; mean of the
    differences over `rounds` loads, 0 unless clear of their noise (`clear_excess`)."""
    import queue
    import threading

    import torch

    from d2moe.core.jobs import ExpertKey, Load
    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.pool import ExpertPool
    from d2moe.kernels.dispatch import expert_swiglu

    pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout), device)
    keys = [ExpertKey(0, e) for e in range(probe.experts)]
    todo: queue.Queue[int | None] = queue.Queue()
    done = threading.Event()

    def io_lane() -> None:
        while (i := todo.get()) is not None:
            key = keys[i % len(keys)]
            drop_expert(pool, key)
            load_into(reader, pool, Load(key, 0, bits))
            sync()
            done.set()

    x = torch.randn(1, probe.hidden, generator=torch.Generator().manual_seed(7)).to(
        device, dtype or torch.float32)
    tok = torch.arange(1, device=device)
    w = torch.full((1,), 0.5, device=device)
    y = torch.zeros_like(x)

    def run(key: Any) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            with pool.moving:
                m = pool.matrices(key, bits)
                o = expert_swiglu(x[tok], m["w1"], m["w3"], m["w2"], bits)
            y.index_add_(0, tok, o * w[:, None].to(o.dtype))
        sync()
        return (time.perf_counter() - t0) * 1e6

    thread = threading.Thread(target=io_lane, daemon=True)
    thread.start()
    diffs = []
    try:
        for i in range(rounds + 1):  # round 0 warms up
            done.clear()
            todo.put(i)
            done.wait()
            key = keys[i % len(keys)]
            first = run(key)
            second = run(key)
            if i:
                diffs.append(first - second)
    finally:
        todo.put(None)
        thread.join()
    for key in list(pool.blocks):
        drop_expert(pool, key)
    return clear_excess(diffs)
