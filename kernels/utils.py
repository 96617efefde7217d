"""What every kernel launcher needs: the dtypes the kernels take, the device their launches
run on, and the limits of CUDA grids and of the kernels' int32 index arithmetic.
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["SUPPORTED", "TL_TYPES", "TILE_ADVICE", "launch_device", "on_tensor_device", "grid",
           "check_int32"]

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# CUDA's largest grid per axis: 2^31 - 1 programs on axis 0, 65535 on axes 1 and 2
GRID_LIMITS = ((1 << 31) - 1, 65535, 65535)
TILE_ADVICE = "process the image in tiles (ignn-triton upscale --tile, or upscale(..., tile=...))"


def launch_device(device: torch.device):
    """The context under which Triton launches run on `device`: Triton launches on the
    current CUDA device and its current stream. Nothing to switch off CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_tensor_device(launcher):
    """Runs a launcher under the device of its tensor arguments, which must share one:
    without it a launch for tensors on cuda:1 runs on the current device's stream (an
    illegal address, or, with peer access, work unordered with cuda:1's stream)."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        if len(devices) != 1:
            raise ValueError(f"{launcher.__name__}: the tensors must be on one device; got "
                             f"{sorted(map(str, devices))}: move them with .to(device)")
        with launch_device(devices.pop()):
            return launcher(*args, **kwargs)
    return run


def grid(kernel: str, *dims: int) -> tuple[int, ...]:
    """A launch grid, checked against CUDA's limits per axis (launchers put their largest
    count on axis 0)."""
    for axis, (n, limit) in enumerate(zip(dims, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"{kernel}: {n} programs on grid axis {axis}, past CUDA's "
                             f"{limit}; {TILE_ADVICE}")
    return dims


def check_int32(kernel: str, what: str, count: int) -> None:
    """A count that a kernel indexes with int32 arithmetic must stay below 2^31."""
    if count >= 1 << 31:
        raise ValueError(f"{kernel}: {what} = {count} reaches 2^31, past the kernel's int32 "
                         f"indices; {TILE_ADVICE}")
