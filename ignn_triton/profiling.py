"""Named ranges around every stage of IGNN, forward and backward, for nsys (NVTX) and
torch.profiler.

Off by default, and then free: no hook is installed and `stage(name)` returns a no-op
object. Switch on with `enable_nvtx()` or the environment variable IGNN_TRITON_NVTX=1;
each stage then opens an NVTX range (the `nvtx` package) and a torch.profiler
`record_function` range of the same name. Inside torch.compile the ranges are skipped, so
they never break the graph (and a compiled backward has no stage ranges).

A stage is a module or a block of code:
- `name_stages(model, {"body1": "ignn/body1", ...})` tags submodules. While the ranges are
  on, global module hooks (installed by enable_nvtx, removed by enable_nvtx(False)) put
  every call of a tagged module in a range of its name, with its positional inputs and its
  output marked for the backward range. IGNN's stages are its modules (model.py); the glue
  between them (the mean shifts, the skip addition) runs outside any range.
  (torch.compile(model) warns that global hooks also fire for its wrapper module: untagged,
  it opens no range.)
- `with stage(name) as st:` around a block, marking its tensors by hand (the graph
  aggregation's inner stages, modules.py):

      with stage("ignn/den") as st:
          w_r, knn_hr = st.inputs(w_r, knn_hr)
          return st.outputs(w_r * self.knn_downsample(knn_hr))

Stage names (forward): ignn/embed (twice: the image and its son), ignn/head, ignn/body1,
ignn/knn, ignn/edges, ignn/ecn, ignn/stats, ignn/aggregate, ignn/den, ignn/fuse,
ignn/body2, ignn/upsample (twice: the upsampler and fuse_up), ignn/tail.

Backward: when autograd records a stage, its backward sits in a range `<stage>/backward`
(ignn/body2/backward), opened by an identity node on the outputs and closed by one on the
inputs. The autograd engine runs the nodes of one device in decreasing sequence number,
the reverse of the order they were recorded in, so the outputs' node runs just before the
stage's backward ops and the inputs' node just after them. Stages without a backward
(embed, knn, edges: the matching carries no gradient) get no backward range.

Where the inputs' node never runs (no input requires grad, as for the head on an image or
the ECN on edge features, or a partial backward such as autograd.grad to an inner tensor),
the range is closed by the next marker that runs on the same thread, else at the end of the
backward pass: it then also spans the ops recorded between this stage and the one before
it (glue such as the skip addition outside any stage), or, at the end, the accumulation of
the last parameter gradients. Every opened range is closed once (a backward that raises
skips the end-of-pass close: its last range then closes at the next marker on the thread).
Backward ranges are NVTX start/end ranges, not push/pop: they begin and end inside
different autograd nodes, whose own ranges (under emit_nvtx) a push/pop pair would break.
Stages must not nest (none does): an inner stage's backward would end the outer one's
range.
"""
from __future__ import annotations

import os
import threading

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

_enabled = False
_hooks = []  # the global module hooks' handles, while the ranges are on
_STAGE_ATTR = "_profiling_stage"  # a tagged module's stage name


def enable_nvtx(on: bool = True) -> None:
    """Turn the stage ranges on (or off): on installs the global module hooks that put the
    tagged modules in ranges, off removes them."""
    global _enabled
    _enabled = on
    while _hooks:
        _hooks.pop().remove()
    if on:
        _hooks.extend([register_module_forward_pre_hook(_enter_module),
                       register_module_forward_hook(_exit_module, always_call=True)])


def nvtx_enabled() -> bool:
    return _enabled


def name_stages(model: torch.nn.Module, stages: dict[str, str]) -> None:
    """Tag model's submodules as stages, {attribute: stage name} (several modules may share
    a name): while the ranges are on, each call of one runs in a range of its name."""
    for attr, name in stages.items():
        setattr(getattr(model, attr), _STAGE_ATTR, name)


def _one_or_all(values: tuple):
    return values[0] if len(values) == 1 else values


class _Off:
    """The disabled stage: no ranges, the tensors pass through untouched."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def inputs(self, *args):
        return _one_or_all(args)

    outputs = inputs


class _ThreadState(threading.local):
    def __init__(self):
        self.opened = []  # the backward ranges this thread opened (some closed since)
        self.modules = []  # (module, _Stage) of the tagged modules running, innermost last


_thread = _ThreadState()


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
        _thread.opened.append(self)
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
    ranges = _thread.opened
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
        return tuple(tuple(next(rest) for _ in a) if isinstance(a, tuple) else next(rest)
                     for a in args)

    def inputs(self, *args):
        """The stage's inputs, as they are; its backward range ends once their gradients are
        done. Call first, before any op of the stage."""
        return _one_or_all(self._mark(_InputsMarker, args))

    def outputs(self, *args):
        """The stage's outputs, as they are; its backward range begins when their gradients
        are done. Call last, after every op of the stage."""
        return _one_or_all(self._mark(_OutputsMarker, args))


def stage(name: str):
    """Context manager marking one stage of the model; `as st` gives st.inputs(...) and
    st.outputs(...), which mark the stage's tensors for its backward range."""
    if not _enabled or torch.compiler.is_compiling():
        return _Off()  # a fresh one: torch.compile enters only context managers made in the graph
    return _Stage(name)


def _enter_module(module: torch.nn.Module, args: tuple):
    """Global forward pre-hook: a tagged module's call opens its stage and marks its
    positional inputs (the marked ones replace them)."""
    if torch.compiler.is_compiling() or _STAGE_ATTR not in module.__dict__:
        return None
    st = _Stage(module.__dict__[_STAGE_ATTR]).__enter__()
    _thread.modules.append((module, st))
    return st._mark(_InputsMarker, args)


def _exit_module(module: torch.nn.Module, args: tuple, output):
    """Global forward hook, run even when the forward raises: marks a tagged module's
    output (the marked one replaces it) and closes its stage."""
    if torch.compiler.is_compiling() or not _thread.modules or _thread.modules[-1][0] is not module:
        return None  # not a tagged module (or one that started before the ranges were on)
    st = _thread.modules.pop()[1]
    try:
        return st.outputs(output)
    finally:
        st.__exit__(None, None, None)


enable_nvtx(os.environ.get("IGNN_TRITON_NVTX", "0") not in ("", "0"))
