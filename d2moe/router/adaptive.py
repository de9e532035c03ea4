"""Online adaptive capacity (beyond the paper: its authors name fixed offline capacities as a
limit): the bit-width shares follow the load the executor observes at run time.

A pure decision object. Once per window of W decode steps, `AdaptiveCapacity` turns the
window's observations (from the Event rows every backend writes: the compute lane's stall
time, the steps' wall time, bytes loaded) into the shares of the next window:

- stall fraction f = Σ stall / Σ step wall time over the window (prefill is not observed);
- f > `stall_high`: one move **down**: take δ from the widest width whose share is above
  `min_share` and give it to the nearest narrower width below `max_share`;
- f < `stall_low`: one move **up**: with `ceiling="trained"`, take δ from the narrowest width
  above its trained share and give it to the nearest wider width below its trained share
  (so the shares return exactly to the trained capacities and never pass them); with
  `ceiling="bounds"`, from the narrowest width above `min_share` to the nearest wider width
  below `max_share` (more bits than trained while nothing stalls);
- otherwise (the dead band) the shares stay.

δ = min(`share_step`, what the giver can give, what the taker can take). Every move keeps
Σ shares = 1 and every share within [min_share, max_share]. Why this order: the measured
perplexities of the tiny model (docs/results/router.md) fall with diminishing returns in
bits (uniform 2 -> 3 bits -2.7%, 3 -> 4 bits -0.4%), so the cheapest bits to give up are
the widest width's and the most valuable to restore the narrowest's. Why stall time: it is
what the compute lane loses to loads, the quantity a smaller share of wide experts can
reduce (smaller loads, more experts fitting the budget); bytes per token ignore overlap.

No clock and no torch here: the same calls work from the simulator's timeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from d2moe.core.errors import UserError

MODES = ("fixed", "adaptive")
CEILINGS = ("trained", "bounds")
DEFAULT_WINDOW = 16  # decode steps per decision (and tokens per capacity window) if 0 given
_EPS = 1e-12


@dataclass(frozen=True)
class CapacityConfig:
    """Options of `d2moe run --router` for the capacities (the CLI is built from these)."""

    capacity_mode: str = field(default="fixed", metadata={
        "help": "fixed: the router's trained capacities; adaptive: shares move once per "
                "window with the compute lane's stall time (docs/router.md)"})
    capacity_window: int = field(default=0, metadata={
        "help": "tokens per capacity window of decode steps, and decode steps per adaptive "
                f"decision; 0: the router's own window (fixed), {DEFAULT_WINDOW} (adaptive)"})
    stall_high: float = field(default=0.05, metadata={
        "help": "adaptive: move share down a width when stall time / wall time over a "
                "window exceeds this"})
    stall_low: float = field(default=0.01, metadata={
        "help": "adaptive: move share back up when the stall fraction is below this"})
    share_step: float = field(default=0.05, metadata={
        "help": "adaptive: share moved per decision"})
    min_share: float = field(default=0.0, metadata={"help": "adaptive: lower bound per width"})
    max_share: float = field(default=1.0, metadata={"help": "adaptive: upper bound per width"})
    share_ceiling: str = field(default="trained", metadata={
        "help": "adaptive: trained (up moves stop at the trained capacities) or bounds "
                "(up to --max-share: more bits than trained while nothing stalls)"})

    def __post_init__(self) -> None:
        if self.capacity_mode not in MODES:
            raise UserError(f"unknown capacity mode {self.capacity_mode!r}",
                            field="capacity-mode", fix="use fixed or adaptive")
        if self.share_ceiling not in CEILINGS:
            raise UserError(f"unknown ceiling {self.share_ceiling!r}", field="share-ceiling",
                            fix="use trained or bounds")
        if self.capacity_window < 0:
            raise UserError(f"must be >= 0, got {self.capacity_window}",
                            field="capacity-window", fix="e.g. 16 (0: the default)")
        if not 0 <= self.stall_low <= self.stall_high <= 1:
            raise UserError(f"need 0 <= stall-low <= stall-high <= 1, got {self.stall_low}, "
                            f"{self.stall_high}", field="stall-high",
                            fix="e.g. --stall-low 0.01 --stall-high 0.05")
        if not 0 < self.share_step <= 1:
            raise UserError(f"must lie in (0, 1], got {self.share_step}", field="share-step",
                            fix="e.g. 0.05")
        if not 0 <= self.min_share <= self.max_share <= 1:
            raise UserError(f"need 0 <= min-share <= max-share <= 1, got {self.min_share}, "
                            f"{self.max_share}", field="min-share", fix="e.g. 0 and 1")

    def window_for(self, router_window: int) -> int:
        """Tokens per capacity window: the option, else the mode's default."""
        if self.capacity_window:
            return self.capacity_window
        return DEFAULT_WINDOW if self.capacity_mode == "adaptive" else router_window


@dataclass(frozen=True)
class StepObservation:
    """What one decode step cost, from its Event rows (times in microseconds)."""

    step: int
    wall_us: float
    stall_us: float
    load_bytes: int
    tokens: int


@dataclass(frozen=True)
class Decision:
    """One window's decision: its last step, the observed signal and the new shares."""

    step: int
    stall_fraction: float
    bytes_per_token: float
    shares: tuple[float, ...]


def step_observation(events: Iterable, step: int, start_us: float, end_us: float
                     ) -> StepObservation:
    """A step's observation from Event rows (any backend's): stalls, load bytes, wall time."""
    stall, nbytes, tokens = 0.0, 0, 0
    for e in events:
        if e.step != step:
            continue
        if e.lane == "compute" and e.kind == "stall":
            stall += e.end_us - e.start_us
        elif e.lane == "io":
            nbytes += int(e.bytes)
        elif e.lane == "step":
            tokens = max(tokens, int(e.tokens))
    return StepObservation(step, max(0.0, end_us - start_us), stall, nbytes, tokens)


def _move(shares: list[float], give: int, take: int, amount: float) -> tuple[float, ...]:
    shares[give] -= amount
    shares[take] += amount
    return tuple(round(s, 12) for s in shares)


def decide(shares: Sequence[float], trained: Sequence[float], stall_fraction: float,
           cfg: CapacityConfig) -> tuple[float, ...]:
    """The next window's shares (module doc): one bounded move down, up, or none."""
    s, k = list(shares), len(shares)
    lo, hi = cfg.min_share, cfg.max_share
    if stall_fraction > cfg.stall_high:  # down: from the widest that can give
        for i in reversed(range(k)):
            if s[i] <= lo + _EPS:
                continue
            for j in reversed(range(i)):  # the nearest narrower width with room
                if s[j] < hi - _EPS:
                    return _move(s, i, j, min(cfg.share_step, s[i] - lo, hi - s[j]))
        return tuple(shares)
    if stall_fraction < cfg.stall_low:  # up: from the narrowest that can give
        floor = trained if cfg.share_ceiling == "trained" else [lo] * k
        cap = trained if cfg.share_ceiling == "trained" else [hi] * k
        for i in range(k):
            if s[i] <= max(lo, floor[i]) + _EPS:
                continue
            for j in range(i + 1, k):  # the nearest wider width with room
                room = min(hi, cap[j]) - s[j]
                if room > _EPS:
                    return _move(s, i, j, min(cfg.share_step, s[i] - max(lo, floor[i]), room))
        return tuple(shares)
    return tuple(shares)


def mean_bits(shares: Sequence[float], bits: Sequence[int]) -> float:
    """Average bits of a share vector."""
    return sum(s * b for s, b in zip(shares, bits, strict=True))


class AdaptiveCapacity:
    """Per-window controller: `observe` each decode step; every `window_steps` steps it
    returns the next window's shares (also when unchanged), else None."""

    def __init__(self, trained: Sequence[float], cfg: CapacityConfig, window_steps: int
                 ) -> None:
        trained = tuple(float(c) for c in trained)
        k = len(trained)
        if abs(sum(trained) - 1) > 1e-6:
            raise UserError(f"adaptive capacity moves shares that sum to 1; the router's "
                            f"capacities {trained} sum to {sum(trained):g}",
                            field="capacity-mode",
                            fix="train a router with capacities summing to 1 (e.g. "
                                "0.3,0.4,0.3) or use --capacity-mode fixed")
        if k * cfg.min_share > 1 + 1e-9 or k * cfg.max_share < 1 - 1e-9:
            raise UserError(f"no {k} shares in [{cfg.min_share}, {cfg.max_share}] sum to 1",
                            field="min-share", fix=f"keep min-share <= {1 / k:.3g} <= max-share")
        bad = [c for c in trained if not cfg.min_share - 1e-9 <= c <= cfg.max_share + 1e-9]
        if bad:
            raise UserError(f"trained capacities {trained} lie outside [{cfg.min_share}, "
                            f"{cfg.max_share}]", field="min-share",
                            fix="widen --min-share/--max-share to include them")
        if window_steps < 1:
            raise UserError(f"must be positive, got {window_steps}", field="capacity-window",
                            fix="e.g. 16")
        self.trained, self.cfg, self.window_steps = trained, cfg, window_steps
        self.reset()

    def reset(self) -> None:
        """Back to the trained capacities, with no observations."""
        self.shares = self.trained
        self.decisions: list[Decision] = []
        self._window: list[StepObservation] = []

    def observe(self, obs: StepObservation) -> tuple[float, ...] | None:
        """Add one decode step; at a window's end decide and return the new shares."""
        self._window.append(obs)
        if len(self._window) < self.window_steps:
            return None
        wall = sum(o.wall_us for o in self._window)
        stall = sum(o.stall_us for o in self._window)
        tokens = sum(o.tokens for o in self._window)
        frac = stall / wall if wall > 0 else 0.0
        per_token = sum(o.load_bytes for o in self._window) / tokens if tokens else math.nan
        self.shares = decide(self.shares, self.trained, frac, self.cfg)
        self.decisions.append(Decision(obs.step, frac, per_token, self.shares))
        self._window = []
        return self.shares

    def record(self) -> dict:
        """JSON-ready: the config, the trained shares and every decision."""
        from dataclasses import asdict

        return {"config": asdict(self.cfg), "window_steps": self.window_steps,
                "trained": list(self.trained),
                "decisions": [asdict(d) | {"shares": list(d.shares)} for d in self.decisions]}


def run_bits(events: Iterable, first_step: int = 0) -> float:
    """Mean bits over the expert runs of steps >= `first_step`, weighted by tokens (each
    token's top-k slots run at its width, so this is the per-token-and-layer mean)."""
    total = weight = 0
    for e in events:
        if e.kind == "run" and e.step >= first_step:
            total += e.bits_to * e.tokens
            weight += e.tokens
    return total / weight if weight else math.nan


def describe(meta: dict, avg_bits: float, source: str = "measured") -> str:
    """One summary line of a router run's capacities (timeline.meta['capacity']); `source`
    labels the average bits: measured (executor) or simulated. A run shorter than one
    adaptive window made no decision: the line says so (shares still the trained ones)."""
    if "decisions" not in meta:
        shares = "/".join(f"{s:.2f}" for s in meta["shares"])
        return (f"bit-width router: fixed capacities {shares} (window {meta['window']}); "
                f"average bits {avg_bits:.3f} over decode runs ({source})")
    ds = meta["decisions"]
    trained = "/".join(f"{s:.2f}" for s in meta["trained"])
    tail = f"average bits {avg_bits:.3f} over decode runs ({source})"
    if not ds:
        return (f"bit-width router: adaptive capacities, no decisions yet (one per "
                f"{meta['window_steps']} decode steps; the run had fewer), shares the trained "
                f"{trained}; {tail}")
    last = "/".join(f"{s:.2f}" for s in ds[-1]["shares"])
    fracs = ", ".join(f"{d['stall_fraction']:.3f}" for d in ds[:8])
    more = ", ..." if len(ds) > 8 else ""
    return (f"bit-width router: adaptive capacities, {len(ds)} decisions of "
            f"{meta['window_steps']} decode steps (stall fractions {fracs}{more}), shares now "
            f"{last} (trained {trained}); {tail}")
