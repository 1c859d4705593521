"""The Tokenformer bench: one training loop, lm-eval tasks, tables and plots over the models in ``models``."""
__version__ = "0.1.0"
