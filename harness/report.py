"""``harness report``: report.md + plots from a results store. The work is in ``harness.results``."""
from .results.writer import write_earlier_verdicts, write_report

__all__ = ["write_report", "write_earlier_verdicts"]
