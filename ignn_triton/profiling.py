"""Named ranges around every stage of IGNN, for nsys (NVTX) and torch.profiler.

Off by default: `stage(name)` then returns one shared no-op context, so the cost is a
global read. Switch on with `enable_nvtx()` or the environment variable IGNN_TRITON_NVTX=1;
each stage then opens an NVTX range (the `nvtx` package) and a torch.profiler
`record_function` range of the same name. Inside torch.compile the ranges are skipped, so
they never break the graph.

Stage names (forward): ignn/embed, ignn/head, ignn/body1, ignn/knn, ignn/edges, ignn/ecn,
ignn/stats, ignn/aggregate, ignn/den, ignn/fuse, ignn/body2, ignn/upsample, ignn/tail.
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("IGNN_TRITON_NVTX", "0") not in ("", "0")
_OFF = contextlib.nullcontext()


def enable_nvtx(on: bool = True) -> None:
    """Turn the stage ranges on (or off)."""
    global _enabled
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _range(name: str):
    import nvtx

    nvtx.push_range(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        nvtx.pop_range()


def stage(name: str):
    """Context manager marking one stage of the model."""
    if not _enabled or torch.compiler.is_compiling():
        return _OFF
    return _range(name)
