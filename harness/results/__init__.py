"""The results layer: a typed loader of a results store (``load``), report tables (``tables``), plots
(``plots``) and the writer of report.md / verdicts.json (``writer``)."""
from .load import Run, Store, StoreError, load
from .writer import write_earlier_verdicts, write_report

__all__ = ["Run", "Store", "StoreError", "load", "write_report", "write_earlier_verdicts"]
