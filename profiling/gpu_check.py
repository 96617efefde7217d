"""The GPU check: one command for a lent machine, under 8 minutes on an H100 / H200.

    profiling/gpu_check.sh [--out DIR] [--steps STEP ...] [--budget SECONDS] [--dry-run]

Runs these steps in this order, most important first, each under its own time limit and
all within the budget (default 470 s); a step that cannot get its minimum in what is left
is reported as skipped, so a cut-off run still returns the first steps' results:

  sanitizer  compute-sanitizer --tool memcheck, then --tool initcheck, on one small call of
             every kernel (`--part calls`): the k-NN with 1 and 3 programs per query block
             (the merge kernel), fp32 and bf16; edge features; statistics forward and
             backward; aggregation forward and backward, both modes, s = 2 and 3
  tests      the CUDA tests with the real kernels: tests/test_cuda.py first (model vs CPU
             path, torch.compile(fullgraph=True), an autocast training step, split vs whole
             k-NN and the aggregation forward twice, bitwise), then the launch, ops and kernel
             tests (fp32 / fp16 / bf16, the default configs)
  large      `--part large`: an aggregation call on an F past 2^31 elements and a k-NN call
             on an embedding past 2^31, each checked against the reference on a corner crop
  bench      `--part headline`: bench.py's headline rows (patch_knn at LR 256^2 and 128^2,
             the GA block forward and forward + backward at LR 256^2 bf16, the x4 model vs
             EDSR-L at LR 256^2 bf16) with the ceilings measured in the same run

DIR (default $OUT, else profiling/results/gpu-check) receives at most 7 files: summary.md
(versions, device, one row per step; rewritten after every step), sanitizer.log, tests.log,
large.log, and bench's <date>-<device>-headline.{json,md}. Exit status 0 when every step
passed, 1 otherwise, 2 for bad arguments (nothing written).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470
_SCRIPT = [sys.executable, str(Path(__file__).resolve())]
# the sanitizer sees every tensor's own allocation only without the caching allocator
_SANITIZER_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
_TESTS = ["tests/test_cuda.py", "tests/test_kernel_launch.py", "tests/test_ops.py",
          "tests/test_kernel_patch_knn.py", "tests/test_kernel_aggregate.py"]


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # at most this long
    min_s: int  # not started with less than this left
    log: str | None  # its file in DIR (bench writes its own)

    def commands(self, out: Path) -> list[tuple[list[str], dict]]:
        """(argv, extra environment) of each command, run one after the other."""
        if self.name == "sanitizer":
            sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
            return [([sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20",
                      *_SCRIPT, "--part", "calls"], _SANITIZER_ENV)
                    for tool in ("memcheck", "initcheck")]
        if self.name == "tests":
            return [([sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider",
                      "--durations=10", *_TESTS], {})]
        if self.name == "large":
            return [([*_SCRIPT, "--part", "large"], {})]
        return [([*_SCRIPT, "--part", "headline", "--out", str(out)], {})]


STEPS = [Step("sanitizer", 150, 60, "sanitizer.log"), Step("tests", 180, 60, "tests.log"),
         Step("large", 75, 30, "large.log"), Step("bench", 100, 40, None)]


# --------------------------------------------------------------------------- orchestration

def _header() -> list[str]:
    try:
        import torch
        import triton

        versions = (f"torch {torch.__version__}, triton {triton.__version__}, "
                    f"CUDA {torch.version.cuda}")
    except ImportError as e:
        versions = f"import failed: {e}"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip() or "no GPU listed"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "no nvidia-smi"
    return [f"# GPU check {datetime.date.today().isoformat()}", "", f"{gpu}; {versions}", ""]


def _note(step: Step, log: Path) -> str:
    """One line of a step's result: the sanitizers' error summaries, else the last line."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not re.match(r"(\$ |exit \d+$)", line)]  # not our marks
    if step.name == "sanitizer":
        lines = [line for line in lines if "ERROR SUMMARY" in line] or lines
        lines = ["; ".join(lines[-2:])]
    return lines[-1][:200].replace("|", "/") if lines else ""  # a markdown table cell


def _write_summary(out: Path, header: list[str], budget: float, rows: list[list[str]]) -> None:
    table = ["| step | status | seconds | file | result |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(header + [f"budget {budget:.0f} s", ""] + table) + "\n"
    tmp = out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")


def _run_step(step: Step, out: Path, limit: float) -> tuple[str, float, str]:
    """Runs a step's commands, their output into its log; (status, seconds, result line)."""
    start = time.monotonic()
    log = out / (step.log or f"{step.name}.log")
    status = "ok"
    with open(log, "w") as f:
        for argv, env in step.commands(out):
            left = limit - (time.monotonic() - start)
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            try:
                rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **env}, timeout=max(1.0, left)).returncode
            except FileNotFoundError as e:
                f.write(f"{e}\n")
                rc = 127
            except subprocess.TimeoutExpired:
                f.write(f"timed out after {limit:.0f} s\n")
                status = f"timeout ({limit:.0f} s)"
                break
            f.write(f"exit {rc}\n")
            if rc:
                status = f"FAILED (exit {rc})"
    note = _note(step, log)
    if step.log is None and status == "ok":
        log.unlink()  # bench: its results files say it all
    return status, time.monotonic() - start, note


def run(steps: list[Step], out: Path, budget: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    header = _header()
    deadline = time.monotonic() + budget
    rows = [[s.name, "pending", "", s.log or "", ""] for s in steps]
    _write_summary(out, header, budget, rows)
    failed = False
    for row, step in zip(rows, steps):
        left = deadline - time.monotonic()
        if left < step.min_s:
            row[1], row[3] = f"skipped: {left:.0f} s of the budget left", ""
            failed = True
            _write_summary(out, header, budget, rows)
            continue
        row[1] = "running"
        _write_summary(out, header, budget, rows)
        status, seconds, note = _run_step(step, out, min(step.limit_s, left))
        files = [step.log] if step.log else sorted(p.name for p in out.glob("*-headline.*"))
        if step.log is None and status != "ok":
            files.append(f"{step.name}.log")
        row[1:] = [status, f"{seconds:.0f}", ", ".join(files), note]
        failed |= status != "ok"
        _write_summary(out, header, budget, rows)
    return 1 if failed else 0


# --------------------------------------------------------------------------- parts

def _kernels():
    return [importlib.import_module(f"ignn_triton.kernels.{m}")
            for m in ("patch_knn", "patch_stats", "patch_aggregate")]


def kernel_calls(device: str = "cuda") -> None:
    """One small call of every kernel, on the launchers' default configs."""
    import torch

    from ignn_triton.geometry import graph_geometry

    pk, ps, pa = _kernels()
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ye = torch.randn(1, 64, 24, 20, device=device, generator=g).to(dtype)
        xe = torch.randn(1, 64, 12, 10, device=device, generator=g).to(dtype)
        cfg = pk.default_knn_config(64, 5, dtype)
        for splits in (1, 3):
            _, idx = pk.patch_knn(ye, xe, 5, 2, config=dataclasses.replace(cfg, splits=splits))
        pk.edge_features(ye, xe, idx)
    for s, C in ((2, 18), (3, 16)):  # C = 18: the channel-padded copies
        feat = torch.randn(1, C, 6 * s, 5 * s, device=device, generator=g).to(torch.bfloat16)
        H, W = feat.shape[2:]
        stats = []
        for args in (ps.query_grid_args(H, W), ps.key_grid_args(H, W, s)):
            mean, std = ps.patch_stats(feat, *args)
            ps.patch_stats_backward(feat, mean, std, torch.ones_like(mean), std, *args)
            stats += [mean, std]
        geo = graph_geometry(H, W, s)
        idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, 2), device=device, generator=g)
        logits = torch.randn(1, 2, s * H, s * W, device=device, generator=g).to(torch.bfloat16)
        for lg in (None, logits):
            out = pa.patch_aggregate(feat, idx, *stats, s, logits=lg)
            pa.patch_aggregate_backward(feat, idx, *stats, torch.ones_like(out), s, logits=lg)
    if device == "cuda":
        torch.cuda.synchronize()
    print("every kernel ran")


def _close(name: str, got, want, rtol: float, atol: float) -> bool:
    """|got - want| <= rtol |want| + atol max|want|, all finite; prints the outcome."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    ok = bool((err <= rtol * want.abs() + atol * want.abs().max()).all())
    print(f"large: {name}: max |err| {err.max().item():.3g} -> {'ok' if ok else 'FAILED'}")
    return ok and bool(torch.isfinite(got).all())


def large_calls(device: str = "cuda", channels: int = 256, agg_lr: int = 2944,
                knn_lr: int = 5800) -> int:
    """An aggregation past 2^31 elements of F (B = 1, C = 256, LR 2944^2, k = 1, bf16) and a
    k-NN past 2^31 elements of the embedding (E = 64, LR 5800^2, fp32), through ignn_triton.ops,
    each checked on the bottom-right corner (where the offsets are largest) against
    reference/ on a crop aligned to the patch grids (same padding, same windows). With
    enough free memory, also the aggregation's backward (grad F, through the statistics).
    (Smaller sizes check the checks: tests/test_profiling.py, on the CPU.)"""
    import torch

    import ignn_triton.reference as R
    from ignn_triton import ops
    from ignn_triton.geometry import graph_geometry

    ok = True
    # ---- aggregation: F (1, 256, 2944, 2944), 2.22e9 elements; the crop's 64 rows past 2^31
    s, C, L, crop = 2, channels, agg_lr, 64
    g = torch.Generator(device=device).manual_seed(0)
    feat = torch.randn(1, C, L, L, device=device, generator=g, dtype=torch.bfloat16)
    geo, small = graph_geometry(L, L, s), graph_geometry(crop, crop, s)
    # every query's neighbour is son patch 0 (top left), but the crop's queries': theirs lie
    # in the crop's son grid, so the crop's key blocks get gradient from the crop alone
    idx_small = torch.randint(0, small.num_keys, (1, small.num_queries, 1), device=device,
                              generator=g)
    a, b = idx_small // small.n2 + geo.n1 - small.n1, idx_small % small.n2 + geo.n2 - small.n2
    rows = torch.arange(geo.m1 - small.m1, geo.m1, device=device)
    cols = torch.arange(geo.m2 - small.m2, geo.m2, device=device)
    idx = torch.zeros(1, geo.num_queries, 1, dtype=torch.int64, device=device)
    idx[0, (rows[:, None] * geo.m2 + cols).flatten()] = (a * geo.n2 + b)[0]
    # the backward holds saved tensors, grad_out and fp32 gradients: about 24 bytes per F value
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else float("inf")
    backward = free > 24 * feat.numel() * 2
    leaf = feat.requires_grad_(backward)
    out = ops.patch_aggregate(leaf, idx, ops.query_stats(leaf), ops.key_stats(leaf, s), s)
    f64 = feat.detach()[..., -crop:, -crop:].double().requires_grad_(backward)
    want = R.aggregate(f64, idx_small, s)  # (1, 1, C, 128, 128)
    m = 2 * s  # HR rows / cols at the crop's top and left also see queries above / left of it
    ok &= _close(f"knn_hr, the corner of an F of {feat.numel():.3g} elements",
                 out[..., -2 * crop + m:, -2 * crop + m:], want[..., m:, m:], 1e-2, 1e-2)
    if backward:
        upstream = torch.zeros_like(out)
        upstream[..., -2 * crop + m:, -2 * crop + m:] = 1
        out.backward(upstream)
        (grad,) = torch.autograd.grad(want, f64, upstream[..., -2 * crop:, -2 * crop:].double())
        e = 2 * m  # LR pixels near the crop's edge: patches that cross it
        ok &= _close("grad F, the corner", leaf.grad[..., -crop + e:, -crop + e:],
                     grad[..., e:, e:], 1e-2, 1e-2)
    else:
        print(f"large: aggregation backward skipped: {free / 2 ** 30:.0f} GiB free")
    del feat, leaf, out, idx
    if device == "cuda":
        torch.cuda.empty_cache()
    # ---- k-NN: ye (1, 64, 5800, 5800) fp32, 2.15e9 elements (its packed copy too)
    L, crop, k = knn_lr, 128, 5
    ye = torch.randn(1, 64, L, L, device=device, generator=g)
    xe = torch.randn(1, 64, L // s, L // s, device=device, generator=g)
    dist, idx = ops.patch_knn(ye, xe, k, s)
    geo, small = graph_geometry(L, L, s), graph_geometry(crop, crop, s)
    ref_dist, ref_idx = R.patch_knn(ye[..., -crop:, -crop:].double(),
                                    xe[..., -crop // s:, -crop // s:].double(), k, s)
    # the last 30 query rows / columns: windows clamped to the son grid's end in both
    q = 30
    sel = lambda t, m2: t.view(1, -1, m2, k)[:, -q:, -q:]  # noqa: E731
    got_d, got_i = sel(dist, geo.m2), sel(idx, geo.m2)
    want_d, want_i = sel(ref_dist, small.m2), sel(ref_idx, small.m2)
    got_i = (got_i // geo.n2 - (geo.n1 - small.n1)) * small.n2 + got_i % geo.n2 - (
        geo.n2 - small.n2)  # in the crop's son grid
    ok &= _close(f"patch_knn dist, the corner of an embedding of {ye.numel():.3g} elements",
                 got_d, want_d, 1e-4, 2e-5)
    same = (got_i.sort(-1).values == want_i.sort(-1).values).all(-1).float().mean().item()
    print(f"large: patch_knn idx, the corner: {same:.4f} of the queries pick the reference's set")
    ok &= same > 0.99  # random data: near-ties within fp32 rounding are rare
    diff = ops.edge_features(ye, xe, idx, s).view(1, geo.m1, geo.m2, k, 64)[:, -q:, -q:]
    want = R.edge_features(ye[..., -crop:, -crop:].double(),
                           xe[..., -crop // s:, -crop // s:].double(), ref_idx)
    want = want.view(1, small.m1, small.m2, k, 64)[:, -q:, -q:]
    same = got_i == want_i  # the same neighbour at the same rank
    ok &= _close("edge_features, the corner", diff[same], want[same], 1e-4, 1e-5)
    print(f"large: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def headline(out: Path) -> None:
    """bench.py's headline rows into out (torch.compile columns off: they take minutes)."""
    import torch

    bench = importlib.import_module("bench")
    bench.COMPILE = False
    torch.backends.cudnn.benchmark = True
    b = bench.Bench("cuda", quick=False)
    b.subset, b.out_dir = ["headline"], out
    b.measure_ceilings()
    for size in (256, 128):
        bench.bench_matching(b, 64, size, size, 2, 5, 30)
    bench.bench_graph_aggregation(b, 256, 256, 256, 4, dtypes=("bf16",))
    bench.bench_model(b, 256, 32, [(256, 256)], dtypes=("bf16",))
    print(f"wrote {bench.write_results(b, out)}")


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s.name for s in STEPS]
    parser.add_argument("--out", type=Path, default=Path(os.environ.get(
        "OUT", ROOT / "profiling" / "results" / "gpu-check")))
    parser.add_argument("--steps", nargs="+", default=names, metavar="STEP",
                        help=f"a subset of {' '.join(names)} (run in that order)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--part", choices=["calls", "large", "headline"],
                        help="run one step's work in this process (what the steps call)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in names]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}: choose from {' '.join(names)}")
    if args.part == "calls":
        kernel_calls()
        return 0
    if args.part == "large":
        return large_calls()
    if args.part == "headline":
        headline(args.out)
        return 0
    steps = [s for s in STEPS if s.name in args.steps]
    if args.dry_run:
        for step in steps:
            for argv, env in step.commands(args.out):
                prefix = " ".join(f"{k}={v}" for k, v in env.items())
                print(f"{step.name}: {prefix + ' ' if prefix else ''}{' '.join(argv)}")
        return 0
    return run(steps, args.out, args.budget)


if __name__ == "__main__":
    sys.exit(main())
