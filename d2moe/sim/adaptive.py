"""The bit-width router's capacities in the simulator: fixed or online adaptive.

The executor asks the bit-width router live for each layer's widths; the simulator cannot run
the gate, but a trace recorded with `d2moe trace record --router` carries the gate's
probabilities (`prefs` [N, L, k, K]) and the router's widths, trained capacities,
granularity and window (meta `router_config`). `RoutedSteps` places those recorded
preferences with the router's own capacity code (`d2moe.router.capacity.CapacityWindow`, the
numpy path of the very rule `BitRouter` runs) under the current shares, and builds each
step's demands from the widths it gets (`group_demands`, the grouping `Trace.demands` uses).

It mirrors `d2moe/executor/backend.py` (and `executor/cmd.py: capacity_controller`) step for step:

- one running window per layer of W tokens x rows per token (k for a per-slot router), W =
  `CapacityConfig.window_for(router window)`, starting at the trained capacities; the
  prefill is placed under them too (one batch when it has W tokens or more, else it opens
  the running window, as in the executor);
- after each simulated decode step, `AdaptiveCapacity.observe(step_observation(rows))` on
  that step's Event rows; shares it returns (every W decode steps) restart the windows
  (`BitRouter.set_capacities`) and apply from the next step's first layer.

Fixed mode with the recorded window places exactly the recorded widths (tested), so the
simulator replays `trace.bits` there without re-placing (`capacity_source`). No torch, no
clock: only numpy and the pure controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.events import Event
from d2moe.router.adaptive import AdaptiveCapacity, CapacityConfig, step_observation
from d2moe.router.capacity import CapacityWindow, check_capacities
from d2moe.sim.simulator import StepSource, StepWork
from d2moe.sim.workload import steps_from_trace
from d2moe.traces.schema import DECODE, group_demands

_FIX_RECORD = ("record the trace with the router: d2moe trace record --router DIR (it then "
               "carries the gate's probabilities, `prefs`)")


@dataclass(frozen=True)
class RecordedRouter:
    """The router a trace was recorded with (meta `router_config`, checked on load)."""

    bits: tuple[int, ...]
    capacities: tuple[float, ...]
    granularity: str  # "slot" | "token"
    window_tokens: int

    @classmethod
    def of(cls, trace: Any) -> RecordedRouter | None:
        """From the trace's meta; None when the trace carries no `prefs`."""
        if trace.prefs is None:
            return None
        cfg = trace.meta["router_config"]
        return cls(tuple(int(b) for b in cfg["bits"]),
                   tuple(float(c) for c in cfg["capacities"]), str(cfg["granularity"]),
                   int(cfg["window"]))

    def rows_per_token(self, top_k: int) -> int:
        """Capacity rows per token: one per expert slot (per-slot router) or one."""
        return top_k if self.granularity == "slot" else 1


class RoutedSteps(StepSource):
    """A trace's steps with the widths its recorded preferences get under the current
    shares (module doc); `controller` None: fixed capacities over `window_tokens`."""

    def __init__(self, trace: Any, default_bits: int, router: RecordedRouter,
                 window_tokens: int, controller: AdaptiveCapacity | None = None,
                 max_steps: int = 0) -> None:
        self.trace, self.default_bits, self.router = trace, default_bits, router
        self.controller, self.window_tokens = controller, window_tokens
        self.rows = router.rows_per_token(trace.top_k)
        self.widths = np.asarray(router.bits, dtype=np.int8)  # [K]
        self.n = trace.num_steps if max_steps <= 0 else min(max_steps, trace.num_steps)
        if controller is not None:
            controller.reset()
        self._set_shares(controller.shares if controller is not None else router.capacities)

    def _set_shares(self, shares: Sequence[float]) -> None:
        """New shares from the next step on; every layer's window restarts (as
        `BitRouter.set_capacities`)."""
        self.shares = check_capacities(shares, len(self.router.bits))
        self.window = CapacityWindow(self.shares, self.window_tokens * self.rows)

    def __len__(self) -> int:
        return self.n

    def max_bits(self, default: int) -> int:
        """The widest width the router can give (any share may grow)."""
        return max(max(self.router.bits), default)

    def min_bits(self, default: int) -> int:
        """The narrowest width the router can give (any share may grow)."""
        return min(self.router.bits)

    def step_bits(self, s: int) -> np.ndarray:
        """Bits [T, L, k] (int8) of step s's (token, slot) rows, placed layer by layer."""
        lo, hi = self.trace.token_range(s)
        prefs = self.trace.prefs[lo:hi]  # [T, L, k, K]
        t, n_layers, k, n_widths = prefs.shape
        out = np.empty((t, n_layers, k), dtype=np.int8)  # [T, L, k]
        for layer in range(n_layers):
            p = prefs[:, layer]  # [T, k, K]
            if self.rows == 1:  # per token: one row, every slot at its width
                idx = self.window.place(layer, p[:, 0, :])  # [T]
                out[:, layer, :] = self.widths[idx][:, None]
            else:
                idx = self.window.place(layer, p.reshape(-1, n_widths))  # [T * k]
                out[:, layer, :] = self.widths[idx].reshape(t, k)
        return out

    def work(self, s: int) -> StepWork:
        """Step s's demands at the widths placed now (grouped like `Trace.demands`)."""
        tr = self.trace
        lo, hi = tr.token_range(s)
        demands = group_demands(tr.experts[lo:hi], tr.weights[lo:hi], self.step_bits(s),
                                np.array([0, hi - lo]), tr.num_experts, self.default_bits)
        return StepWork(tr.phase(s), hi - lo, demands[0])

    def observe(self, s: int, events: Sequence[Event], start_us: float, end_us: float) -> None:
        """A decode step's rows feed the controller; its shares apply from step s + 1."""
        if self.controller is None or int(self.trace.phase_codes[s]) != DECODE:
            return
        shares = self.controller.observe(step_observation(events, s, start_us, end_us))
        if shares is not None:
            self._set_shares(shares)

    def record(self) -> dict:
        """The timeline's `capacity` meta, as the executor writes it."""
        if self.controller is not None:
            return self.controller.record()
        return fixed_record(self.router.capacities, self.window_tokens)


class RecordedSteps(StepSource):
    """The trace's recorded widths replayed as they are, with the `capacity` meta of the
    router that chose them (None: no router)."""

    def __init__(self, steps: Sequence[StepWork], capacity: dict | None) -> None:
        super().__init__(steps)
        self.capacity = capacity

    def record(self) -> dict | None:
        """The timeline's `capacity` meta."""
        return self.capacity


def fixed_record(shares: Sequence[float], window_tokens: int) -> dict:
    """`capacity` meta of fixed capacities (the executor's form)."""
    return {"mode": "fixed", "shares": list(shares), "window": window_tokens}


def capacity_source(trace: Any, default_bits: int, cfg: CapacityConfig | None,
                    max_steps: int = 0) -> RecordedSteps | RoutedSteps:
    """The steps to simulate under `cfg`; `.record()` gives the timeline's `capacity` meta
    after the run (None: the trace has no router).

    Replays `trace.bits` unless the widths must be re-placed: adaptive mode, or fixed mode
    with a window other than the recorded one. Build one per simulated policy: a
    RoutedSteps carries the controller's and the windows' state.
    """
    router = RecordedRouter.of(trace)
    cfg = cfg or CapacityConfig()
    if router is None:
        if cfg.capacity_mode == "adaptive" or cfg.capacity_window:
            option = ("capacity-mode" if cfg.capacity_mode == "adaptive"
                      else "capacity-window")
            raise UserError(f"--{option} re-places the bit-width router's choices, but this "
                            f"trace carries no router preferences", path=trace.path,
                            field="prefs", fix=_FIX_RECORD)
        return RecordedSteps(steps_from_trace(trace, default_bits, max_steps), None)
    window = cfg.window_for(router.window_tokens)
    if cfg.capacity_mode == "adaptive":
        ctl = AdaptiveCapacity(router.capacities, cfg, window)
        return RoutedSteps(trace, default_bits, router, window, ctl, max_steps)
    if window != router.window_tokens:
        return RoutedSteps(trace, default_bits, router, window, None, max_steps)
    return RecordedSteps(steps_from_trace(trace, default_bits, max_steps),
                         fixed_record(router.capacities, window))
