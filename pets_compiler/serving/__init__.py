"""Serving many requests, for any task and of any length, through one runtime: the engine and its batch policies."""

from pets_compiler.serving.engine import Engine, Metrics
from pets_compiler.serving.policies import POLICIES, FixedPolicy, Policy, SortedPolicy, policy_named

__all__ = ["POLICIES", "Engine", "FixedPolicy", "Metrics", "Policy", "SortedPolicy", "policy_named"]
