"""Job orders: Johnson's rule is the optimal two-stage order, checked against every order."""

from __future__ import annotations

from itertools import permutations

from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies import SCHEDULERS, Job


class TableCosts:
    """Load and run times per expert, read from tables (a run's time per demand)."""

    def __init__(self, load: dict[ExpertKey, float], run: dict[ExpertKey, float]) -> None:
        self.load, self.run = load, run

    def load_us(self, key, bits_from, bits_to):
        return self.load[key]

    def run_us(self, key, bits, tokens):
        return self.run[key]


def makespan(order: list[Job], costs: TableCosts) -> float:
    """The two-machine flow shop: loads back to back on the I/O lane, each run after its own
    load and the run before it (no memory limit)."""
    io = compute = 0.0
    for j in order:
        if j.missing:
            io += costs.load[j.key]
        compute = max(compute, io) + costs.run[j.key] * len(j.demands)
    return compute


@st.composite
def layers(draw):
    n = draw(st.integers(1, 6))
    jobs, load, run = [], {}, {}
    for e in range(n):
        key = ExpertKey(0, e)
        need = draw(st.integers(2, 4))
        have = draw(st.sampled_from([0, need]))  # missing or resident
        d = Demand(key, need, draw(st.integers(1, 4)))
        jobs.append(Job(key, have, need, d.tokens, 1.0, (d,)))
        load[key] = float(draw(st.integers(1, 30)))  # integers: exact sums, exact ties
        run[key] = float(draw(st.integers(1, 30)))
    return draw(st.permutations(jobs)), TableCosts(load, run)


@settings(max_examples=300, deadline=None)
@given(layer=layers())
def test_johnson_order_has_the_least_makespan_of_every_order(layer):
    """The simulator only checks johnson against fifo and hebf; here against all n! orders."""
    jobs, costs = layer
    order = SCHEDULERS.create("johnson").order(jobs, costs)
    assert sorted(order) == sorted(jobs)
    best = min(makespan(list(p), costs) for p in permutations(jobs))
    assert makespan(order, costs) == best


@settings(max_examples=100, deadline=None)
@given(layer=layers(), name=st.sampled_from(SCHEDULERS.names()))
def test_every_scheduler_orders_each_job_once_whatever_the_input_order(layer, name):
    jobs, costs = layer
    order = SCHEDULERS.create(name).order(jobs, costs)
    assert sorted(order) == sorted(jobs)
    assert SCHEDULERS.create(name).order(sorted(jobs), costs) == order  # input order moot
