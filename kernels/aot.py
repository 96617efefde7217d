"""Ahead-of-time compilation of Triton kernels for sm_80 / sm_90 without a GPU, plus the
resource report (registers, stack, spills, shared memory, tensor-core instructions).

    compile_kernel(fn, signature, constexprs, arch, num_warps=4, num_stages=3) -> AotReport
    compile_specs("ignn_triton.kernels.patch_knn", archs=(80, 90)) -> [AotReport, ...]

A kernel module lists what it launches in `aot_specs()`: tuples (name, jit function,
signature {arg: "*fp16" | "i32" | "constexpr" ...}, constexprs {arg: value},
options {"num_warps": .., "num_stages": .., "jit_ints": {int arg: value}}). The kernel
modules make them with launch_spec from the launches their own launchers record
(utils.record_launches) on meta tensors at representative shapes: the signature is the
kernel's parameter list typed by the arguments the launcher passed, the constexprs and
options are the launcher's, so the specs cannot drift from the launches. Pointer
arguments are compiled as 16-byte aligned, as a JIT launch specialises them for torch
allocations. With "jit_ints" (the integer arguments at a representative shape) the spec is
compiled twice: for any shape, and as "<name>@jit", the way the JIT specialises it at that
shape (ints that are multiples of 16 known divisible, ints equal to 1 constants): both must
be spill-free.

Under TRITON_INTERPRET=1, @triton.jit yields interpreter functions that cannot be compiled,
so compile_specs then runs the compilation in a child process without that variable (one
per arch, in parallel). Works with triton 3.3 - 3.9 (ASTSource(fn, signature, constexprs,
attrs)); older releases' ASTSource(fn, signature, constants=...) form is tried as a fallback.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from .utils import TL_TYPES

__all__ = ["AotReport", "launch_spec", "compile_kernel", "compile_specs", "tool",
           "format_table"]

_POINTEE = {**TL_TYPES, torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class AotReport:
    name: str
    arch: int
    registers: int
    stack: int  # bytes of stack frame per thread
    spill_stores: int  # bytes per thread stored by STL in the SASS (register spills)
    spill_loads: int  # bytes per thread loaded by LDL in the SASS
    local: int  # bytes of local memory per thread (cuobjdump -res-usage)
    shared: int  # bytes of shared memory: triton's dynamic + static
    mma: bool  # PTX uses mma.sync (tensor cores, Ampere style)
    wgmma: bool  # PTX uses wgmma (Hopper warpgroup MMA)
    num_warps: int
    num_stages: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def launch_spec(name: str, launches, kernel, *, jit: bool = True) -> tuple:
    """The spec (name, kernel, signature, constexprs, options) of the first launch of `kernel`
    among `launches` (recorded by utils.record_launches): the kernel's parameters in their
    order, each runtime one typed by the argument the launcher gave it (a tensor: a pointer to
    its dtype; an int: i32, or i64 past int32, as the JIT types it), each constexpr with its
    value, the launch options (num_warps, num_stages) as given; with `jit`, the int
    arguments' values as "jit_ints" (also compiled as the JIT specialises them: variants)."""
    launch = next(x for x in launches if x.kernel is kernel)
    names = list(kernel.arg_names)
    bound = {**dict(zip(names, launch.args)),
             **{n: v for n, v in launch.kwargs.items() if n in names}}
    assert len(bound) == len(names), f"{name}: no argument for {set(names) - set(bound)}"
    constexpr = {n for n, p in inspect.signature(kernel.fn).parameters.items()
                 if "constexpr" in str(p.annotation)}
    signature = {n: "constexpr" if n in constexpr else _arg_type(bound[n]) for n in names}
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    if jit:
        options["jit_ints"] = {n: bound[n] for n in names if signature[n] in ("i32", "i64")}
    return name, kernel, signature, {n: bound[n] for n in names if n in constexpr}, options


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, int) and not isinstance(value, bool):
        return "i32" if -(1 << 31) <= value < 1 << 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no AOT type for a runtime argument {value!r}: make it a constexpr")


def tool(name: str) -> str:
    """Path of a CUDA binary (cuobjdump, ptxas) bundled in the triton wheel, else from PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _ast_source(fn, signature, constexprs, attrs):
    from triton.compiler import ASTSource

    try:
        return ASTSource(fn, signature, constexprs, attrs)
    except TypeError:  # triton < 3.3: ASTSource(fn, signature, constants=..., attrs=...)
        consts = {fn.arg_names.index(k): v for k, v in constexprs.items()}
        return ASTSource(fn, signature, constants=consts)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _res_usage(cubin: bytes, kernel: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = {}
    seen = False
    for line in out.splitlines():
        if line.strip().startswith("Function"):
            seen = line.strip().rstrip(":").split()[-1] == kernel
            continue
        if seen and "REG:" in line:
            fields = {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}
            break
    if not fields:
        raise RuntimeError(f"cuobjdump -res-usage: no entry for {kernel}:\n{out}")
    return fields


_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _spills(cubin: bytes) -> tuple[int, int]:
    """Bytes moved by the local-memory stores (STL) and loads (LDL) in the SASS of the cubin
    that triton built: register spills (these kernels have no local arrays). Read from the
    actual binary rather than by re-running ptxas, whose flags differ between releases."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    totals = {"STL": 0, "LDL": 0}
    for op, suffix in re.findall(r"\b(STL|LDL)((?:\.\w+)*)\s", sass):
        widths = [_WIDTH[x] for x in suffix.split(".") if x in _WIDTH]
        totals[op] += widths[-1] if widths else 4
    return totals["STL"], totals["LDL"]


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                   num_stages: int = 3, name: str | None = None,
                   divisible: tuple = ()) -> AotReport:
    """Compile one @triton.jit function for sm_{arch} in this process and report resources.
    Pointer arguments are assumed 16-byte aligned (as the JIT specialises them), and so are
    the integer arguments named in `divisible` (the JIT's specialisation of an int that is a
    multiple of 16)."""
    import triton
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)} is not a JITFunction (TRITON_INTERPRET "
                        "is set?): use compile_specs, which compiles in a child process")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, ty in signature.items() if ty.startswith("*") or a in divisible}
    src = _ast_source(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=_target(arch),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    kernel = compiled.metadata.name
    usage = _res_usage(compiled.asm["cubin"], kernel)
    ptx = compiled.asm["ptx"]
    stores, loads = _spills(compiled.asm["cubin"])
    return AotReport(name=name or fn.__name__, arch=arch, registers=usage["REG"],
                     stack=usage.get("STACK", 0), spill_stores=stores, spill_loads=loads,
                     local=usage.get("LOCAL", 0),
                     shared=compiled.metadata.shared + usage.get("SHARED", 0),
                     mma=bool(re.search(r"\bmma\.sync", ptx)), wgmma="wgmma" in ptx,
                     num_warps=num_warps, num_stages=num_stages)


def variants(name: str, options: dict) -> list[tuple[str, tuple, tuple]]:
    """(name, divisible ints, ints equal to 1) of each compilation of a spec: as is (no integer
    argument known divisible: any shape), and, when options["jit_ints"] gives the integer
    arguments' values at a representative shape, also "<name>@jit", compiled as the JIT
    specialises it there (the ints that are multiples of 16 marked divisible, and those equal
    to 1 made constants: different code, registers, spills)."""
    out = [(name, (), ())]
    values = options.get("jit_ints")
    if values:
        out.append((name + "@jit", tuple(a for a, v in values.items() if v % 16 == 0),
                    tuple(a for a, v in values.items() if v == 1)))
    return out


def _compile_in_process(module: str, archs) -> list[AotReport]:
    import importlib

    mod = importlib.import_module(module)
    reports = []
    for name, fn, signature, constexprs, options in mod.aot_specs():
        for variant, divisible, ones in variants(name, options):
            sig = {a: "constexpr" if a in ones else ty for a, ty in signature.items()}
            consts = {**constexprs, **{a: 1 for a in ones}}
            for arch in archs:
                reports.append(compile_kernel(fn, sig, consts, arch, name=variant,
                                              num_warps=options.get("num_warps", 4),
                                              num_stages=options.get("num_stages", 3),
                                              divisible=divisible))
    return reports


def compile_specs(module: str, archs=(80, 90), *, subprocess_: bool | None = None,
                  timeout: float = 600) -> list[AotReport]:
    """Compile every spec of `module`.aot_specs() for every arch. In a child process per arch
    (in parallel) when the interpreter is on in this one, or when subprocess_ is True."""
    if subprocess_ is None:
        subprocess_ = bool(os.environ.get("TRITON_INTERPRET"))
    if not subprocess_:
        return _compile_in_process(module, archs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-m", __name__, module, str(arch)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in archs]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"AOT compile of {module} failed:\n{err[-4000:]}")
        reports += [AotReport(**r) for r in json.loads(out.strip().splitlines()[-1])]
    order = {a: i for i, a in enumerate(archs)}
    return sorted(reports, key=lambda r: order[r.arch])


def format_table(reports) -> str:
    head = (f"{'kernel':<24}{'sm':>4}{'warps':>6}{'stages':>7}{'regs':>6}{'stack':>7}"
            f"{'spill st/ld':>13}{'smem':>8}  tensor cores")
    rows = [head, "-" * len(head)]
    for r in reports:
        tc = "wgmma" if r.wgmma else "mma.sync" if r.mma else "-"
        rows.append(f"{r.name:<24}{r.arch:>4}{r.num_warps:>6}{r.num_stages:>7}{r.registers:>6}"
                    f"{r.stack:>7}{f'{r.spill_stores}/{r.spill_loads}':>13}{r.shared:>8}  {tc}")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m ignn_triton.kernels.aot MODULE [ARCH ...] -> JSON list
    mod, *arch_args = sys.argv[1:]
    result = _compile_in_process(mod, [int(a) for a in arch_args] or [80, 90])
    print(json.dumps([asdict(r) for r in result]))
