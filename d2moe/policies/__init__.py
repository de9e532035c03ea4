"""Scheduling policies: pure decision objects shared by the simulator and the executor."""

from d2moe.policies.presets import POLICIES, Policy, PolicyConfig, make_policy, policy_config
from d2moe.policies.residency import RESIDENCY
from d2moe.policies.schedulers import SCHEDULERS, Job
from d2moe.policies.stats import ExpertStats
from d2moe.policies.view import PlanError, ResidentSet, ResidentView, Sizes

__all__ = ["POLICIES", "RESIDENCY", "SCHEDULERS", "ExpertStats", "Job", "PlanError", "Policy",
           "PolicyConfig", "ResidentSet", "ResidentView", "Sizes", "make_policy",
           "policy_config"]
