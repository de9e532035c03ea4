"""Concurrent serving: an arrival process, continuous batching of decode steps, and
per-request latency percentiles, for the simulator and the real executor alike.

- `arrivals.py`  ArrivalConfig -> Request list (Poisson arrivals, fixed or ranged lengths)
- `batching.py`  ContinuousBatcher: the pure scheduler (told the time, never reads a clock)
- `metrics.py`   latency percentiles and throughput from a timeline's request rows
- `routing.py`   per-token routing for simulated requests (synthetic or a recorded trace)
- `sim.py`       serving on the simulator (SimSession, one step at a time)
- `real.py`      serving on the real executor (ragged attention, shared MoE)
- `cmd.py`       `d2moe serve`
"""
