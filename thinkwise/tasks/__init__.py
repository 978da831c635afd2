"""Verifiable task families with a difficulty knob, exact checkers, and user JSONL loading.

See `base.py` for the contract (`Problem`, `TaskFamily`, task specs, the JSONL loader)
and the families in `arithmetic.py`, `sequences.py`, `puzzles.py` and `code.py`. Answer
extraction (`extraction.py`), the sandboxed code-test runner (`sandbox.py`) and the
verifiers built on them (`verifiers.py`) live here too, so task checkers and strategies
share them.
"""

from thinkwise.tasks.base import (
    FAMILIES, Problem, TaskFamily, check, extract, generate_problems, get_family, load_jsonl, parse_task_spec,
)
# Importing a family module registers its families in FAMILIES (base.py knows none of them).
from thinkwise.tasks import arithmetic, code, puzzles, sequences  # noqa: F401, E402

__all__ = ["FAMILIES", "Problem", "TaskFamily", "check", "extract", "generate_problems", "get_family", "load_jsonl",
           "parse_task_spec"]
