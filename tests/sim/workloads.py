"""Inputs for simulator tests: a hand-checkable linear profile and random step lists."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import assume
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.events import Timeline
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.spec import ModelSpec
from d2moe.policies import ExpertStats, Policy, make_policy
from d2moe.sim import SimSetup, StepWork, simulate

SPEC = ModelSpec(name="t", layers=3, experts=6, top_k=3, hidden=64, ffn=128, heads=2,
                 kv_heads=1, vocab=16)


@dataclass(frozen=True)
class LinearProfile:
    """Costs simple enough to check by hand: latency + bytes / bandwidth, and linear runs."""

    name: str = "linear"
    read_Bpus: float = 1000.0  # bytes per microsecond
    latency_us: float = 5.0
    run_base_us: float = 2.0
    run_us_per_token_bit: float = 1.0
    non_expert_us_flat: float = 3.0
    head_us_flat: float = 0.0  # the step's head, on layer 0

    def load_us(self, nbytes: int, tier: str = "disk") -> float:
        if tier == "host":  # the host-RAM tier: 1 us + bytes / 10000
            return 1.0 + nbytes / 10000.0
        return self.latency_us + nbytes / self.read_Bpus

    def run_us(self, spec: ModelSpec, bits: int, tokens: int, layout: object = None) -> float:
        return self.run_base_us + self.run_us_per_token_bit * tokens * bits

    def non_expert_us(self, spec: ModelSpec, tokens: int) -> float:
        return self.non_expert_us_flat

    def head_us(self, spec: ModelSpec, tokens: int) -> float:
        return self.head_us_flat


@st.composite
def step_lists(draw: st.DrawFn, max_steps: int = 4) -> list[StepWork]:
    """Random prefill/decode steps over SPEC: tokens pick distinct experts at random bits."""
    steps = []
    for s in range(draw(st.integers(1, max_steps))):
        tokens = draw(st.integers(1, 4))
        layers = []
        for layer in range(SPEC.layers):
            count: dict[tuple[int, int], int] = {}
            for _ in range(tokens):
                experts = draw(st.lists(st.integers(0, SPEC.experts - 1), min_size=1,
                                        max_size=SPEC.top_k, unique=True))
                bits = draw(st.integers(2, 4))
                for e in experts:
                    count[(e, bits)] = count.get((e, bits), 0) + 1
            layers.append([Demand(ExpertKey(layer, e), b, n, 0.5)
                           for (e, b), n in sorted(count.items())])
        steps.append(StepWork("prefill" if s == 0 else "decode", tokens, layers))
    return steps


def random_stats(layers: int, experts: int, seed: int) -> ExpertStats:
    """Importance and a symmetric similarity with 1 on the diagonal, from a seed."""
    import random

    rng = random.Random(seed)
    imp = [[rng.random() for _ in range(experts)] for _ in range(layers)]
    sim = []
    for _ in range(layers):
        m = [[1.0 if e == f else 0.0 for f in range(experts)] for e in range(experts)]
        for e in range(experts):
            for f in range(e + 1, experts):
                m[e][f] = m[f][e] = rng.uniform(-1, 1)
        sim.append(m)
    return ExpertStats.from_lists(imp, sim, "random")


def any_policy(name: str, seed: int = 0) -> Policy:
    """A registered policy over SPEC, with random expert statistics for those that need them."""
    return make_policy(name, stats=random_stats(SPEC.layers, SPEC.experts, seed))


def simulate_or_skip(setup: SimSetup, steps: list[StepWork], name: str) -> Timeline:
    """Simulate a registered policy; a pinned baseline whose experts do not fit the budget
    is refused with a UserError (then the hypothesis example is skipped)."""
    try:
        return simulate(setup, steps, any_policy(name))
    except UserError as exc:
        assert "holds every expert" in str(exc) or "smaller than one expert" in str(exc)
        assume(False)
        raise
