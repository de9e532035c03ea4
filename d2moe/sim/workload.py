"""From a trace to the simulator's steps, and the budget as bytes."""

from __future__ import annotations

from d2moe.core.sizes import QuantLayout, all_experts_bytes, parse_budget
from d2moe.core.spec import ModelSpec
from d2moe.sim.simulator import StepWork


def steps_from_trace(trace: object, default_bits: int, max_steps: int = 0) -> list[StepWork]:
    """One StepWork per trace step (the first `max_steps` if > 0); bits default where unknown."""
    demands = trace.demands(default_bits)  # type: ignore[attr-defined]
    n = len(demands) if max_steps <= 0 else min(max_steps, len(demands))
    return [StepWork(trace.phase(s), trace.tokens(s), demands[s])  # type: ignore[attr-defined]
            for s in range(n)]


def max_bits(steps: list[StepWork], default: int) -> int:
    """The most bits any demand of `steps` asks (`default` when there are none)."""
    return max((d.bits for s in steps for ds in s.layers for d in ds), default=default)


def budget_bytes(text: str, spec: ModelSpec, layout: QuantLayout, bits: int, *,
                 field: str = "budget") -> int:
    """`6GiB`, `40%` or `0.4`: a fraction is of all experts stored at `bits` (the most the
    workload asks for), so 100% holds every expert at every bit-width it needs. Errors name
    `field` (the option the text came from)."""
    return parse_budget(text, all_experts_bytes(spec, bits, layout), field=field)
