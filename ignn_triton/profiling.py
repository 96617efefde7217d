"""Named ranges around every stage of IGNN, forward and backward, for nsys (NVTX) and
torch.profiler.

Off by default: `stage(name)` then returns a no-op object, so the cost is a global read,
one small object and two identity calls per stage. Switch on with `enable_nvtx()` or the
environment variable IGNN_TRITON_NVTX=1; each stage then opens an NVTX range (the `nvtx`
package) and a torch.profiler `record_function` range of the same name. Inside
torch.compile the ranges are skipped, so they never break the graph (and a compiled
backward has no stage ranges).

Stage names (forward): ignn/embed, ignn/head, ignn/body1, ignn/knn, ignn/edges, ignn/ecn,
ignn/stats, ignn/aggregate, ignn/den, ignn/fuse, ignn/body2, ignn/upsample, ignn/tail.

Backward: a stage marks its differentiable inputs and outputs,

    with stage("ignn/body2") as st:
        x1, x0 = st.inputs(x1, x0)
        x2 = st.outputs(self.body2(x1) + x0)

and, when autograd records the stage, its backward sits in a range `<stage>/backward`
(ignn/body2/backward), opened by an identity node on the outputs and closed by one on the
inputs. The autograd engine runs the nodes of one device in decreasing sequence number,
the reverse of the order they were recorded in, so the outputs' node runs just before the
stage's backward ops and the inputs' node just after them. Stages without a backward
(embed, knn, edges: the matching carries no gradient) get no backward range.

Where the inputs' node never runs (no input requires grad, as for the head on an image or
the ECN on edge features, or a partial backward such as autograd.grad to an inner tensor),
the range is closed by the next marker that runs on the same thread, else at the end of the
backward pass: it then also spans the ops recorded between this stage and the one before
it (glue such as torch.cat outside any stage), or, at the end, the accumulation of the last
parameter gradients. Every opened range is closed once (a backward that raises skips the
end-of-pass close: its last range then closes at the next marker on the thread). Backward
ranges are NVTX start/end ranges, not push/pop: they begin and end inside different
autograd nodes, whose own ranges (under emit_nvtx) a push/pop pair would break. Stages must
not nest (none does): an inner stage's backward would end the outer one's range.
"""
from __future__ import annotations

import os
import threading

import torch

_enabled = os.environ.get("IGNN_TRITON_NVTX", "0") not in ("", "0")


def enable_nvtx(on: bool = True) -> None:
    """Turn the stage ranges on (or off)."""
    global _enabled
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


class _Off:
    """The disabled stage: no ranges, the tensors pass through untouched."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def inputs(self, *args):
        return args[0] if len(args) == 1 else args

    outputs = inputs


_thread = threading.local()


def _opened() -> list:
    """The backward ranges this thread opened (some may have been closed since)."""
    if not hasattr(_thread, "open"):
        _thread.open = []
    return _thread.open


class _BackwardRange:
    """The backward range of one stage call: opened by each backward pass through the
    stage, and each time closed once."""

    def __init__(self, name: str):
        self.name = name
        self.nvtx_range = self.record = None

    def open(self) -> None:
        import nvtx

        if self.record is not None:
            return
        self.nvtx_range = nvtx.start_range(self.name)
        self.record = torch.ops.profiler._record_function_enter_new(self.name, None)
        _opened().append(self)
        torch.autograd.Variable._execution_engine.queue_callback(self.close)  # end of pass

    def close(self) -> None:
        import nvtx

        if self.record is None:
            return
        torch.ops.profiler._record_function_exit._RecordFunction(self.record)
        nvtx.end_range(self.nvtx_range)
        self.nvtx_range = self.record = None


def _close_finished(keep: _BackwardRange | None = None) -> None:
    """Close the ranges this thread opened, but `keep`: the engine has run past them."""
    ranges = _opened()
    for rng in ranges:
        if rng is not keep:
            rng.close()
    ranges[:] = [keep] if keep is not None and keep.record is not None else []


class _Marker(torch.autograd.Function):
    """Identity on some of a stage's tensors; subclasses act on the range in backward."""

    @staticmethod
    def forward(ctx, rng, *tensors):
        ctx.rng = rng
        ctx.set_materialize_grads(False)
        return tensors


class _OutputsMarker(_Marker):
    """On a stage's outputs: its backward opens the stage's backward range."""

    @staticmethod
    def backward(ctx, *grads):
        _close_finished(keep=ctx.rng)
        ctx.rng.open()
        return None, *grads


class _InputsMarker(_Marker):
    """On a stage's inputs: its backward closes the stage's backward range."""

    @staticmethod
    def backward(ctx, *grads):
        ctx.rng.close()
        _close_finished()
        return None, *grads


class _Stage:
    """One call of an enabled stage: its forward range and the markers of its backward."""

    def __init__(self, name: str):
        self.name = name
        self.backward = _BackwardRange(name + "/backward")

    def __enter__(self):
        import nvtx

        nvtx.push_range(self.name)
        self.record = torch.profiler.record_function(self.name).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import nvtx

        self.record.__exit__(*exc)
        nvtx.pop_range()

    def _mark(self, marker, args):
        """args (tensors, or tuples of tensors, or anything) with the tensors that require
        grad passed through marker, as one node."""
        flat = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]
        grads = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if grads and torch.is_grad_enabled():
            for i, t in zip(grads, marker.apply(self.backward, *(flat[i] for i in grads))):
                flat[i] = t
        rest = iter(flat)
        out = [tuple(next(rest) for _ in a) if isinstance(a, tuple) else next(rest) for a in args]
        return out[0] if len(out) == 1 else tuple(out)

    def inputs(self, *args):
        """The stage's inputs, as they are; its backward range ends once their gradients are
        done. Call first, before any op of the stage."""
        return self._mark(_InputsMarker, args)

    def outputs(self, *args):
        """The stage's outputs, as they are; its backward range begins when their gradients
        are done. Call last, after every op of the stage."""
        return self._mark(_OutputsMarker, args)


def stage(name: str):
    """Context manager marking one stage of the model; `as st` gives st.inputs(...) and
    st.outputs(...), which mark the stage's tensors for its backward range."""
    if not _enabled or torch.compiler.is_compiling():
        return _Off()  # a fresh one: torch.compile enters only context managers made in the graph
    return _Stage(name)
