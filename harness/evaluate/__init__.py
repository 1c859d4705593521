"""lm-eval integration: the ``harness`` model type (``adapter``), offline copies of the paper's tasks
(``tasks``) and ``simple_evaluate`` with the Table-1 row (``run``).

Importing this package does not import lm-eval or torch; ``evaluate_checkpoint`` and friends load them on use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["evaluate_checkpoint", "evaluate_lm", "results_table", "table_row", "format_table",
           "prepare_eval_data", "EvalTaskError", "PAPER_TASKS", "TABLE_COLUMNS", "HarnessLM"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate_checkpoint", "evaluate_lm", "results_table", "table_row", "format_table", "TABLE_COLUMNS",
                "preserved_rng"):
        from . import run
        return getattr(run, name)
    if name in ("prepare_eval_data", "EvalTaskError", "PAPER_TASKS", "resolve_tasks", "hub_reachable"):
        from . import tasks
        return getattr(tasks, name)
    if name in ("HarnessLM", "AdapterError"):
        from . import adapter
        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
