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

# Under pytest-xdist (`-n`, see pyproject.toml) the workers share the cores: each gets its
# share of intra-op threads, else their OpenMP pools oversubscribe the machine. Child
# processes that tests start (CLI runs, fresh-process memory measurements) inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)


def kernel_device() -> torch.device:
    """Where Triton kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda") if CUDA else torch.device("cpu")


@pytest.fixture
def device() -> torch.device:
    return kernel_device()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo's record of the shapes a function has seen
    is process-wide, and after a second shape it compiles with dynamic shapes, which
    inductor cannot lower for IGNN's training graph (torch 2.13). Users get the same
    advice in the README: compile with dynamic=False to train at several shapes."""
    torch._dynamo.reset()
    yield
