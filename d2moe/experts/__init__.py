"""Offline expert statistics for System 2 policies: importance and similarity per layer.

`calibration.py` (a real model: expert outputs on calibration text; needs torch, imported
inside), `from_trace.py` (a routing trace only: a proxy), `store.py` (expert_stats.json beside
the store, checksummed), `measures.py` (the shared arithmetic), `cmd.py` (`d2moe experts
stats`). The result is a `d2moe.policies.stats.ExpertStats`.
"""

from d2moe.experts.from_trace import stats_from_trace
from d2moe.experts.store import STATS_FILE, find_or_build_stats, load_stats, save_stats

__all__ = ["STATS_FILE", "find_or_build_stats", "load_stats", "save_stats", "stats_from_trace"]
