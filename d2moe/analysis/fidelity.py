"""Simulator against real run: per (policy, budget) metrics side by side with the error in %,
the summary (mean and worst |tokens/s error|, same policy ranking per budget) and the
side-by-side timeline figure. Reads Event rows only (through `compute_metrics`).

Besides tokens/s (tokens over the summed step time), each row carries the median decode step
time of both timelines: on a machine shared with other work, a few steps stretched by
preemption move the mean a lot and the median little, so the error of the median step shows
what the cost model gets wrong apart from that noise."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2moe.analysis.metrics import Metrics, compute_metrics
from d2moe.core.events import Event, Timeline


@dataclass(frozen=True)
class FidelityRow:
    """One (policy, budget): the real run's and the simulation's metrics."""

    policy: str
    budget: str
    real: Metrics
    sim: Metrics
    real_step_us: float = math.nan  # median decode step
    sim_step_us: float = math.nan
    real_spread_pct: float = math.nan  # (max - min) / median tokens/s of repeated real runs
    # real over simulated total time per cost in the decode steps (COSTS): which cost moved
    cost_ratios: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def speed(m: Metrics) -> float:
        """Decode tokens/s (prefill tokens/s when there is no decode step)."""
        return m.decode_tokens_per_s if m.decode_steps else m.prefill_tokens_per_s

    @property
    def error_pct(self) -> float:
        """Simulated against real tokens/s: 100 (sim - real) / real."""
        real = self.speed(self.real)
        return 100.0 * (self.speed(self.sim) - real) / real if real > 0 else math.inf

    @property
    def step_error_pct(self) -> float:
        """Simulated against real tokens/s of the median decode step (noise-robust)."""
        return 100.0 * (self.real_step_us - self.sim_step_us) / self.sim_step_us \
            if self.sim_step_us > 0 else math.nan

    def as_table_row(self) -> dict[str, object]:
        """The columns of `format_table`: tokens/s, lane busy and bubble time, hit rate."""
        r, s = self.real, self.sim
        return {
            "policy": self.policy, "budget": self.budget,
            "real tok/s": self.speed(r), "sim tok/s": self.speed(s), "error %": self.error_pct,
            "real step ms": self.real_step_us / 1e3, "sim step ms": self.sim_step_us / 1e3,
            "step error %": self.step_error_pct,
            "real spread %": None if math.isnan(self.real_spread_pct) else self.real_spread_pct,
            "real io busy ms": r.io_busy_us / 1e3, "sim io busy ms": s.io_busy_us / 1e3,
            "real cpu busy ms": r.compute_busy_us / 1e3,
            "sim cpu busy ms": s.compute_busy_us / 1e3,
            "real io bubble %": r.io_bubble_pct, "sim io bubble %": s.io_bubble_pct,
            "real cpu bubble %": r.compute_bubble_pct, "sim cpu bubble %": s.compute_bubble_pct,
            "real stall ms": r.exposed_io_us / 1e3, "sim stall ms": s.exposed_io_us / 1e3,
            "real hit %": 100.0 * r.hit_rate, "sim hit %": 100.0 * s.hit_rate,
        }


def fidelity_row(policy: str, budget: str, real: Timeline, sim: Timeline,
                 repeats: Sequence[Timeline] = ()) -> FidelityRow:
    """Compare one real timeline with its simulation; `repeats` (the real run's repetitions,
    itself included) give the spread of real tokens/s, the noise an error is judged by."""
    spread = math.nan
    if len(repeats) > 1:
        speeds = [FidelityRow.speed(compute_metrics(t)) for t in repeats]
        spread = 100.0 * (max(speeds) - min(speeds)) / statistics.median(speeds)
    return FidelityRow(policy, budget, compute_metrics(real), compute_metrics(sim),
                       median_step_us(real), median_step_us(sim), spread,
                       cost_ratios(real, sim))


# The costs a step is made of, by the event kinds that carry them
COSTS = {"loads": ("load", "prefetch"), "expert runs": ("run", "substitute"),
         "non-expert": ("non_expert",)}
# The loads apart, by what the real run did beside them: under ALONE_OVERLAP of a load's time
# beside a run, it ran alone (what the profile's load probe times); else beside runs (where
# the overlap speed counts too). Printed with "loads", never in the drift hint (loads twice).
LOAD_SPLIT = ("loads alone", "loads beside runs")
ALONE_OVERLAP = 0.1


def cost_time_us(timeline: Timeline, kinds: Sequence[str]) -> float:
    """Total duration of the `kinds` events in decode steps (all steps when none decodes)."""
    decode = {e.step for e in timeline.events if e.lane == "step" and e.kind == "decode"}
    return sum(e.end_us - e.start_us for e in timeline.events
               if e.kind in kinds and (not decode or e.step in decode))


def cost_ratios(real: Timeline, sim: Timeline) -> dict[str, float]:
    """Real over simulated time per cost (COSTS) where the simulation spent any: the same
    trace and policy make the same loads and runs, so a ratio away from 1 names the cost the
    profile got wrong for this run (or that moved since it was measured)."""
    out = {}
    for name, kinds in COSTS.items():
        s = cost_time_us(sim, kinds)
        if s > 0:
            out[name] = cost_time_us(real, kinds) / s
    return out | load_split_ratios(real, sim)


def load_split_ratios(real: Timeline, sim: Timeline) -> dict[str, float]:
    """Real over simulated time of the decode loads that ran alone in the real run and of
    those beside its runs (LOAD_SPLIT), each load paired with its simulated twin (the same
    plan makes the same loads, in the same order per layer); empty when the two timelines'
    loads differ."""
    def decode_loads(tl: Timeline) -> list[Event]:
        decode = {e.step for e in tl.events if e.lane == "step" and e.kind == "decode"}
        return sorted((e for e in tl.events if e.kind == "load" and e.step in decode),
                      key=lambda e: (e.step, e.layer, e.start_us))

    real_loads, sim_loads = decode_loads(real), decode_loads(sim)
    if not real_loads or len(real_loads) != len(sim_loads):
        return {}
    pairs = list(zip(real_loads, sim_loads, strict=True))
    if any((a.layer, a.expert, a.bits_from, a.bits_to) != (b.layer, b.expert, b.bits_from,
                                                           b.bits_to) for a, b in pairs):
        return {}
    runs = [(e.start_us, e.end_us) for e in real.events if e.kind in COSTS["expert runs"]]
    sums = {name: [0.0, 0.0] for name in LOAD_SPLIT}  # real, sim
    for a, b in pairs:
        took = a.end_us - a.start_us
        beside = sum(max(0.0, min(t, a.end_us) - max(s, a.start_us)) for s, t in runs)
        name = LOAD_SPLIT[0] if beside < ALONE_OVERLAP * took else LOAD_SPLIT[1]
        sums[name][0] += took
        sums[name][1] += b.end_us - b.start_us
    return {name: r / s for name, (r, s) in sums.items() if s > 0}


def median_step_us(timeline: Timeline) -> float:
    """Median duration of the decode steps (of all steps when there is no decode step)."""
    steps = [e for e in timeline.events if e.lane == "step"]
    decode = [e.end_us - e.start_us for e in steps if e.kind == "decode"]
    spans = decode or [e.end_us - e.start_us for e in steps]
    return statistics.median(spans) if spans else math.nan


def _ranking(rows: Sequence[FidelityRow], budget: str, sim: bool) -> list[str]:
    mine = [r for r in rows if r.budget == budget]
    return [r.policy for r in sorted(mine, key=lambda r: -r.speed(r.sim if sim else r.real))]


TIE_PCT = 1.0  # two policies within 1% of each other are tied: either order agrees


def _sign(a: float, b: float) -> int:
    if abs(a - b) <= TIE_PCT / 100.0 * max(abs(a), abs(b)):
        return 0
    return 1 if a > b else -1


def _same_order(rows: Sequence[FidelityRow]) -> bool:
    """No two policies ordered one way for real and the other way in simulation (ties,
    within TIE_PCT, agree with either order)."""
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            real = _sign(a.speed(a.real), b.speed(b.real))
            sim = _sign(a.speed(a.sim), b.speed(b.sim))
            if real * sim < 0:
                return False
    return True


def summarize(rows: Sequence[FidelityRow]) -> dict[str, object]:
    """Mean and worst |tokens/s error| in %, per budget whether both rank the policies the
    same (by tokens/s, fastest first; ties within TIE_PCT agree with either order), and the
    geomean over rows of each cost's real / simulated time."""
    errors = [abs(r.error_pct) for r in rows]
    step_errors = [abs(r.step_error_pct) for r in rows if not math.isnan(r.step_error_pct)]
    budgets = list(dict.fromkeys(r.budget for r in rows))
    ranking = {b: {"real": _ranking(rows, b, False), "sim": _ranking(rows, b, True)}
               for b in budgets}
    return {
        "mean_abs_error_pct": sum(errors) / len(errors) if errors else math.nan,
        "worst_abs_error_pct": max(errors, default=math.nan),
        "mean_abs_step_error_pct": (sum(step_errors) / len(step_errors) if step_errors
                                    else math.nan),
        "worst_abs_step_error_pct": max(step_errors, default=math.nan),
        "same_ranking": {b: _same_order([r for r in rows if r.budget == b]) for b in budgets},
        "ranking": ranking,
        "cost_ratios": {c: _geomean([r.cost_ratios[c] for r in rows if c in r.cost_ratios])
                        for c in (*COSTS, *LOAD_SPLIT) if any(c in r.cost_ratios for r in rows)},
    }


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs and min(xs) > 0 else math.nan


SHORT_COLUMNS = ("policy", "budget", "real tok/s", "sim tok/s", "error %", "step error %",
                 "real hit %", "sim hit %")


def short_table(rows: Sequence[FidelityRow]) -> str:
    """The comparison's key columns only (for the demo)."""
    from d2moe.analysis.tables import format_table

    return format_table([{k: v for k, v in r.as_table_row().items() if k in SHORT_COLUMNS}
                         for r in rows])


def summary_line(summary: dict[str, object]) -> str:
    """One line: mean and worst |error| and whether every budget ranks the policies alike."""
    same = summary["same_ranking"]
    assert isinstance(same, dict)
    differ = [b for b, ok in same.items() if not ok]
    rank = "same policy ranking at every budget" if not differ else \
        f"ranking differs at {', '.join(differ)}"
    ratios = summary.get("cost_ratios") or {}
    assert isinstance(ratios, dict)
    costs = costs_text(ratios)
    hint = drift_hint({c: r for c, r in ratios.items() if c in COSTS})
    return (f"tokens/s error: mean |{summary['mean_abs_error_pct']:.1f}|%, worst "
            f"|{summary['worst_abs_error_pct']:.1f}|%; median-step error: mean "
            f"|{summary['mean_abs_step_error_pct']:.1f}|%, worst "
            f"|{summary['worst_abs_step_error_pct']:.1f}|%; {rank}"
            + (f"\nreal / simulated time in decode steps (geomean over rows): {costs}"
               if costs else "") + (f"\n{hint}" if hint else ""))


def costs_text(ratios: dict[str, float]) -> str:
    """'loads 1.09x (alone 1.12x, beside runs 1.03x), expert runs 1.01x, ...'."""
    split = [f"{c.removeprefix('loads ')} {ratios[c]:.2f}x" for c in LOAD_SPLIT if c in ratios]
    return ", ".join(f"{c} {r:.2f}x" + (f" ({', '.join(split)})" if c == "loads" and split
                                        else "")
                     for c, r in ratios.items() if c in COSTS)


DRIFT_RATIO = 1.15  # every cost this much off, one way: the machine moved, not one cost


def drift_hint(ratios: dict[str, float]) -> str | None:
    """A line for when every cost's real / simulated time is off the same way by more than
    DRIFT_RATIO: then the machine runs at another speed than when the profile was measured
    (this project's VM moves 2-3x within a minute), which no cost model can follow; None
    otherwise."""
    xs = [r for r in ratios.values() if math.isfinite(r)]
    if len(xs) < 2:
        return None
    lo, hi = min(xs), max(xs)
    if lo > DRIFT_RATIO:
        way = f"every cost ran {lo:.2f}-{hi:.2f}x the profile's time: this machine is slower"
    elif hi < 1 / DRIFT_RATIO:
        way = f"every cost ran {lo:.2f}-{hi:.2f}x the profile's time: this machine is faster"
    else:
        return None
    return (f"{way} now than when the profile was measured (a drift, not one missed cost); "
            f"`d2moe validate --profile measure` compares against one measured in the run")


def summarize_rounds(rounds: Sequence[Sequence[FidelityRow]]) -> dict[str, object]:
    """Several whole comparisons (rounds, each its own real runs and profile) pooled: per
    (policy, budget) the mean signed tokens/s error and two standard errors of it (the
    simulator's bias on that row, with the machine's noise averaged out over rounds), each
    round's mean and worst |error|, in how many rounds each budget ranked the policies the
    same, and each cost's real / simulated time (geomean over every row of every round).
    On a machine whose speed drifts between a profile and the runs after it, one round's
    error mixes the drift in; the bias is what the cost model itself gets wrong."""
    per_round = [summarize(rows) for rows in rounds]
    cells: dict[tuple[str, str], list[float]] = {}
    for rows in rounds:
        for r in rows:
            cells.setdefault((r.policy, r.budget), []).append(r.error_pct)
    bias = []
    for (policy, budget), errs in cells.items():
        se = statistics.stdev(errs) / math.sqrt(len(errs)) if len(errs) > 1 else math.nan
        bias.append({"policy": policy, "budget": budget, "rounds": len(errs),
                     "mean_error_pct": statistics.fmean(errs), "two_se_pct": 2 * se})
    budgets = list(dict.fromkeys(r.budget for rows in rounds for r in rows))
    all_rows = [r for rows in rounds for r in rows]
    return {
        "rounds": len(rounds),
        "bias": bias,
        "mean_abs_bias_pct": statistics.fmean(abs(b["mean_error_pct"]) for b in bias)
        if bias else math.nan,
        "worst_abs_bias_pct": max((abs(b["mean_error_pct"]) for b in bias), default=math.nan),
        "round_mean_abs_error_pct": [s["mean_abs_error_pct"] for s in per_round],
        "round_worst_abs_error_pct": [s["worst_abs_error_pct"] for s in per_round],
        "same_ranking_rounds": {b: sum(bool(s["same_ranking"].get(b)) for s in per_round)
                                for b in budgets},
        "cost_ratios": {c: _geomean([r.cost_ratios[c] for r in all_rows
                                     if c in r.cost_ratios])
                        for c in (*COSTS, *LOAD_SPLIT)
                        if any(c in r.cost_ratios for r in all_rows)},
    }


def rounds_report(summary: dict[str, object]) -> str:
    """The pooled rounds as text: the bias table, then one line per other figure."""
    from d2moe.analysis.tables import format_table

    n = summary["rounds"]
    table = format_table([{"policy": b["policy"], "budget": b["budget"],
                           "mean error %": b["mean_error_pct"], "+- 2 se %": b["two_se_pct"]}
                          for b in summary["bias"]])
    rounds = ", ".join(f"{m:.1f}/{w:.1f}" for m, w in zip(
        summary["round_mean_abs_error_pct"], summary["round_worst_abs_error_pct"], strict=True))
    same = ", ".join(f"{b} {k}/{n}" for b, k in summary["same_ranking_rounds"].items())
    costs = costs_text(summary["cost_ratios"])
    return "\n".join([
        f"{n} rounds pooled: per row the mean signed tokens/s error (sim - real) / real and "
        f"two standard errors of it", table,
        f"bias: mean |{summary['mean_abs_bias_pct']:.1f}|%, worst "
        f"|{summary['worst_abs_bias_pct']:.1f}|%",
        f"each round's mean/worst |error| %: {rounds}",
        f"same policy ranking: {same} rounds",
        f"real / simulated time in decode steps (geomean over all rows): {costs}"])


def from_step(timeline: Timeline, first: int, count: int) -> Timeline:
    """The rows of steps first..first+count-1, shifted so that step `first` starts at 0."""
    rows = [e for e in timeline.events if first <= e.step < first + count]
    t0 = min((e.start_us for e in rows if e.lane == "step"), default=0.0)
    return Timeline([e._replace(start_us=e.start_us - t0, end_us=e.end_us - t0) for e in rows],
                    dict(timeline.meta))


def plot_side_by_side(pairs: Sequence[tuple[str, Timeline, Timeline]], path: str | Path, *,
                      title: str = "", first_step: int = 1, steps: int = 2) -> Path:
    """Real above simulated for each (label, real, sim): `steps` steps from `first_step`
    (default: the first two decode steps), each timeline shifted to start them at 0, on one
    time axis. Captions give the metrics of the steps shown."""
    from d2moe.analysis.timeline_plot import plot_bubbles

    timelines, labels = [], []
    for label, real, sim in pairs:
        timelines += [from_step(real, first_step, steps), from_step(sim, first_step, steps)]
        labels += [f"{label} real", f"{label} simulated"]
    # no window: the cropped timelines are the whole plot, so captions are the shown steps'
    return plot_bubbles(timelines, path, labels=labels, title=title or None)


def router_row(policy: str, budget: str, real: Timeline, sim: Timeline) -> dict[str, Any]:
    """Real against simulated bit-width router of one (policy, budget): the decode runs'
    average bits and, in adaptive mode, the number of decisions and the final shares."""
    from d2moe.router.adaptive import run_bits

    row: dict[str, Any] = {"policy": policy, "budget": budget,
                           "real_bits": run_bits(real.events, first_step=1),
                           "sim_bits": run_bits(sim.events, first_step=1)}
    cap_real, cap_sim = real.meta.get("capacity", {}), sim.meta.get("capacity", {})
    if "decisions" in cap_real:
        def final(cap: dict) -> list[float]:
            return list(cap["decisions"][-1]["shares"] if cap["decisions"] else cap["trained"])

        dr, ds = cap_real["decisions"], cap_sim.get("decisions", [])
        row |= {"real_decisions": len(dr), "sim_decisions": len(ds),
                "same_decisions": len(dr) == len(ds), "real_shares": final(cap_real),
                "sim_shares": final(cap_sim) if "decisions" in cap_sim else None,
                "real_decision_steps": [d["step"] for d in dr],
                "sim_decision_steps": [d["step"] for d in ds]}
    return row


def router_line(row: dict[str, Any]) -> str:
    """One report line of an adaptive row (`router_row`)."""
    def shares(s: list[float] | None) -> str:
        return "-" if s is None else "/".join(f"{x:.2f}" for x in s)

    return (f"{row['policy']} {row['budget']}: adaptive capacity, "
            f"{row['real_decisions']} real / {row['sim_decisions']} simulated decisions "
            f"({'same count' if row['same_decisions'] else 'DIFFERENT counts'}), final shares "
            f"real {shares(row['real_shares'])}, simulated {shares(row['sim_shares'])}")
