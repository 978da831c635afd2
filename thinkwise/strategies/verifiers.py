"""Verifiers for best-of-n, kept importable from strategies/ where they first lived.

The implementations live one layer down: the exact checker and the reward model in
`thinkwise.tasks.verifiers`, the sandboxed code-test runner in `thinkwise.tasks.sandbox`
(task checkers use them too, and tasks/ may not import strategies/). This module only
re-exports them, so `from thinkwise.strategies.verifiers import CodeTestVerifier` works.
"""

from thinkwise.tasks.sandbox import OUTCOMES, CodeTestResult, CodeTestVerifier, TestCaseResult, code_from_completion
from thinkwise.tasks.verifiers import ExactChecker, RewardModelVerifier

__all__ = [
    "ExactChecker", "CodeTestVerifier", "CodeTestResult", "TestCaseResult", "RewardModelVerifier",
    "code_from_completion", "OUTCOMES",
]
