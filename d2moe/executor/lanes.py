"""The I/O lane of the real executor: a thread that carries out a plan's loads in order.

For each load: wait for the runs its evictions must follow (`core.jobs.load_waits`), apply
the evictions, read the missing levels from the store (pread, O_DIRECT where allowed),
convert them to the kernels' layout and place them in the pool; then signal the compute
lane. Rows go to the shared event list with real timestamps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from d2moe.core.events import Event, load_event
from d2moe.core.jobs import Load, Plan, load_waits
from d2moe.executor.pool import ExpertPool
from d2moe.quant.store import StoreReader


@dataclass
class LayerWork:
    """One layer's plan in flight: completion flags shared by the two lanes."""

    step: int
    layer: int
    plan: Plan
    load_done: list[threading.Event] = field(default_factory=list)
    run_done: list[threading.Event] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.load_done = [threading.Event() for _ in self.plan.loads]
        self.run_done = [threading.Event() for _ in self.plan.runs]


class IOLane:
    """A daemon thread executing loads; `submit` queues a layer's work, in order."""

    def __init__(self, store: StoreReader, pool: ExpertPool, events: list[Event],
                 clock_us: Callable[[], float],
                 observe: Callable[[Load, float], None] | None = None) -> None:
        self.store, self.pool, self.events, self.clock_us = store, pool, events, clock_us
        self.observe = observe
        self._copy_stream = None  # CUDA: host-to-device copies run on their own stream
        self._compute_stream = None
        self._queue: queue.Queue[LayerWork | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="d2moe-io", daemon=True)
        self._thread.start()

    def submit(self, work: LayerWork) -> None:
        self._queue.put(work)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                self._run(work)
            except BaseException as exc:  # surfaced on the compute lane, which waits on us
                work.error = exc
                for ev in work.load_done:
                    ev.set()

    def _run(self, work: LayerWork) -> None:
        waits = load_waits(work.plan)
        pool, rows = self.pool, self.events
        if pool.device.type == "cuda":
            import torch

            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(pool.device)
                self._compute_stream = torch.cuda.current_stream(pool.device)
        for i, ld in enumerate(work.plan.loads):
            if waits[i] >= 0:
                work.run_done[waits[i]].wait()
            start = self.clock_us()
            for ev in ld.evict:
                freed = pool.evict(ev)
                rows.append(Event("memory", "evict", work.step, ev.key.layer, ev.key.expert,
                                  ev.bits_from, ev.bits_to, 0, freed, start, start))
            raw = self.store.read_planes(ld.key.layer, ld.key.expert, ld.bits_from, ld.bits_to)
            if self._copy_stream is None:  # CPU: converted straight into the pool
                nbytes = pool.admit_stored(ld, raw)
            else:
                data = {bits: pool.fmt.convert(bits, raw[bits]) for bits in pool.levels_of(ld)}
                nbytes = self._admit_cuda(ld, data)
            end = self.clock_us()
            rows.append(load_event(work.step, ld, nbytes, start, end))
            if self.observe is not None:
                self.observe(ld, end - start)
            work.load_done[i].set()


    def _admit_cuda(self, ld: Load, data: dict) -> int:
        """Upload on the copy stream, after the kernels already queued on the compute stream
        (a freed block they read may be reused), and wait for the copy to land."""
        import torch

        stream = self._copy_stream
        with torch.cuda.stream(stream):
            stream.wait_stream(self._compute_stream)
            return self.pool.admit(ld, data)  # each level's upload synchronizes the stream


def now_us_since(t0: float) -> Callable[[], float]:
    """A clock in microseconds since `t0` (a time.perf_counter() value)."""
    return lambda: (time.perf_counter() - t0) * 1e6
