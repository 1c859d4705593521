"""Fused kernels, one module per op (fla-style). Each imports its backend (triton) at module import, so an
``ImportError`` means the backend is missing and callers fall back to the eager path."""
