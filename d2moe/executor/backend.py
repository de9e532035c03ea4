"""The real executor's expert backend: each MoE layer's routing becomes demands, the shared
policy plans them, the I/O lane loads and the compute lane (this thread) runs, in plan order.

It plugs into the model's seam (`d2moe.model.moe.ExpertBackend`) and writes the same Event
rows as the simulator, with real timestamps: non-expert time is the compute lane's time
between two layers' expert work; a step spans from the end of the previous step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline, run_event
from d2moe.core.jobs import Demand, ExpertKey, Load, run_waits
from d2moe.executor.lanes import IOLane, LayerWork, now_us_since
from d2moe.executor.pool import ExpertPool
from d2moe.kernels import cpu_native
from d2moe.kernels.dispatch import expert_swiglu
from d2moe.policies.presets import Policy
from d2moe.quant.store import StoreReader


class ObservedCosts:
    """Cost estimates for policies that use them (Johnson): running means of what the lanes
    measured, falling back to a bytes-proportional guess before the first observation."""

    def __init__(self, pool: ExpertPool) -> None:
        self.pool = pool
        self.load_mean: dict[tuple[int, int], tuple[float, int]] = {}
        self.run_mean: dict[tuple[int, int], tuple[float, int]] = {}

    @staticmethod
    def _add(table: dict, key: Any, us: float) -> None:
        total, n = table.get(key, (0.0, 0))
        table[key] = (total + us, n + 1)

    def observe_load(self, ld: Load, us: float) -> None:
        self._add(self.load_mean, (ld.bits_from, ld.bits_to), us)

    def observe_run(self, bits: int, tokens: int, us: float) -> None:
        self._add(self.run_mean, (bits, tokens), us)

    def load_us(self, key: ExpertKey, bits_from: int, bits_to: int) -> float:
        total, n = self.load_mean.get((bits_from, bits_to), (0.0, 0))
        return total / n if n else self.pool.accounting.sizes.load(bits_from, bits_to) / 1e3

    def run_us(self, key: ExpertKey, bits: int, tokens: int) -> float:
        total, n = self.run_mean.get((bits, tokens), (0.0, 0))
        return total / n if n else self.pool.accounting.sizes.by_bits[bits] / 1e4 * tokens


class StreamingExperts:
    """An ExpertBackend that streams nested experts from a store under a byte budget.

    A layer's plan goes to the I/O lane only when it has loads (evictions ride on loads, so
    a plan without loads gives that lane nothing to do): waking the lane's thread cost the
    compute lane 50-75 us per layer on a quiet 2-core CPU (in the layer's dispatch and its
    first run, where the woken thread takes the interpreter lock), hundreds under load.
    `handoff_empty=True` hands every plan over, loads or not (the behaviour before
    2026-11-23, kept only so benchmarks and probes can measure what skipping it saves).

    `sync_rows=True` (CUDA) waits for the compute stream before the clock reads a
    non-expert or run row's end, so the rows hold the GPU's work rather than its launches
    (whose kernels otherwise finish inside the next `.tolist()`, outside every row); it
    gives up the overlap of launches with the GPU. On the CPU every row is synchronous
    already and it changes nothing.
    """

    def __init__(self, store: StoreReader, policy: Policy, pool: ExpertPool, *,
                 bits: int, kernel_backend: str = "auto", router: Any = None,
                 capacity: Any = None, handoff_empty: bool = False,
                 sync_rows: bool = False) -> None:
        self.store, self.policy, self.pool, self.bits = store, policy, pool, bits
        self.handoff_empty = handoff_empty
        # called before each non-expert and run row's end is read (None: no wait)
        self.row_sync: Callable[[], None] | None = (
            torch.cuda.current_stream(pool.device).synchronize
            if sync_rows and pool.device.type == "cuda" else None)
        self.io_submits = 0  # layers handed to the I/O lane (tests count them)
        # router: a d2moe.router BitRouter; asked live for each token's bits (else `bits`)
        self.router = router
        if router is not None:
            router.reset()
        # capacity: a d2moe.router.adaptive.AdaptiveCapacity fed each decode step's Event
        # rows; its shares become the router's capacities from the next step on
        self.capacity = capacity
        self._scan = 0  # events before this index belong to observed steps
        if capacity is not None:
            if router is None:
                raise ValueError("adaptive capacity needs a bit-width router")
            capacity.reset()
            router.set_capacities(capacity.shares, window=capacity.window_steps)
        self.kernel_backend = kernel_backend
        if pool.device.type == "cpu":
            cpu_native.status()  # the CPU kernel built (once a machine) before the clock runs
        self.events: list[Event] = []
        self.t0 = time.perf_counter()
        self.clock = now_us_since(self.t0)
        self.costs = ObservedCosts(pool)
        self.io = IOLane(store, pool, self.events, self.clock, observe=self.costs.observe_load)
        self.step = -1
        self.step_phase: str | None = None  # set by a serving loop before each forward;
        self._phase: str | None = None  # None: step 0 is the prefill, later steps decode
        self.initial_bytes = self._preload()
        self._step_start = 0.0
        self._last_end = 0.0  # when the compute lane last finished expert work
        self._step_tokens = 0
        self._step_open = False  # a step began and its "step" row is not written yet

    def _preload(self) -> int:
        """Carry out the policy's preload (Hold-in-Memory: every expert) before the clock
        starts; returns the resident bytes. Refused when it exceeds the budget."""
        spec, pool = self.pool.spec, self.pool
        experts = [ExpertKey(layer, e) for layer in range(spec.layers)
                   for e in range(spec.experts)]
        self.policy.reset()
        loads = self.policy.preload(experts, pool.view)
        sizes = pool.accounting.sizes
        need = pool.accounting.used_bytes + sum(sizes.load(ld.bits_from, ld.bits_to)
                                                for ld in loads)
        if need > pool.accounting.budget_bytes:
            self.io.close()
            raise UserError(f"policy {self.policy.name} holds every expert in memory: that "
                            f"needs {need} B, the budget is {pool.accounting.budget_bytes} B",
                            field="budget",
                            fix=f"give a budget of at least {need} bytes, or an on-demand policy")
        for ld in loads:
            raw = self.store.read_planes(ld.key.layer, ld.key.expert, ld.bits_from, ld.bits_to)
            if pool.cpu:
                pool.admit_stored(ld, raw)
            else:
                pool.admit(ld, {b: pool.fmt.convert(b, raw[b]) for b in pool.levels_of(ld)})
        self.t0 = time.perf_counter()  # the clock starts after the preload
        self.clock = now_us_since(self.t0)
        self.io.clock_us = self.clock
        return pool.accounting.used_bytes

    # -- steps --------------------------------------------------------------------------

    def resume(self) -> None:
        """The caller's next forward starts now. Time since this backend's last expert work
        (another backend's run, the caller's own waiting) is no step's and no row's: the
        current step closes where its work ended and the next layer-0 row starts here, not
        at the last work (where it would hold the whole gap)."""
        self._close_step(self._last_end)
        self._last_end = self.clock()

    def _close_step(self, end: float) -> None:
        if self.step >= 0 and self._step_open:
            self._step_open = False
            phase = self._phase or ("prefill" if self.step == 0 else "decode")
            self.events.append(Event("step", phase, self.step, -1, -1, 0, 0, self._step_tokens,
                                     0, self._step_start, end))
            if self.capacity is not None and self.step >= 1:  # decode steps only
                from d2moe.router.adaptive import step_observation

                obs = step_observation(self.events[self._scan:], self.step, self._step_start,
                                       end)
                shares = self.capacity.observe(obs)
                if shares is not None:
                    self.router.set_capacities(shares)
            self._scan = len(self.events)

    def finish(self) -> Timeline:
        """Close the last step, stop the I/O lane, return the timeline."""
        self._close_step(self.clock())
        self.io.close()
        meta = {"backend": "real", "policy": self.policy.name, "model": self.pool.spec.name,
                "layout": self.pool.layout.kind, "budget_bytes": self.pool.accounting.budget_bytes,
                "peak_resident_bytes": self.pool.accounting.peak_bytes,
                "initial_resident_bytes": self.initial_bytes,
                "arena_bytes": self.pool.capacity_bytes,
                "arena_compactions": self.pool.arena.compactions,
                "device": str(self.pool.device), "direct_io": self.store.direct_io,
                "sync_rows": self.row_sync is not None}
        return Timeline(self.events, meta)

    # -- the seam ------------------------------------------------------------------------

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, k], weights [T, k] -> Σ_k weights · expert(x) [T, D]."""
        if layer == 0:  # a new forward step begins (closed before the router is asked)
            self._close_step(self._last_end)  # a no-op before the first step
            self._phase = self.step_phase
            self.step += 1
            self._step_start = self._last_end  # the last layer's end, or resume()'s time
            self._step_tokens = int(x.shape[0])
            self._step_open = True
        slot_bits = None  # [T, k] bits per (token, slot) from the router (non-expert time)
        if self.router is not None:
            chosen = self.router.choose(layer, x, weights)  # [T] or [T, k]
            slot_bits = (chosen if chosen.dim() == 2 else chosen[:, None].expand_as(ids)).tolist()
        now = self._row_end()
        self.events.append(Event("compute", "non_expert", self.step, layer, -1, 0, 0,
                                 int(x.shape[0]), 0, self._last_end, now))
        groups = _group(ids, weights, self.bits, slot_bits)  # (expert, bits) -> (tok, w)
        demands = [Demand(ExpertKey(layer, e), b, len(tok), float(w.max()))
                   for (e, b), (tok, w) in sorted(groups.items())]
        plan = self.policy.plan(layer, demands, self.pool.view, self.costs)
        work = LayerWork(self.step, layer, plan)
        self._hand_over(work)
        try:
            y = self._run_plan(work, x, groups)
        except BaseException:
            for done in work.run_done:  # let the I/O lane finish this layer and stop cleanly
                done.set()
            raise
        for done in work.load_done:  # every load precedes one of its runs: all are set
            done.wait()
        if work.error is not None:
            raise work.error
        self._last_end = self.clock()
        return y

    def _row_end(self) -> float:
        """The clock at a row's end: after `row_sync`, when set."""
        if self.row_sync is not None:
            self.row_sync()
        return self.clock()

    def _hand_over(self, work: LayerWork) -> None:
        """Queue the layer's loads on the I/O lane; a plan without loads stays here (its
        `load_done` is empty, so nothing below waits on the lane) unless `handoff_empty`."""
        if work.plan.loads or self.handoff_empty:
            self.io.submit(work)
            self.io_submits += 1

    def _run_plan(self, work: LayerWork, x: torch.Tensor,
                  groups: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
                  ) -> torch.Tensor:
        """The compute lane: the plan's runs in order, each after its own load."""
        plan, layer = work.plan, work.layer
        y = torch.zeros_like(x)
        rw = run_waits(plan)
        free = self.clock()
        for j, run in enumerate(plan.runs):
            if rw[j] >= 0 and not work.load_done[rw[j]].is_set():
                work.load_done[rw[j]].wait()
                if work.error is not None:
                    raise work.error
                ready = self.clock()
                self.events.append(Event("compute", "stall", self.step, layer,
                                         run.source.expert, 0, 0, 0, 0, free, ready))
            if work.error is not None:
                raise work.error
            start = self.clock()
            tok, w = groups[(run.key.expert, run.routed_bits)]
            with self.pool.moving:
                m = self.pool.matrices(run.source, run.bits)
                out = expert_swiglu(x[tok], m["w1"], m["w3"], m["w2"], run.bits,
                                    self.kernel_backend)
            y.index_add_(0, tok, out * w[:, None].to(out.dtype))
            free = end = self._row_end()
            self.costs.observe_run(run.bits, run.tokens, end - start)
            self.events.append(run_event(self.step, layer, run, start, end))
            work.run_done[j].set()
        return y


def _group(ids: torch.Tensor, weights: torch.Tensor, bits: int,
           slot_bits: list[list[int]] | None = None
           ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(expert, bits) -> (token indices, router weights) of the tokens routed there; each
    (token, slot) at `slot_bits[t][j]` when given (the bit-width router), else at `bits`."""
    out: dict[tuple[int, int], list] = defaultdict(lambda: [[], []])
    ids_l, w_l = ids.tolist(), weights.float().tolist()
    for t, (row, wrow) in enumerate(zip(ids_l, w_l, strict=True)):
        for j, (e, w) in enumerate(zip(row, wrow, strict=True)):
            b = bits if slot_bits is None else slot_bits[t][j]
            slot = out[(e, b)]
            slot[0].append(t)
            slot[1].append(w)
    dev = ids.device
    return {k: (torch.tensor(v[0], dtype=torch.long, device=dev),
                torch.tensor(v[1], dtype=torch.float32, device=dev)) for k, v in out.items()}
