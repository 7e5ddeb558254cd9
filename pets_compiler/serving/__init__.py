"""Serving many requests, for any task and of any length, through one runtime: the engine and its batch policies."""

from pets_compiler.serving.coordinated import CoordinatedPolicy, CostModel, split_sorted
from pets_compiler.serving.engine import Engine, Metrics
from pets_compiler.serving.policies import POLICIES, FixedPolicy, Policy, SortedPolicy, policy_named
from pets_compiler.serving.profile import profile_costs

__all__ = [
    "POLICIES",
    "CoordinatedPolicy",
    "CostModel",
    "Engine",
    "FixedPolicy",
    "Metrics",
    "Policy",
    "SortedPolicy",
    "policy_named",
    "profile_costs",
    "split_sorted",
]
