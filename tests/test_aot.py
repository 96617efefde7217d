"""Ahead-of-time compilation of every kernel's default configs (all dtypes) for sm_80 and
sm_90, without a GPU: it must compile, spill nothing, and the resource table is printed
(pytest -s shows it; it is also attached to the test report on failure).

Under TRITON_INTERPRET=1 (set by conftest when there is no GPU) the compilation runs in child
processes without that variable, one per arch, in parallel.
"""
import importlib

import pytest

pytest.importorskip("triton")

from ignn_triton.kernels import KERNEL_MODULES, aot  # noqa: E402
ARCHS = (80, 90)
# one pytest-xdist worker runs this file, so the compilation (the `reports` fixture) runs once
pytestmark = pytest.mark.xdist_group("aot")


@pytest.fixture(scope="module")
def reports():
    out = {}
    for module in KERNEL_MODULES:
        out[module] = aot.compile_specs(module, ARCHS)
    return out


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_default_configs_compile_without_spills(module, reports):
    got = reports[module]
    specs = importlib.import_module(module).aot_specs()
    table = aot.format_table(got)
    print(f"\n{module}\n{table}")
    compilations = [v for name, *_, options in specs for v in aot.variants(name, options)]
    assert len(got) == len(compilations) * len(ARCHS), table
    assert any(name.endswith("@jit") for name, *_ in compilations)  # as the JIT specialises
    assert {r.arch for r in got} == set(ARCHS)
    for r in got:
        assert 0 < r.registers <= 255, table
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.local == 0, \
            f"{r.name} sm_{r.arch} spills:\n{table}"
    # every dtype is there, and the fp16 / bf16 k-NN kernels run on tensor cores
    names = {r.name for r in got}
    for ty in ("fp32", "fp16", "bf16"):
        assert any(f"[{ty}]" in n for n in names), names
    for r in got:
        if r.name.startswith("patch_knn[") and ("fp16" in r.name or "bf16" in r.name):
            assert r.mma or r.wgmma, f"{r.name} sm_{r.arch} uses no tensor-core instruction"


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_kernel_has_a_spec(module):
    """The specs are recorded from the launchers: every kernel of the module is among them,
    and each spec's signature is its kernel's parameter list."""
    mod = importlib.import_module(module)
    kernels = {value for name, value in vars(mod).items() if name.endswith("_kernel")}
    specs = mod.aot_specs()
    assert {fn for _, fn, *_ in specs} == kernels
    for name, fn, signature, constexprs, _ in specs:
        assert list(signature) == list(fn.arg_names), name
        assert {n for n, ty in signature.items() if ty == "constexpr"} == set(constexprs), name


def test_aggregate_table_has_every_dtype_and_scale():
    """The x3 model runs bf16 by default on CUDA: the aggregation's s = 3 builds of every
    dtype are in the table (so compiled and checked for spills above), like s = 2's."""
    pa = importlib.import_module("ignn_triton.kernels.patch_aggregate")
    names = {name for name, *_ in pa.aot_specs()}
    for s in (2, 3):
        for ty in ("fp32", "fp16", "bf16"):
            for kernel in ("fwd_knn", "fwd_x1", "bwd_knn", "bwd_x1", "bwd_logits"):
                assert f"aggregate_{kernel}_s{s}[{ty}]" in names, (kernel, s, ty)


def _resident_per_sm(r) -> int:
    """Programs of a compiled kernel resident on one SM: registers (allocated per warp in units
    of 256), shared memory (+1 KiB reserved per block; 164 KiB per SM on sm_80, 228 KiB on
    sm_90) and the 64-warp limit."""
    regs = r.num_warps * ((r.registers * 32 + 255) // 256 * 256)
    smem = {80: 164, 90: 228}[r.arch] * 1024
    return min(65536 // regs, smem // (r.shared + 1024), 64 // r.num_warps)


def test_knn_split_heuristic_matches_occupancy(reports):
    """auto_splits sizes a wave with patch_knn.CTAS_PER_SM: it must be what the default k-NN
    configs compile to (both the whole-scan and the split kernel, as the JIT builds them)."""
    pk = importlib.import_module("ignn_triton.kernels.patch_knn")
    got = {}
    for r in reports["ignn_triton.kernels.patch_knn"]:
        if r.name.startswith("patch_knn") and r.name.endswith("@jit"):
            key = ("[fp32]" in r.name, r.arch // 10)
            got[key] = min(got.get(key, 99), _resident_per_sm(r))
    assert got == pk.CTAS_PER_SM, aot.format_table(reports["ignn_triton.kernels.patch_knn"])


_PROBE = """
import triton
import triton.language as tl


@triton.jit
def spiller(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(n):
        acc += x * (i + 1.0)
        x = tl.sqrt(x + acc)
    tl.store(out_ptr + r, acc + x)


def aot_specs():  # 2 x 4096 fp32 live values in one warp: 256 per thread cannot fit
    return [("spiller", spiller, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                  "BLOCK": "constexpr"}, {"BLOCK": 4096}, {"num_warps": 1})]
"""


def test_spill_detection(tmp_path, monkeypatch):
    """The spill counter reads the SASS: a kernel that must spill is reported as spilling,
    so the zeros above mean something. Compiled in a child process (works under the
    interpreter too)."""
    import os

    (tmp_path / "aot_spill_probe.py").write_text(_PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    (r,) = aot.compile_specs("aot_spill_probe", (80,), subprocess_=True)
    print(f"\n{aot.format_table([r])}")
    assert r.spill_stores > 0 and r.spill_loads > 0 and r.stack > 0
