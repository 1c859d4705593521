"""The one error type of the data package.

A ``ValueError`` subclass so the CLI's existing ``except ValueError`` prints it as one line and exits 2; every
message names the file (and line) or the setting at fault and, where something is not installed, the exact
command that installs it.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad data source, tokenizer spec, or a split too small for the requested windows."""
