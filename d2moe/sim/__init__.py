"""The SimPy model of the I/O and compute lanes, fed by a hardware profile."""

from d2moe.sim.simulator import SimSetup, StepWork, check_budget, simulate

__all__ = ["SimSetup", "StepWork", "check_budget", "simulate"]
