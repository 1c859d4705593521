"""Ops by family, one module each (fla-style ``ops/``). Importing the package imports nothing.

* ``pattention_triton`` -- Tokenformer's fused Pattention (Triton). It imports triton at module import, so an
  ``ImportError`` means the backend is missing and ``models.pattention`` falls back to the eager path.
* the SSM ops, each a pure-PyTorch reference path beside mamba-ssm's kernels (imported lazily, CUDA only, so
  these modules import anywhere):
    ``dispatch``        backend labels, force-reference switch, last-backend record, lazy kernel import
    ``causal_conv``     causal depthwise conv1d (sequence, continued from a cache, one decode step)
    ``selective_scan``  Mamba-1 selective scan (chunked reference + its autograd Function, decode step)
    ``ssd``             Mamba-2 SSD (chunked reference, decode step)
    ``discretize``      the discretisation step both scans share
"""
