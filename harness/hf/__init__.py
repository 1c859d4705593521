"""Checkpoints to and from Hugging Face, and from the mamba-ssm and official TokenFormer releases.

``export_checkpoint`` (``harness export``) and ``import_checkpoint`` (``harness import``); transformers is
imported only inside the export (and by ``tokenformer_hf``), never by importing this package.
"""
from .export import export_checkpoint
from .imports import import_checkpoint
from .mapping import HFError

__all__ = ["HFError", "export_checkpoint", "import_checkpoint"]
