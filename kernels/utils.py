"""What every kernel launcher needs: the dtypes the kernels take, one check of its tensor
inputs, the device their launches run on, the limits of CUDA grids and of the kernels' int32
index arithmetic, the debug flag, and the launch itself (which record_launches records
instead, so that kernels/aot.py compiles exactly what the launchers launch).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED", "TL_TYPES", "TILE_ADVICE", "interpreting", "debug", "launch_options",
           "check_tensor",
           "launch_device", "on_tensor_device", "grid", "check_int32", "Launch", "launch",
           "record_launches"]

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# CUDA's largest grid per axis: 2^31 - 1 programs on axis 0, 65535 on axes 1 and 2
GRID_LIMITS = ((1 << 31) - 1, 65535, 65535)
TILE_ADVICE = "process the image in tiles (ignn-triton upscale --tile, or upscale(..., tile=...))"

_recorded: list | None = None  # the launches record_launches collects, while it runs


def interpreting() -> bool:
    """Kernels run under the Triton interpreter (TRITON_INTERPRET=1): on CPU tensors."""
    return bool(os.environ.get("TRITON_INTERPRET"))


def debug() -> bool:
    """IGNN_TRITON_DEBUG=1: the launchers that support it compile their DEBUG variants
    (tl.device_assert) with debug=True. Never while launches are recorded: the AOT specs
    are the release build's."""
    return os.environ.get("IGNN_TRITON_DEBUG", "") == "1" and _recorded is None


def launch_options(num_warps: int, num_stages: int) -> dict:
    """Launch options of the launchers whose kernels have a DEBUG variant: with debug(),
    debug=True compiles their tl.device_assert in (CUDA; the interpreter ignores it)."""
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if debug():
        opts["debug"] = True
    return opts


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple | None = SUPPORTED, *,
                 contiguous: bool = True) -> None:
    """The launchers' one check of a tensor input: its shape (one entry per dimension: a
    size, or a name for a free one, "(B, M, k)"), its dtype (one of `dtypes`; None: any),
    its layout (contiguous, where the kernel reads it in place) and its device: CUDA, any
    under the interpreter, meta while launches are recorded."""
    kinds = "/".join(str(d).removeprefix("torch.") for d in dtypes) + " " if dtypes else ""
    spec = f"{name} must be {kinds}({', '.join(map(str, shape))})"
    assert len(t.shape) == len(shape) and all(
        isinstance(w, str) or w == n for w, n in zip(shape, t.shape)), \
        f"{spec}; got {t.dtype} {tuple(t.shape)}"
    assert dtypes is None or t.dtype in dtypes, f"{spec}; got {t.dtype} {tuple(t.shape)}"
    assert not contiguous or t.is_contiguous(), f"{name} must be contiguous"
    assert t.is_cuda or interpreting() or (_recorded is not None and t.is_meta), \
        f"{name} must be a CUDA tensor (set TRITON_INTERPRET=1 for CPU); got {t.device}"


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


@dataclass(frozen=True)
class Launch:
    """A recorded launch: the @triton.jit function and the arguments it was given (kwargs:
    its constexprs, or any argument by name, and the launch options num_warps, ...)."""

    kernel: object
    args: tuple
    kwargs: dict


def launch(kernel, launch_grid: tuple, *args, **kwargs) -> None:
    """kernel[launch_grid](*args, **kwargs), or, inside record_launches, its record."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, args, kwargs))
    else:
        kernel[launch_grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches():
    """Within it the launchers run as usual on meta tensors (nothing is allocated) but
    record their launches in the list it yields instead of launching: kernels/aot.py turns
    them into AOT specs. Not thread-safe; not reentrant."""
    global _recorded
    assert _recorded is None, "record_launches is not reentrant"
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None
