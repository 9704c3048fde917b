"""Evaluation: a policy with a tool over a source (segmentation metrics, interactive metrics, VQA)."""

from ibis_jax.eval.evaluate import CaseResult, EvalConfig, evaluate
from ibis_jax.eval.policies import PolicyUnavailable, load_policy

__all__ = ["CaseResult", "EvalConfig", "PolicyUnavailable", "evaluate", "load_policy"]
