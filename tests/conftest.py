import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# 2-core CI machine: two threads, deterministic kernels
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before anything imports triton
# (torch.compile, transformers and mamba-ssm may, in whichever test runs first): triton.language's own helpers
# are decorated at import, in interpreter mode only if this is already set
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.fixtures import write_corpus
    return write_corpus(tmp_path_factory.mktemp("corpus"))
