"""Test timelines with one sequential I/O lane and one sequential compute lane.

`schedule` places given jobs the way both backends do: a layer's non-expert slice runs
first (its router decides the demands), then its loads stream in order on the I/O lane
and its runs follow in order on the compute lane, each waiting for its own load (a
`stall` row covers the wait). Prefetches for the next layer queue on the I/O lane behind
the current layer's loads. Residency is tracked with a byte budget and LRU eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2moe.core.events import Event, Timeline

BYTES_PER_BIT = 100  # an expert at b bits holds b * BYTES_PER_BIT bytes


@dataclass(frozen=True)
class Job:
    """One demand of a layer: expert at bits for tokens, with its run and load times."""

    expert: int
    bits: int
    tokens: int
    run_us: float
    load_us: float  # time to load it when it is not resident


@dataclass(frozen=True)
class Layer:
    non_expert_us: float
    jobs: tuple[Job, ...]


def schedule(steps: list[list[Layer]], *, policy: str = "fifo", budget_bytes: int = 10**12,
             prefetch: bool = False, decode_from: int = 1, tokens_per_step: int = 1,
             meta: dict | None = None) -> Timeline:
    """Place the steps' layers on the two lanes; `policy` is 'fifo' (expert id) or 'hebf'.

    Steps before `decode_from` are prefill. 'hebf' runs resident experts first and loads the
    rest hottest first (most tokens, then most bits).
    """
    ev: list[Event] = []
    t_comp = t_io = 0.0
    resident: dict[tuple[int, int], int] = {}  # (layer, expert) -> bits, in LRU order
    prefetched: dict[tuple[int, int, int], float] = {}  # (step, layer, expert) -> ready time

    def make_room(need: int, step: int, now: float, keep: set[tuple[int, int]]) -> None:
        used = sum(b * BYTES_PER_BIT for b in resident.values())
        for key in list(resident):
            if used + need <= budget_bytes:
                break
            if key in keep:
                continue
            bits = resident.pop(key)
            used -= bits * BYTES_PER_BIT
            ev.append(Event("memory", "evict", step, key[0], key[1], bits, 0, 0,
                            bits * BYTES_PER_BIT, now, now))

    for s, layers in enumerate(steps):
        step_start = t_comp
        for li, layer in enumerate(layers):
            ne_end = t_comp + layer.non_expert_us
            ev.append(Event("compute", "non_expert", s, li, -1, 0, 0, tokens_per_step, 0,
                            t_comp, ne_end))
            t_comp = ne_end
            hit = [j for j in layer.jobs if resident.get((li, j.expert), 0) >= j.bits]
            miss = [j for j in layer.jobs if j not in hit]
            if policy == "hebf":
                miss.sort(key=lambda j: (-j.tokens, -j.bits, j.expert))
                order = hit + miss
            else:
                order = sorted(layer.jobs, key=lambda j: j.expert)
                miss.sort(key=lambda j: j.expert)
            ready: dict[int, float] = {}
            keep = {(li, j.expert) for j in layer.jobs}
            for j in miss:
                start = max(t_io, ne_end)
                have = resident.pop((li, j.expert), 0)
                add = (j.bits - have) * BYTES_PER_BIT
                make_room(add, s, start, keep)
                resident[(li, j.expert)] = j.bits
                t_io = start + j.load_us
                ev.append(Event("io", "load", s, li, j.expert, have, j.bits, 0, add, start, t_io))
                ready[j.expert] = t_io
            for j in hit:
                resident[(li, j.expert)] = resident.pop((li, j.expert))  # LRU touch
                ready[j.expert] = prefetched.get((s, li, j.expert), 0.0)
            if prefetch and li + 1 < len(layers):
                for j in layers[li + 1].jobs[:1]:
                    key = (li + 1, j.expert)
                    if resident.get(key, 0) >= j.bits:
                        continue
                    start = max(t_io, ne_end)
                    have = resident.pop(key, 0)
                    add = (j.bits - have) * BYTES_PER_BIT
                    make_room(add, s, start, keep | {key})
                    resident[key] = j.bits
                    t_io = start + j.load_us
                    ev.append(Event("io", "prefetch", s, li + 1, j.expert, have, j.bits, 0, add,
                                    start, t_io))
                    prefetched[(s, li + 1, j.expert)] = t_io
            for j in order:
                if ready[j.expert] > t_comp:
                    ev.append(Event("compute", "stall", s, li, j.expert, 0, 0, 0, 0, t_comp,
                                    ready[j.expert]))
                    t_comp = ready[j.expert]
                ev.append(Event("compute", "run", s, li, j.expert, j.bits, j.bits, j.tokens, 0,
                                t_comp, t_comp + j.run_us))
                t_comp += j.run_us
        kind = "decode" if s >= decode_from else "prefill"
        ev.append(Event("step", kind, s, -1, -1, 0, 0, tokens_per_step, 0, step_start, t_comp))
    info = {"backend": "sim", "policy": policy, "budget_bytes": budget_bytes}
    return Timeline(ev, {**info, **(meta or {})})


def random_steps(rng: np.random.Generator, *, steps: int, layers: int, experts: int = 16,
                 top: int = 4, bits: tuple[int, ...] = (2, 3, 4)) -> list[list[Layer]]:
    """Random routing with skewed (Zipf-like) expert popularity and random bit-widths."""
    pop = 1.0 / np.arange(1, experts + 1) ** 1.1
    pop /= pop.sum()
    out = []
    for _ in range(steps):
        step = []
        for _ in range(layers):
            chosen = rng.choice(experts, size=top, replace=False, p=pop)
            jobs = tuple(
                Job(int(e), int(b), int(rng.integers(1, 9)),
                    run_us=30.0 * b / 4 + float(rng.uniform(5, 25)),
                    load_us=60.0 * b / 4 + float(rng.uniform(0, 20)))
                for e, b in zip(chosen, rng.choice(bits, size=top), strict=True))
            step.append(Layer(float(rng.uniform(15, 30)), jobs))
        out.append(step)
    return out
