"""Shared vocabulary: jobs and plans, timeline events, model specs, sizes and units."""

from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline, load_timeline, save_timeline
from d2moe.core.jobs import Demand, Evict, ExpertKey, Load, Plan, Run
from d2moe.core.sizes import QuantLayout, expert_bytes, load_bytes, parse_budget, parse_bytes
from d2moe.core.spec import ModelSpec, load_spec

__all__ = [
    "Demand", "Event", "Evict", "ExpertKey", "Load", "ModelSpec", "Plan", "QuantLayout", "Run",
    "Timeline", "UserError", "expert_bytes", "load_bytes", "load_spec", "load_timeline",
    "parse_budget", "parse_bytes", "save_timeline",
]
