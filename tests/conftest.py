"""Shared test setup.

Without a CUDA device, Triton kernels run under the Triton interpreter on CPU tensors: that
needs TRITON_INTERPRET=1 in the environment before anything imports triton, hence here, at
conftest import time (pytest imports this before any test module).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device() -> torch.device:
    """Where Triton kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda") if CUDA else torch.device("cpu")


@pytest.fixture
def device() -> torch.device:
    return kernel_device()
