"""Durations from a hardware profile, memoized: the simulator asks for one per job.

When the profile carries executor lane costs (`Profile.executor`, measured by `d2moe
profile`), a load pays one disk request per read of the store reader (a large level alone,
neighbouring small ones together: `quant.store.read_groups`), the reads' checksums as the
store reader pipelines them (`profiles.cost.store_reads_us`, as `d2moe profile` prices the
reads it subtracts to find the lane's own work; profiles without
`check_GBps` count them in the lane's work) and the I/O lane's work beyond the reads, a run
pays the compute lane's fixed cost beyond its expert, a layer with expert work pays
`layer_us` before its plan starts (and `handoff_us` more when its plan has loads: the
executor hands only those to the I/O lane's thread), a lane blocked on the other resumes
`wake_us` after the signal (`sim/lanes.py`), a policy that plans slower or faster than the
probe's pays the difference with every layer (`layer_us_for`), a load after the I/O lane
sat idle pays the disk's cold first request (`cold_us`), the first run after a load pays
`first_run_us`, the first run of each layer's plan `layer_first_run_us`, the non-expert
slice right after a plan with loads `non_expert_after_load_us`, and each lane slows to its
measured overlap speed while the other is busy (`sim/contention.py`).
Without them these terms are zero.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from d2moe.core.jobs import ExpertKey, Load, Run
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.policies.view import Sizes
from d2moe.profiles.cost import store_reads_us
from d2moe.quant.store import PIPELINE_MIN_BYTES, read_sizes


class ProfileCosts:
    """Load and run durations for one (model, layout, profile): the `Costs` policies see."""

    def __init__(self, profile: Any, spec: ModelSpec, sizes: Sizes, layout: QuantLayout) -> None:
        self.profile, self.spec, self.sizes, self.layout = profile, spec, sizes, layout
        self.lane_costs = getattr(profile, "executor", None)
        lc = self.lane_costs
        self.layer_us = float(lc.layer_us) if lc is not None else 0.0
        self.wake_us = float(lc.wake_us) if lc is not None else 0.0
        self.io_speed = float(lc.overlap_io_speed) if lc is not None else 1.0
        self.compute_speed = float(lc.overlap_compute_speed) if lc is not None else 1.0
        self.run_wait_us = float(getattr(lc, "overlap_run_wait_us", 0.0)) \
            if lc is not None else 0.0
        self._run_fixed_us = float(lc.run_us) if lc is not None else 0.0
        self.cold_us = lc.cold_us if lc is not None and lc.any_cold \
            else None  # (idle us) -> extra us of a load, or None: loads are never cold
        self.first_run_us = float(getattr(lc, "first_run_us", 0.0)) if lc is not None else 0.0
        self.layer_first_run_us = float(getattr(lc, "layer_first_run_us", 0.0)) \
            if lc is not None else 0.0
        self.handoff_us = float(getattr(lc, "handoff_us", 0.0)) if lc is not None else 0.0
        self.after_load_us = float(getattr(lc, "non_expert_after_load_us", 0.0)) \
            if lc is not None else 0.0
        self.check_GBps = float(getattr(lc, "check_GBps", math.inf)) if lc is not None \
            else math.inf
        self._load: dict[tuple[int, str, int], float] = {}
        self._raise: dict[tuple[int, int, str], float] = {}
        self._run: dict[tuple[int, int], float] = {}
        self._non_expert: dict[int, float] = {}
        self._head: dict[int, float] = {}

    def layer_us_for(self, policy: str) -> float:
        """`layer_us` for a layer planned by `policy`: plus its planning time beyond that of
        the policy the profile's probe planned with (`ExecutorCosts.plan_extra_us`), at
        least 0."""
        lc = self.lane_costs
        extra = lc.plan_extra_us(policy) if lc is not None and hasattr(lc, "plan_us") else 0.0
        return max(self.layer_us + extra, 0.0)

    def bytes_us(self, nbytes: int, tier: str = "disk", requests: int = 1) -> float:
        """A load of `nbytes` from `tier` in `requests` reads, with the lane's own costs."""
        key = (nbytes, tier, requests)
        us = self._load.get(key)
        if us is None:
            lc = self.lane_costs
            if lc is None:
                us = float(self.profile.load_us(nbytes, tier))
            else:
                us = float(self.profile.load_us(nbytes, tier, requests)
                           + lc.load_extra_us(nbytes))
            self._load[key] = us
        return us

    def requests(self, bits_from: int, bits_to: int) -> int:
        """Read requests of a raise: as the store reader groups its levels (nested), else
        one copy."""
        if self.lane_costs is None or not self.layout.nested:
            return 1
        return max(1, len(self.reads(bits_from, bits_to)))

    def levels(self, bits_from: int, bits_to: int) -> list[int]:
        """Bytes of each stored level a raise moves, in order (one copy when not nested)."""
        if not self.layout.nested:
            return [self.sizes.load(bits_from, bits_to)]
        by_bits, b1 = self.sizes.by_bits, self.layout.b1
        return [by_bits[b] - (by_bits[b - 1] if b > b1 else 0)
                for b in range(b1 if bits_from == 0 else bits_from + 1, bits_to + 1)]

    def reads(self, bits_from: int, bits_to: int) -> list[int]:
        """Bytes of each read of a raise: its levels grouped as the store reader reads them
        (`quant.store.read_groups`: small neighbours in one request)."""
        levels = self.levels(bits_from, bits_to)
        if not self.layout.nested:
            return levels
        return read_sizes(levels, PIPELINE_MIN_BYTES)

    def raise_us(self, bits_from: int, bits_to: int, tier: str = "disk") -> float:
        """A raise from `bits_from` to `bits_to` bits read from `tier`: from disk, read and
        checked as the store reader reads and checks it, when the profile measured
        the checks (`check_GBps`); else `bytes_us` of the whole."""
        key = (bits_from, bits_to, tier)
        us = self._raise.get(key)
        if us is None:
            nbytes = self.sizes.load(bits_from, bits_to)
            # a RAM copy (host tier) was checked when it came from disk: no checks again
            if tier != "disk" or math.isinf(self.check_GBps) or nbytes <= 0:
                us = self.bytes_us(nbytes, tier, self.requests(bits_from, bits_to))
            else:
                us = (store_reads_us(self.levels(bits_from, bits_to),
                                     lambda n: float(self.profile.load_us(n, tier)),
                                     self.check_GBps, PIPELINE_MIN_BYTES)
                      + self.lane_costs.load_extra_us(nbytes))
            self._raise[key] = us
        return us

    def load_us_of(self, ld: Load, nbytes: int, host: HostCache) -> float:
        """Duration of `ld` moving `nbytes`, from host RAM when the host tier holds it, with
        its evictions (the executor makes them on the I/O lane, inside the load)."""
        us = self.raise_us(ld.bits_from, ld.bits_to,
                           host.tier_for(ld) if host.capacity_bytes > 0 else "disk")
        if ld.evict and self.lane_costs is not None:
            us += len(ld.evict) * self.lane_costs.evict_us
        return us

    def load_us(self, key: ExpertKey, bits_from: int, bits_to: int) -> float:
        return self.raise_us(bits_from, bits_to)

    def run_us(self, key: ExpertKey, bits: int, tokens: int) -> float:
        k = (bits, tokens)
        us = self._run.get(k)
        if us is None:
            us = self._run[k] = float(self.profile.run_us(self.spec, bits, tokens, self.layout)
                                      + (self._run_fixed_us if tokens > 0 else 0.0))
        return us

    def run_us_of(self, run: Run) -> float:
        us = self._run.get((run.bits, run.tokens))  # the hot path: one lookup when cached
        return us if us is not None else self.run_us(run.key, run.bits, run.tokens)

    def non_expert_us(self, tokens: int) -> float:
        us = self._non_expert.get(tokens)
        if us is None:
            us = self._non_expert[tokens] = float(self.profile.non_expert_us(self.spec, tokens))
        return us

    def non_expert_us_of(self, layer: int, tokens: int, after_load: bool = False) -> float:
        """Layer `layer`'s non-expert part: layer 0's also holds the step's head (the
        previous step's LM head and sampling, the embedding), as in the executor's rows;
        right after a plan with loads (`after_load`) it takes `after_load_us` longer."""
        extra = self.after_load_us if after_load else 0.0
        if layer:
            return self.non_expert_us(tokens) + extra
        us = self._head.get(tokens)
        if us is None:
            us = self._head[tokens] = self.non_expert_us(tokens) + float(
                self.profile.head_us(self.spec, tokens))
        return us + extra


class HostCache:
    """An optional host-RAM tier: experts once read from disk stay in RAM (LRU by bytes), so
    a later load of planes already there crosses only the host-to-device link."""

    def __init__(self, capacity_bytes: int, sizes: Sizes) -> None:
        self.capacity_bytes = capacity_bytes
        self.sizes = sizes
        self.bits: OrderedDict[ExpertKey, int] = OrderedDict()
        self.used_bytes = 0

    def tier_for(self, ld: Load) -> str:
        """Where this load reads from ('host' or 'disk'); then the RAM copy is refreshed."""
        if self.capacity_bytes <= 0:
            return "disk"
        have = self.bits.get(ld.key, 0)
        tier = "host" if have >= ld.bits_to else "disk"
        if have:
            self.bits.move_to_end(ld.key)
        if have < ld.bits_to:
            size = self.sizes.by_bits[ld.bits_to]
            if size <= self.capacity_bytes:
                self.used_bytes += size - self.sizes.by_bits[have]
                self.bits[ld.key] = ld.bits_to
                self.bits.move_to_end(ld.key)
                while self.used_bytes > self.capacity_bytes:
                    old, ob = self.bits.popitem(last=False)
                    self.used_bytes -= self.sizes.by_bits[ob]
        return tier
