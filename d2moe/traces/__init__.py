"""Workload traces: the schema (save/load/validate), demands for replay, synthetic generators,
and the recorder of a real model's routing (`record.py`, torch imported inside)."""

from d2moe.traces.schema import PHASES, Trace, load_trace, save_trace
from d2moe.traces.synth import SynthConfig, layer_popularity, synth_trace

__all__ = ["PHASES", "SynthConfig", "Trace", "layer_popularity", "load_trace", "save_trace",
           "synth_trace"]
