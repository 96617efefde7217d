"""Peak memory of a forward pass, predicted without running it (`estimate_memory`).

The model runs on fake tensors (FakeTensorMode: shapes, dtypes and strides, no data, no
compute) and every allocation is replayed: each storage an operator creates is counted
from its creation until its last reference dies (`LiveBytes`). On the CPU the graph
aggregation's custom ops run their torch implementation on the fake tensors too, so their
internal chunks and buffers are counted; on CUDA they take their fake implementation (the
Triton kernels' outputs; their scratch is small). Not visible: library workspaces (oneDNN,
cuDNN, cuBLAS) and allocator fragmentation or caching.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import modules, ops, torch_backend
from .geometry import graph_geometry

CUDA_BLOCK = 512  # the CUDA caching allocator's rounding


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operators create while the mode is on, from
    creation to the death of their last reference, rounded up to `block`; `peak` is the
    maximum. Storages that existed before (inputs, parameters) are not counted, nor are
    views of them."""

    def __init__(self, block: int = CUDA_BLOCK):
        super().__init__()
        self.block = block
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> counted bytes

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live or getattr(st, "_ignn_seen", False):
            return
        st._ignn_seen = True
        nbytes = -(-st.nbytes() // self.block) * self.block
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def ignore(self, *tensors: torch.Tensor) -> None:
        """Mark pre-existing tensors (inputs, parameters): they and their views count 0."""
        for t in tensors:
            t.untyped_storage()._ignn_seen = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_bytes(fn, inputs=(), block: int = CUDA_BLOCK) -> int:
    """Peak bytes allocated by fn() above `inputs` (tensors or modules), fake or real."""
    tracker = LiveBytes(block)
    for x in inputs:
        tracker.ignore(*(x.parameters() if isinstance(x, torch.nn.Module) else [x]))
    with tracker:
        fn()
    return tracker.peak


# Custom ops whose torch backend runs on the fake tensors of a CPU estimate; those of
# edge_features and patch_aggregate are counted by formulas (`edge_workspace`,
# `aggregate_workspace`): the aggregation's per-row loops would take minutes on fake
# tensors, and edge_features checks its indices' values.
_OPENED_OPS = ("_patch_knn", "_patch_stats")


def _one_band(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """modules._banded for an estimate: the net runs on the first band only (every band
    allocates the same temporaries, one band at a time), and the result has the shape of
    the real one."""
    band = net(x[:, :, : modules._band_rows(x)])
    return band.new_empty(*band.shape[:2], *x.shape[2:])


@contextlib.contextmanager
def _swapped(*changes):
    """Set each (object, attribute, value) for the duration, then restore the originals."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _gpu_paths():
    """The ECN and the ConvChains on whole maps and the graph aggregation's fused x1_hr op,
    as they run on the GPU (modules._banded, ConvChain and GraphAggregation._ranks_once
    are for CPU maps)."""
    return _swapped((modules, "_banded", _whole), (modules, "_cpu_inference", _never))


def _cpu_paths_visible():
    """Route these custom ops to their Python bodies (the CPU torch backend on CPU tensors)
    instead of their fake implementations, so that a fake run sees their temporaries, and
    run the ECN's bands once (`_one_band`)."""
    return _swapped(*[(ops, name, getattr(ops, name)._init_fn) for name in _OPENED_OPS],
                    (modules, "_banded", _one_band))


def aggregate_workspace(feat: torch.Tensor, idx: torch.Tensor, logits, scale: int, patch: int,
                        stride: int) -> int:
    """Bytes the torch backend of patch_aggregate allocates besides its output, from the
    chunking it uses (torch_backend.cpu_chunks and offset_rows): the polyphase HR buffer
    (and its padded HR copy unless torch_backend.unpolyphase_in_place), one offset's gather
    and its normalisation terms, a channel chunk's key pixels by offset (and the next
    chunk's, while it is made) and its padded source, the work-dtype copies of F and of the
    output when F is 16-bit, and with logits the softmax weights and one rank's HR map."""
    B, C, H, W = feat.shape
    k = idx.shape[2]
    geo = graph_geometry(H, W, scale, patch, stride)
    ps, ts, s = geo.hr_patch, geo.hr_stride, geo.scale
    extra = geo.slots - 1  # phase rows past the last query row
    cc = torch_backend.cpu_chunks(geo, C)[0]
    gather = cc * torch_backend.offset_rows(geo, cc) * geo.m2
    buffers = 1 if torch_backend.unpolyphase_in_place(geo) else 2
    elements = (buffers * cc * (geo.m1 + extra) * ts * (geo.m2 + extra) * ts  # HR buffers
                + 3 * gather  # gather, alpha, beta
                + 2 * geo.num_keys * cc * ps * ps  # key pixels by offset
                + cc * ((geo.n1 - 1) * ts + ps) * ((geo.n2 - 1) * ts + ps))  # padded source
    hr = s * s * H * W
    if feat.dtype not in (torch.float32, torch.float64):
        elements += cc * H * W + (B * C * hr if logits is not None else B * k * C * hr)
    if logits is not None:
        elements += B * k * hr + cc * hr
    return elements * (8 if feat.dtype == torch.float64 else 4)


def edge_workspace(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, scale: int,
                   patch: int, stride: int) -> int:
    """Bytes the torch backend of edge_features allocates besides its output: the query and
    son patch vectors (the son's twice: unfolded and laid out by rows), and one chunk of
    gathered neighbours."""
    B, E = ye.shape[:2]
    k = idx.shape[2]
    geo = graph_geometry(ye.shape[2], ye.shape[3], scale, patch, stride)
    P = patch * patch
    step = max(1, torch_backend.GATHER_ELEMENTS // max(1, E * P * k))
    elements = (B * E * P * (geo.num_queries + 2 * geo.num_keys)  # patch vectors
                + min(step, geo.num_queries) * k * P * E)  # gathered neighbours
    return elements * (8 if ye.dtype == torch.float64 else 4)


class _CpuEstimate(LiveBytes):
    """LiveBytes that adds the workspace of edge_features and patch_aggregate (by formula)
    to the peak while they run, and for a convolution a copy of its input: oneDNN reorders
    an NCHW input into its blocked layout (measured: the DEN's 5x5 convolution on a
    (1, 64, 768, 768) map holds the peak at LR 384x384)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.aten.convolution.default:
            self.peak = max(self.peak, self.current + args[0].nbytes)
        elif func is torch.ops.ignn.patch_aggregate.default:
            feat, idx, *_, logits, scale, patch, stride = args
            extra = aggregate_workspace(feat, idx, logits, scale, patch, stride)
            self.peak = max(self.peak, self.current + extra)
        elif func is torch.ops.ignn.patch_aggregate_into.default:
            feat, idx, *_, scale, patch, stride, _ = args
            extra = aggregate_workspace(feat, idx, None, scale, patch, stride)
            self.peak = max(self.peak, self.current + extra)
        elif func is torch.ops.ignn.edge_features.default:
            self.peak = max(self.peak, self.current + edge_workspace(*args))
        return out


# Not seen by the replay, measured on the CPU (torch 2.13, glibc malloc) at LR 256x256:
# what a forward adds to the process besides its tensors' peak (409 MiB there). About
# 15-30 MiB of runtime (oneDNN primitives, thread pools) when freed blocks go straight back
# to the system; 35-115 MiB from run to run with the default malloc, which keeps some.
CPU_RUNTIME_BYTES = 128 << 20


def _whole(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def _never(x: torch.Tensor) -> bool:
    return False


def estimate_memory(model: torch.nn.Module, height: int, width: int,
                    dtype: torch.dtype = torch.float32, device="cpu", batch: int = 1) -> int:
    """Predicted peak bytes that one inference forward of `model` (IGNN or EDSR) on a
    (batch, 3, height, width) image allocates above its input and weights, with reduced
    precision `dtype` run as autocast (as `Upscaler` does) on `device` ("cpu" or "cuda").
    Nothing of the model is changed. About a second at LR 512 x 512 and 4 s at 1500 x 1500
    on a 2-core CPU: on fake tensors the k-NN runs a few of its tiles and a ConvChain a few
    of its bands (they allocate alike), and the ECN one band (`_one_band`).

    On the CPU it is checked against measured peaks (tests/test_memory.py). On CUDA the
    replay runs on CPU fake tensors with the custom ops' fake implementations (the Triton
    kernels' outputs) and the ECN on whole maps, as on the GPU; cuDNN workspaces and the
    caching allocator's slack come on top (not yet compared with a GPU measurement)."""
    device = torch.device(device)
    cpu = device.type == "cpu"
    fake = FakeTensorMode()
    with fake:
        state = {name: torch.empty(t.shape, dtype=t.dtype)
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
        x = torch.empty(batch, 3, height, width)
    tracker = _CpuEstimate(block=1) if cpu else LiveBytes(CUDA_BLOCK)
    tracker.ignore(x, *state.values())
    amp = dtype != torch.float32
    paths = _cpu_paths_visible() if cpu else _gpu_paths()
    with fake, paths, tracker, torch.no_grad(), torch.autocast("cpu", dtype, enabled=amp):
        torch.func.functional_call(model, state, (x,))
    return tracker.peak + (CPU_RUNTIME_BYTES if cpu else 0)
